"""Attention on a CPU as one kernel per direction (`kernels/attention.cpp`, through cpu_kernels), registered
as the custom op `vitscope::attention_<version>` so that torch.compile, torch.func and autograd treat it as one
opaque op with a known output shape.

At the seed size (17 tokens, head size 8), ATen's batched matmuls, softmax and the q/k/v layout copies take
35-43% of a compiled training step (docs/performance.md#attention-kernel). The kernel reads q, k and v where the qkv
projection wrote them and keeps each image's scores in the cache.

Where the kernels cannot be built, `available()` is False and the model falls back to the explicit form: the
same numbers to fp32 rounding.
"""
from __future__ import annotations

import torch

from .cpu_kernels import VERSION, bias_gradient, fp32_bias, library, pointer

# This module's API too (the model asks cpu_attention whether its kernel runs here): re-exported, as the aliases say.
from .cpu_kernels import available as available
from .cpu_kernels import faster_here as faster_here
from .cpu_kernels import unavailable_reason as unavailable_reason

LANES = 16  # images per vector in the kernel's lane form (its L)
ROW_FORM_MULTIPLE = 16  # head sizes that are multiples of this run in the kernel's row form


@torch.library.custom_op(f"vitscope::attention_{VERSION}", mutates_args=())
def attention(qkv: torch.Tensor, bias: torch.Tensor | None, heads: int, scale: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, T, 3 * D) as the qkv projection writes it, (B, T, 3, H, d), plus that projection's bias (3 * D,)
    where it is not None -> the attention's output (B, T, D) with the heads side by side, and every head's
    attention probabilities in fp32 in the kernel's own layout (for the backward)."""
    qkv, bias = qkv.contiguous(), fp32_bias(bias)
    B, T, D3 = qkv.shape
    out = qkv.new_empty(B, T, D3 // 3)
    probs = qkv.new_empty(probs_shape(B, T, heads, D3 // 3 // heads), dtype=torch.float32)
    library().vitscope_attention_forward(qkv.data_ptr(), pointer(bias), B, T, heads, D3 // 3 // heads, scale,
                                         out.data_ptr(), probs.data_ptr(), int(qkv.dtype == torch.bfloat16))
    return out, probs


def probs_shape(batch: int, tokens: int, heads: int, head_dim: int) -> tuple:
    """The saved probabilities' shape. The kernel's row form (head sizes that are multiples of 16):
    (image and head, query, key padded to a multiple of 16). Its lane form: (group, query, key, lane), a group
    being 16 images of one head."""
    if head_dim % ROW_FORM_MULTIPLE == 0:
        return batch * heads, tokens, -(-tokens // 16) * 16
    return heads * -(-batch // LANES), tokens, tokens, LANES


@attention.register_fake
def _(qkv, bias, heads, scale):
    B, T, D3 = qkv.shape
    return qkv.new_empty(B, T, D3 // 3), qkv.new_empty(probs_shape(B, T, heads, D3 // 3 // heads),
                                                       dtype=torch.float32)


@torch.library.custom_op(f"vitscope::attention_backward_{VERSION}", mutates_args=())
def attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, bias: torch.Tensor | None, probs: torch.Tensor,
                       heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `attention`'s output with respect to qkv, in qkv's layout and dtype, and to the bias, in
    fp32 (empty where bias is None), summed by the kernel as it writes qkv's."""
    qkv, grad_out, bias = qkv.contiguous(), grad_out.to(qkv.dtype).contiguous(), fp32_bias(bias)
    B, T, D3 = qkv.shape
    grad_qkv = torch.empty_like(qkv)
    grad_bias = bias_gradient(bias, D3, qkv)
    library().vitscope_attention_backward(qkv.data_ptr(), pointer(bias), grad_out.data_ptr(), probs.data_ptr(), B,
                                          T, heads, D3 // 3 // heads, scale, grad_qkv.data_ptr(),
                                          grad_bias.data_ptr() if bias is not None else None,
                                          int(qkv.dtype == torch.bfloat16))
    return grad_qkv, grad_bias


@attention_backward.register_fake
def _(grad_out, qkv, bias, probs, heads, scale):
    return torch.empty_like(qkv), bias_gradient(bias, qkv.shape[-1], qkv)


class _Attention(torch.autograd.Function):
    """The two ops joined for autograd. An autograd.Function with its own setup_context, because torch.func's
    grad (the compiled whole step's) does not differentiate through a custom op's registered autograd."""

    @staticmethod
    def forward(qkv, bias, heads, scale):
        return attention(qkv, bias, heads, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        qkv, bias, heads, scale = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(qkv, bias, output[1])
        ctx.heads, ctx.scale = heads, scale

    @staticmethod
    def backward(ctx, grad_out, grad_probs):
        qkv, bias, probs = ctx.saved_tensors
        with torch.no_grad():  # no double backward; and the backward op itself has no autograd formula
            grad_qkv, grad_bias = attention_backward(grad_out, qkv, bias, probs, ctx.heads, ctx.scale)
        return grad_qkv, None if bias is None else grad_bias.to(bias.dtype), None, None


def multi_head_attention(qkv: torch.Tensor, heads: int, scale: float, bias: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """softmax(Q K^T * scale) V of every head, differentiable: qkv (B, T, 3 * D), plus `bias` (3 * D,) where it
    is not None (the qkv layer's, so that layer can be a plain matmul) -> (B, T, D)."""
    return _Attention.apply(qkv, bias, heads, scale)[0]
