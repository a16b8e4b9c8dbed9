"""The exact GELU and its gradient on a CPU as one kernel per direction (`kernels/gelu.cpp`, through
cpu_kernels), registered as custom ops for torch.compile, torch.func and autograd, as cpu_attention's are.

It computes what fastpath.OneExpGELU computes in torch ops (one exp shared by GELU and its slope), without the
vector division and Sleef exp that inductor generates from those ops (docs/performance.md#gelu-kernel).
cpu_kernels.supports says which tensors it takes.

It also takes the bias of the linear layer before it, GELU(x + bias), so that layer can run as a plain matmul
(fastpath.FastMLP): the backward then returns the bias's gradient too, summed as the kernel writes x's.
"""
from __future__ import annotations

import torch

from .cpu_kernels import VERSION, bias_gradient, fp32_bias, library, pointer


def _columns(x: torch.Tensor) -> int:
    """The length of the rows the kernel adds the bias to: x's last dimension."""
    return x.shape[-1] if x.dim() else 1


@torch.library.custom_op(f"vitscope::gelu_{VERSION}", mutates_args=())
def gelu(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """GELU(x + bias), bias (x.shape[-1],) or None."""
    x, bias = x.contiguous(), fp32_bias(bias)
    y = torch.empty_like(x)
    C = _columns(x)
    library().vitscope_gelu_forward(x.data_ptr(), x.numel() // max(C, 1), C, pointer(bias), y.data_ptr(),
                                    int(x.dtype == torch.bfloat16))
    return y


@gelu.register_fake
def _(x, bias=None):
    return torch.empty_like(x)


@torch.library.custom_op(f"vitscope::gelu_backward_{VERSION}", mutates_args=())
def gelu_backward(grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of GELU(x + bias)'s x, in x's dtype, and of its bias in fp32 (empty where bias is None)."""
    x, grad, bias = x.contiguous(), grad.to(x.dtype).contiguous(), fp32_bias(bias)
    grad_x = torch.empty_like(x)
    C = _columns(x)
    grad_bias = bias_gradient(bias, C, x)
    library().vitscope_gelu_backward(x.data_ptr(), grad.data_ptr(), x.numel() // max(C, 1), C, pointer(bias),
                                     grad_x.data_ptr(), grad_bias.data_ptr() if bias is not None else None,
                                     int(x.dtype == torch.bfloat16))
    return grad_x, grad_bias


@gelu_backward.register_fake
def _(grad, x, bias=None):
    return torch.empty_like(x), bias_gradient(bias, _columns(x), x)


class _GELU(torch.autograd.Function):
    """The two ops joined for autograd (with its own setup_context, for torch.func's grad: see cpu_attention)."""

    @staticmethod
    def forward(x, bias):
        return gelu(x, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        x, bias = ctx.saved_tensors
        with torch.no_grad():
            grad_x, grad_bias = gelu_backward(grad, x, bias)
        return grad_x, None if bias is None else grad_bias.to(bias.dtype)


def gelu_with_gradient(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """GELU(x + bias), differentiable in both, x fp32 or bf16 on a CPU, bias (x.shape[-1],) of any float dtype."""
    return _GELU.apply(x, bias)
