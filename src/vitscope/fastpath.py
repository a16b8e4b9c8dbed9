"""Faster computations of model.py's numbers, chosen by a RuntimeConfig: the one seam between the paper's model
and the speed work.

`accelerate(model, runtime)` gives a built model's modules the classes below, subclasses that keep every
parameter and name (checkpoints do not change) and compute the same logits and gradients to rounding:
- attention through vitscope's CPU kernel (cpu_attention), or the explicit or fused form, whichever measured
  fastest on the device (`RuntimeConfig.attention`);
- the exact GELU with one exp shared by its value and its slope, or the same as a CPU kernel (cpu_gelu)
  (`RuntimeConfig.gelu`);
- the qkv and fc1 biases added by those kernels, so those layers run as plain matmuls (`bias_in_kernels`);
- a last block that computes the class token's output alone, the only one the head reads
  (`last_block_class_token_only`).
Evaluation with the attention weights, and export, take the plain forms. Why each is there and what it gained:
docs/performance.md#cpu-fast-paths.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_attention, cpu_gelu, cpu_kernels
from .config import RuntimeConfig, ViTConfig
from .model import MLP, Attention, ViT, flops_per_image

# "auto" attention on an AVX-512 CPU runs the kernel's lane form up to this head size and its row form at
# multiples of cpu_attention.ROW_FORM_MULTIPLE: where it measured faster (docs/performance.md#which-head-sizes).
KERNEL_HEAD_DIM_MAX = 8
# Below this head size the class token's attention runs with the heads as the rows of one matrix
# (docs/performance.md#class-token-attention).
HEADS_AS_ROWS_BELOW = 16
# "auto" GELU runs the kernel for inputs of at least this many elements: a call out of the compiled graph costs
# more than it gains on smaller ones (docs/performance.md#gelu-kernel-threshold).
GELU_KERNEL_MIN_ELEMENTS = 1 << 21


def accelerate(model: nn.Module, runtime: RuntimeConfig) -> nn.Module:
    """`model`, its modules given the fast classes `runtime` asks for (in place; returned for chaining)."""
    for module in model.modules():
        if type(module) is Attention:
            FastAttention.adopt(module, runtime)
        elif type(module) is MLP and isinstance(module.act, nn.GELU):
            FastMLP.adopt(module, runtime)
    if type(model) is ViT and runtime.last_block_class_token_only and len(model.blocks):
        model.__class__ = ClassTokenLastBlockViT
    return model


def exporting() -> bool:
    """torch.export, ONNX or TorchScript tracing: the graph must hold standard ops only."""
    is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.5
    return is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def kernel_is_faster(head_dim: int) -> bool:
    """Whether "auto" attention runs cpu_attention's kernel at this head size (on an AVX-512 CPU)."""
    return head_dim <= KERNEL_HEAD_DIM_MAX or head_dim % cpu_attention.ROW_FORM_MULTIPLE == 0


