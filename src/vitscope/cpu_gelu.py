"""The exact GELU and its gradient on a CPU as one kernel per direction (`kernels/gelu.cpp`, through
cpu_kernels), registered as custom ops for torch.compile, torch.func and autograd, as cpu_attention's are.

It computes what model._OneExpGELU computes in torch ops (one exp shared by GELU and its slope), without the
vector division and Sleef exp that inductor generates from those ops. Mid-size MLP input (12,800 x 512), bf16,
Intel host: forward 4.95 -> 3.52 ms, backward 5.38 -> 3.64 ms against the compiled torch ops
(benchmarks/gelu_kernel.py, benchmarks/RESULTS.md). cpu_kernels.supports says which tensors it takes.
"""
from __future__ import annotations

import torch

from .cpu_kernels import VERSION, library

@torch.library.custom_op(f"vitscope::gelu_{VERSION}", mutates_args=())
def gelu(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    library().vitscope_gelu_forward(x.data_ptr(), x.numel(), y.data_ptr(), int(x.dtype == torch.bfloat16))
    return y


@gelu.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op(f"vitscope::gelu_backward_{VERSION}", mutates_args=())
def gelu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    x, grad = x.contiguous(), grad.to(x.dtype).contiguous()
    grad_x = torch.empty_like(x)
    library().vitscope_gelu_backward(x.data_ptr(), grad.data_ptr(), x.numel(), grad_x.data_ptr(),
                                     int(x.dtype == torch.bfloat16))
    return grad_x


@gelu_backward.register_fake
def _(grad, x):
    return torch.empty_like(x)


class _GELU(torch.autograd.Function):
    """The two ops joined for autograd (with its own setup_context, for torch.func's grad: see cpu_attention)."""

    @staticmethod
    def forward(x):
        return gelu(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.no_grad():
            return gelu_backward(grad, x)


def gelu_with_gradient(x: torch.Tensor) -> torch.Tensor:
    """GELU(x), differentiable, x fp32 or bf16 on a CPU."""
    return _GELU.apply(x)
