"""Attention on a CPU as one kernel per direction (`kernels/attention.cpp`, through cpu_kernels), registered
as the custom op `vitscope::attention_<version>` so that torch.compile, torch.func and autograd treat it as one
opaque op with a known output shape.

At the seed size (17 tokens, head size 8), ATen's batched matmuls, softmax and the q/k/v layout copies take
35-43% of a compiled training step (benchmarks/RESULTS.md). The kernel reads q, k and v where the qkv
projection wrote them and keeps each image's scores in the cache.

Where the kernels cannot be built, `available()` is False and the model falls back to the explicit form: the
same numbers to fp32 rounding.
"""
from __future__ import annotations

import torch

from .cpu_kernels import VERSION, available, faster_here, library, unavailable_reason  # noqa: F401 (the API)

LANES = 16  # images per vector in the kernel's lane form (its L)
ROW_FORM_MULTIPLE = 16  # head sizes that are multiples of this run in the kernel's row form


@torch.library.custom_op(f"vitscope::attention_{VERSION}", mutates_args=())
def attention(qkv: torch.Tensor, heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, T, 3 * D) as the qkv projection writes it, (B, T, 3, H, d) -> the attention's output (B, T, D)
    with the heads side by side, and every head's attention probabilities in fp32 in the kernel's own layout
    (for the backward)."""
    qkv = qkv.contiguous()
    B, T, D3 = qkv.shape
    out = qkv.new_empty(B, T, D3 // 3)
    probs = qkv.new_empty(probs_shape(B, T, heads, D3 // 3 // heads), dtype=torch.float32)
    library().vitscope_attention_forward(qkv.data_ptr(), B, T, heads, D3 // 3 // heads, scale, out.data_ptr(),
                                         probs.data_ptr(), int(qkv.dtype == torch.bfloat16))
    return out, probs


def probs_shape(batch: int, tokens: int, heads: int, head_dim: int) -> tuple:
    """The saved probabilities' shape. The kernel's row form (head sizes that are multiples of 16):
    (image and head, query, key padded to a multiple of 16). Its lane form: (group, query, key, lane), a group
    being 16 images of one head."""
    if head_dim % ROW_FORM_MULTIPLE == 0:
        return batch * heads, tokens, -(-tokens // 16) * 16
    return heads * -(-batch // LANES), tokens, tokens, LANES


@attention.register_fake
def _(qkv, heads, scale):
    B, T, D3 = qkv.shape
    return qkv.new_empty(B, T, D3 // 3), qkv.new_empty(probs_shape(B, T, heads, D3 // 3 // heads),
                                                       dtype=torch.float32)


@torch.library.custom_op(f"vitscope::attention_backward_{VERSION}", mutates_args=())
def attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, probs: torch.Tensor, heads: int,
                       scale: float) -> torch.Tensor:
    """The gradient of `attention`'s output with respect to qkv, in qkv's layout and dtype."""
    qkv, grad_out = qkv.contiguous(), grad_out.to(qkv.dtype).contiguous()
    B, T, D3 = qkv.shape
    grad_qkv = torch.empty_like(qkv)
    library().vitscope_attention_backward(qkv.data_ptr(), grad_out.data_ptr(), probs.data_ptr(), B, T,
                                          heads, D3 // 3 // heads, scale, grad_qkv.data_ptr(),
                                          int(qkv.dtype == torch.bfloat16))
    return grad_qkv


@attention_backward.register_fake
def _(grad_out, qkv, probs, heads, scale):
    return torch.empty_like(qkv)


class _Attention(torch.autograd.Function):
    """The two ops joined for autograd. An autograd.Function with its own setup_context, because torch.func's
    grad (the compiled whole step's) does not differentiate through a custom op's registered autograd."""

    @staticmethod
    def forward(qkv, heads, scale):
        return attention(qkv, heads, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        qkv, heads, scale = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(qkv, output[1])
        ctx.heads, ctx.scale = heads, scale

    @staticmethod
    def backward(ctx, grad_out, grad_probs):
        qkv, probs = ctx.saved_tensors
        with torch.no_grad():  # no double backward; and the backward op itself has no autograd formula
            return attention_backward(grad_out, qkv, probs, ctx.heads, ctx.scale), None, None


def multi_head_attention(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """softmax(Q K^T * scale) V of every head, differentiable: qkv (B, T, 3 * D) -> (B, T, D)."""
    return _Attention.apply(qkv, heads, scale)[0]