class FastAttention(Attention):
    """Attention as `implementation` says: "kernel" (vitscope's CPU kernel; explicit where it cannot be built),
    "fused", "explicit", or "auto": fused on GPUs, the kernel on AVX-512 CPUs at the head sizes where it was
    faster, explicit otherwise (at these sizes the CPU's fused kernel is slower than three small matmuls)."""

    @classmethod
    def adopt(cls, module: Attention, runtime: RuntimeConfig) -> None:
        module.__class__ = cls
        module.implementation = runtime.attention
        # decided here, not while torch.compile traces forward (which cannot read /proc/cpuinfo)
        wanted = runtime.attention == "kernel" or (
            runtime.attention == "auto" and kernel_is_faster(module.head_dim) and cpu_kernels.faster_here())
        module.kernel = wanted and cpu_kernels.available()  # on a CPU, for fp32 and bf16 (cpu_kernels.supports)
        if runtime.attention == "kernel" and not module.kernel:
            warnings.warn("attention = \"kernel\" was asked for, but the kernel could not be built here "
                          f"({cpu_kernels.unavailable_reason()}): attention runs in the explicit form", stacklevel=3)
        module.bias_in_kernel = runtime.bias_in_kernels

    def uses_fused(self, x: torch.Tensor) -> bool:
        return self.implementation == "fused" or (self.implementation == "auto" and x.device.type != "cpu")

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if self.kernel and not return_attention and cpu_kernels.supports(x) and not exporting():
            bias = self.qkv.bias if self.bias_in_kernel else None  # for the kernel to add
            qkv = self.qkv(x) if bias is None else F.linear(x, self.qkv.weight)  # (B, T, 3D)
            return self.proj(cpu_attention.multi_head_attention(qkv, self.heads, self.scale, bias)), None
        q, k, v = self.split_heads(self.qkv(x), 3)
        out, attention = self.attend(q, k, v, fused=self.uses_fused(x) and not return_attention)
        return self.proj(self.merge_heads(out)), attention

    def class_token(self, x: torch.Tensor) -> torch.Tensor:
        """The attention's output for the first token (the class token) alone: (B, T, D) -> (B, 1, D). It needs
        the keys and values of every token but a query for one."""
        B, T, D = x.shape
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, :1], w[:D], None if b is None else b[:D])  # (B, 1, D)
        kv = F.linear(x, w[D:], None if b is None else b[D:])  # (B, T, 2D)
        fused = self.uses_fused(x)
        if not fused and self.head_dim < HEADS_AS_ROWS_BELOW:
            return self.proj(self._class_token_heads_as_rows(q, *kv.reshape(B, T, 2, D).unbind(2)))
        k, v = self.split_heads(kv, 2)
        out, _ = self.attend(self.split_heads(q, 1)[0], k, v, fused)
        return self.proj(self.merge_heads(out))

    def _class_token_heads_as_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The class token's attention, q (B, 1, D) over k, v (B, T, D), with the heads as the rows of one
        matrix: row h of (B, H, D) holds the query on head h's slice of D and zeros elsewhere, so one bmm
        against the keys gives every head's scores (B, H, T), and one against the values gives rows of which
        each keeps its own head's slice. The same numbers as the per-head form, which torch.compile on a CPU
        lowers into a slow kernel at small head sizes (1-row matmuls become multiply-and-sum loops)."""
        H, D = self.heads, q.shape[-1]
        heads = torch.arange(H, device=q.device).unsqueeze(1) == torch.arange(D, device=q.device) // self.head_dim
        mask = heads.to(q.dtype)  # (H, D): 1 on each head's slice
        attention = ((q * (mask * self.scale)) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, T)
        return ((attention @ v) * mask).sum(dim=1, keepdim=True)  # (B, 1, D)


class ClassTokenLastBlockViT(ViT):
    """The ViT whose last block computes the class token's output alone: the head reads nothing else, so the same
    logits for ~1/depth less work. Every block runs in full where the attention weights are asked for."""

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if return_attention:
            return super().forward(x, return_attention)
        x = self.tokens(x)
        for block in self.blocks[:-1]:
            x, _ = block(x)
        last = self.blocks[-1]
        x = x[:, :1] + last.drop(last.attn.class_token(last.norm1(x)))  # (B, 1, D)
        x = x + last.mlp(last.norm2(x))
        return self.head(self.norm(x[:, 0]))


# erf(z) = 1 - t (a1 + a2 t + ... + a5 t^4) exp(-z^2), t = 1 / (1 + p z), z >= 0 (Abramowitz & Stegun
# 7.1.26, |error| < 1.5e-7): the approximation ATen's vectorised CPU erf computes too.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)  # phi(x) = exp(-x^2 / 2) / sqrt(2 pi)


def _normal_cdf_and_exp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi(x) and exp(-x^2 / 2), from one exp and one division."""
    z = x.abs() * _SQRT_HALF
    t = 1.0 / (1.0 + _AS_P * z)
    a1, a2, a3, a4, a5 = _AS_A
    e = torch.exp(-z * z)
    tail = (0.5 * t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5))))) * e  # P(N > |x|)
    return torch.where(x >= 0, 1.0 - tail, tail), e


class OneExpGELU(torch.autograd.Function):
    """GELU(x) = x Phi(x), whose slope is Phi(x) + x phi(x): both from the same exp(-x^2 / 2). ATen's
    backward computes erf (an exp inside) and a second exp; here the backward recomputes Phi and phi from
    one. Computed in fp32 whatever x's dtype, as ATen does."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        cdf, _ = _normal_cdf_and_exp(x32)
        return (x32 * cdf).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        x32 = x.float()
        cdf, e = _normal_cdf_and_exp(x32)
        return (grad.float() * (cdf + x32 * e * _INV_SQRT_2PI)).to(grad.dtype)


class GELU(nn.Module):
    """The exact (erf) GELU. Where a backward may follow (training mode, gradients on), `implementation` picks
    how: "aten" = F.gelu; "one-exp" = OneExpGELU (the same numbers to ~4e-7, a cheaper backward); "kernel" = the
    same one-exp GELU as vitscope's CPU kernel (cpu_gelu; one-exp where it cannot be built); "auto" = the kernel
    on AVX-512 CPUs for inputs of GELU_KERNEL_MIN_ELEMENTS or more, one-exp on other CPUs and smaller inputs,
    F.gelu on GPUs. Evaluation, prediction and export run F.gelu: with no backward there is nothing to share.
    `forward(x, bias)` is GELU(x + bias): the kernel adds the bias itself (`runs_kernel` says where it will)."""

    def __init__(self, implementation: str = "auto"):
        super().__init__()
        self.implementation = implementation
        wanted = implementation == "kernel" or (implementation == "auto" and cpu_kernels.faster_here())
        self.kernel = wanted and cpu_kernels.available()

    def runs_kernel(self, x: torch.Tensor, numel: int) -> bool:
        """Whether forward runs the kernel on an input of `numel` elements with x's device and dtype."""
        if not (self.kernel and self.training and torch.is_grad_enabled()) or self.implementation == "aten":
            return False
        large = numel >= GELU_KERNEL_MIN_ELEMENTS
        return (large or self.implementation == "kernel") and cpu_kernels.supports(x) and not exporting()

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.runs_kernel(x, x.numel()):
            return cpu_gelu.gelu_with_gradient(x, bias)
        if bias is not None:
            x = x + bias
        if not (self.training and torch.is_grad_enabled()) or self.implementation == "aten":
            return F.gelu(x)
        if x.device.type != "cpu" and self.implementation == "auto":
            return F.gelu(x)
        return OneExpGELU.apply(x)


class FastMLP(MLP):
    """The MLP with `GELU` above. With `bias_in_kernel`, where the GELU runs its kernel fc1 is a plain matmul and
    the kernel adds fc1's bias: ATen's addmm would first copy the bias into every row of its output and then add
    the product to it, two more passes over the MLP's widest tensor."""

    @classmethod
    def adopt(cls, module: MLP, runtime: RuntimeConfig) -> None:
        module.__class__ = cls
        module.act = GELU(runtime.gelu)  # no parameters: the state dict is unchanged
        module.bias_in_kernel = runtime.bias_in_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias_in_kernel and self.act.runs_kernel(x, x.numel() // x.shape[-1] * self.fc1.out_features):
            h = self.act(F.linear(x, self.fc1.weight), self.fc1.bias)
        else:
            h = self.act(self.fc1(x))
        return self.drop(self.fc2(self.drop(h)))


def executed_flops_per_image(config: ViTConfig, runtime: RuntimeConfig) -> int:
    """model.flops_per_image less what a last block that computes the class token alone skips (its other tokens'
    queries, attention rows, projections and MLPs): the useful multiplies of the forward pass. (At head sizes
    below HEADS_AS_ROWS_BELOW the class token's scores and mix also multiply heads - 1 zeros per useful product,
    +0.5% at the seed size; they are not counted.)"""
    if config.architecture != "vit" or not runtime.last_block_class_token_only or config.depth == 0:
        return flops_per_image(config)
    T, D, M = config.num_patches + 1, config.dim, config.mlp_dim
    skipped_per_token = D * D + 2 * T * D + D * D + 2 * D * M  # query, scores and mix, projection, MLP
    return flops_per_image(config) - 2 * (T - 1) * skipped_per_token
