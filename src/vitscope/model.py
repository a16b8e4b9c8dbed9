"""The Vision Transformer of Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words", sized for MNIST.

Parameter names and shapes follow timm's VisionTransformer (`patch_embed.proj`, `cls_token`,
`pos_embed`, `blocks.i.attn.qkv`, ...), so weights map one-to-one onto other implementations.
`BlogViT` is the seed blog's model with its quirks kept, as the comparison row.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_attention, cpu_gelu, cpu_kernels
from .config import ViTConfig


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping PxP patches and project each to `dim`. The weight is a strided
    Conv2d's, as in timm, but applied as one matmul over the flattened patches: the same numbers, and ~0.5
    ms less per compiled `fast` step on a CPU (the convolution's backward also computes the pixels' gradient)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.in_channels, config.dim, config.patch_size, stride=config.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        P = self.proj.stride[0]
        patches = x.reshape(B, C, H // P, P, W // P, P).permute(0, 2, 4, 1, 3, 5)  # (B, H/P, W/P, C, P, P)
        return F.linear(patches.reshape(B, -1, C * P * P), self.proj.weight.flatten(1), self.proj.bias)  # (B, N, D)


# Largest head size at which "auto" attention on a CPU runs cpu_attention's lane form. Compiled whole step,
# Zen 4, side by side in one process: `seed` size (head size 8, 17 tokens, batch 256) 1.19-1.26x as fast in
# bf16 and 1.12x in fp32 with it; at head size 16 the lane form gained nothing (benchmarks/RESULTS.md).
KERNEL_HEAD_DIM_MAX = 8


def kernel_is_faster(head_dim: int) -> bool:
    """Whether "auto" attention runs cpu_attention's kernel at this head size (on an AVX-512 CPU): its lane form
    up to KERNEL_HEAD_DIM_MAX, and its row form at multiples of 16. The row form, Intel host (AVX-512, AMX),
    compiled whole step, both orders: `fast` (head size 16, 17 tokens) 1.09x and 1.10x; the mid size of
    benchmarks/throughput.py (head size 32, 50 tokens, bf16) 1.03x with the one-exp GELU and 1.12-1.13x with
    the GELU kernel (benchmarks/RESULTS.md). Not measured on the Zen 4 or Zen 3 hosts."""
    return head_dim <= KERNEL_HEAD_DIM_MAX or head_dim % cpu_attention.ROW_FORM_MULTIPLE == 0


# Head sizes below which the class-token-only attention runs with the heads as rows (Attention, explicit form).
HEADS_AS_ROWS_BELOW = 16


def _exporting() -> bool:
    """torch.export, ONNX or TorchScript tracing: the graph must hold standard ops only."""
    is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.5
    return is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


class Attention(nn.Module):
    """Multi-head self-attention. `implementation` "fused" uses F.scaled_dot_product_attention, "explicit"
    the three ops softmax(QK^T * scale) V, "kernel" vitscope's own CPU kernel (cpu_attention), "auto" fused
    on GPUs, on AVX-512 CPUs the kernel at the head sizes where it measured faster (`kernel_is_faster`),
    explicit otherwise (at these sizes the CPU flash kernel is slower than three small matmuls). Explicit
    whenever the weights are asked for, and while exporting (the kernel is not a standard op); explicit too where
    the kernel cannot be built.

    `scale` defaults to 1/sqrt(head_dim), as in the paper; the blog model overrides it.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, scale: float | None = None,
                 implementation: str = "auto", bias_in_kernel: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = scale if scale is not None else self.head_dim ** -0.5
        self.implementation = implementation
        wanted = implementation == "kernel" or (implementation == "auto" and kernel_is_faster(self.head_dim)
                                                 and cpu_attention.faster_here())
        self.kernel = wanted and cpu_attention.available()  # on a CPU, for fp32 and bf16 (cpu_kernels.supports)
        if implementation == "kernel" and not self.kernel:
            warnings.warn("attention = \"kernel\" was asked for, but the kernel could not be built here "
                          f"({cpu_attention.unavailable_reason()}): attention runs in the explicit form", stacklevel=2)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.bias_in_kernel = bias_in_kernel  # the kernel adds qkv's bias, and qkv is a plain matmul

    def forward(self, x: torch.Tensor, return_attention: bool = False, class_token_only: bool = False):
        """Attention of all tokens over all tokens, or with `class_token_only` of the first token (the class
        token) alone over all tokens: its output is then (B, 1, D)."""
        B, T, D = x.shape
        H, d = self.heads, self.head_dim
        fused = self.implementation == "fused" or (self.implementation == "auto" and x.device.type != "cpu")
        if class_token_only:  # keys and values of every token, a query for the first one only
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, :1], w[:D], None if b is None else b[:D])  # (B, 1, D)
            kv = F.linear(x, w[D:], None if b is None else b[D:])  # (B, T, 2D)
            if not fused and d < HEADS_AS_ROWS_BELOW:
                out, attention = self._class_token_heads_as_rows(q, *kv.reshape(B, T, 2, D).unbind(2))
                return self.proj(out), attention
            q = q.reshape(B, 1, H, d).transpose(1, 2)
            k, v = kv.reshape(B, T, 2, H, d).permute(2, 0, 3, 1, 4)
        else:
            kernel = self.kernel and not return_attention and not _exporting()
            bias = self.qkv.bias if kernel and self.bias_in_kernel else None  # for the kernel to add
            qkv = self.qkv(x) if bias is None else F.linear(x, self.qkv.weight)
            if kernel and cpu_kernels.supports(qkv):
                return self.proj(cpu_attention.multi_head_attention(qkv, H, self.scale, bias)), None
            if bias is not None:
                qkv = qkv + bias
            q, k, v = qkv.reshape(B, T, 3, H, d).permute(2, 0, 3, 1, 4)  # each (B, H, T, d)
        if fused and not return_attention:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
            attention = None
        else:
            attention = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, T or 1, T)
            out = attention @ v
        out = self.proj(out.transpose(1, 2).reshape(B, q.shape[2], D))
        return out, attention

    def _class_token_heads_as_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """The class token's attention, q (B, 1, D) over k, v (B, T, D), with the heads as the rows of one
        matrix: row h of (B, H, D) holds the query on head h's slice of D and zeros elsewhere, so one bmm
        against the keys gives every head's scores (B, H, T), and one against the values gives rows of which
        each keeps its own head's slice. The same numbers as the per-head form, which torch.compile on a CPU
        lowers (1-row matmuls become multiply-and-sum loops) into a slow kernel at small head sizes: fwd +
        bwd of this attention at head size 8, batch 256, fp32, Zen 4: 0.78 ms against 1.93 ms
        (benchmarks/class_token_attention.py). At head size 16 the whole `fast` step was 0.964x as fast with
        it, so the per-head form is kept from there on (benchmarks/RESULTS.md)."""
        H, D = self.heads, q.shape[-1]
        heads = torch.arange(H, device=q.device).unsqueeze(1) == torch.arange(D, device=q.device) // self.head_dim
        mask = heads.to(q.dtype)  # (H, D): 1 on each head's slice
        attention = ((q * (mask * self.scale)) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, T)
        out = ((attention @ v) * mask).sum(dim=1, keepdim=True)  # (B, 1, D)
        return out, attention.unsqueeze(2)  # attention as (B, H, 1, T), as the per-head form gives it


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


class _OneExpGELU(torch.autograd.Function):
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


# The smallest input for which "auto" GELU runs the kernel: it is a call out of the compiled graph, which costs
# more than it gains on small inputs. Compiled whole step, Intel host, against one-exp, both orders: the mid size
# (12,800 x 512 per MLP) 1.10x and 1.07x; `fast` (4,352 x 256) 1.01x and 1.00x; `seed` (1,088 x 128, fp32)
# 0.93x and 0.92x (benchmarks/RESULTS.md).
GELU_KERNEL_MIN_ELEMENTS = 1 << 21


class GELU(nn.Module):
    """The exact (erf) GELU. Where a backward may follow (training mode, gradients on), `implementation`
    picks how: "aten" = F.gelu; "one-exp" = _OneExpGELU (the same numbers to ~4e-7, a cheaper backward);
    "kernel" = the same one-exp GELU as vitscope's CPU kernel (cpu_gelu; one-exp where it cannot be built);
    "auto" = the kernel on AVX-512 CPUs for inputs of GELU_KERNEL_MIN_ELEMENTS or more, one-exp on other CPUs
    and smaller inputs, F.gelu on GPUs. Evaluation, prediction and export run F.gelu: with no backward there
    is nothing to share, and exporters know F.gelu. `forward(x, bias)` is GELU(x + bias): the kernel adds
    the bias itself (`runs_kernel` says where it will)."""

    def __init__(self, implementation: str = "auto"):
        super().__init__()
        self.implementation = implementation
        # decided here, not while torch.compile traces forward (which cannot read /proc/cpuinfo)
        wanted = implementation == "kernel" or (implementation == "auto" and cpu_kernels.faster_here())
        self.kernel = wanted and cpu_kernels.available()

    def runs_kernel(self, x: torch.Tensor, numel: int) -> bool:
        """Whether forward runs the kernel on an input of `numel` elements with x's device and dtype."""
        if not (self.kernel and self.training and torch.is_grad_enabled()) or self.implementation == "aten":
            return False
        large = numel >= GELU_KERNEL_MIN_ELEMENTS
        return (large or self.implementation == "kernel") and cpu_kernels.supports(x) and not _exporting()

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.runs_kernel(x, x.numel()):
            return cpu_gelu.gelu_with_gradient(x, bias)
        if bias is not None:
            x = x + bias
        if not (self.training and torch.is_grad_enabled()) or self.implementation == "aten":
            return F.gelu(x)
        if x.device.type != "cpu" and self.implementation == "auto":
            return F.gelu(x)
        return _OneExpGELU.apply(x)


class MLP(nn.Module):
    """fc1, GELU (or ReLU), fc2. With `bias_in_kernel`, where the GELU runs its kernel (GELU.runs_kernel) fc1
    is a plain matmul and the kernel adds fc1's bias: ATen's addmm would first copy the bias into every row of
    its output and then add the product to it, two more passes over the MLP's widest tensor."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", dropout: float = 0.0, gelu: str = "auto",
                 bias_in_kernel: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = GELU(gelu) if activation == "gelu" else nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)
        self.bias_in_kernel = bias_in_kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.bias_in_kernel and isinstance(self.act, GELU)
                and self.act.runs_kernel(x, x.numel() // x.shape[-1] * self.fc1.out_features)):
            h = self.act(F.linear(x, self.fc1.weight), self.fc1.bias)
        else:
            h = self.act(self.fc1(x))
        return self.drop(self.fc2(self.drop(h)))


class Block(nn.Module):
    """Pre-norm encoder block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0, activation: str = "gelu",
                 qkv_bias: bool = True, scale: float | None = None, attention: str = "auto", gelu: str = "auto",
                 bias_in_kernels: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias, scale=scale, implementation=attention,
                              bias_in_kernel=bias_in_kernels)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, mlp_dim, activation, dropout, gelu, bias_in_kernels)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, return_attention: bool = False, class_token_only: bool = False):
        """(B, T, D) -> (B, T, D), or (B, 1, D) with `class_token_only`: the class token's output alone, which
        needs the keys and values of every token but the rest of the block for one token only."""
        attended, attention = self.attn(self.norm1(x), return_attention, class_token_only)
        if class_token_only:
            x = x[:, :1]
        x = x + self.drop(attended)
        x = x + self.mlp(self.norm2(x))
        return x, attention


def _trunc_normal(tensor: torch.Tensor, std: float = 0.02) -> None:
    # Cut at two standard deviations, as the paper's JAX code does (torch's own default cuts at +-2
    # absolute, which for std 0.02 is no cut at all).
    nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


def _init_weights(module: nn.Module) -> None:
    # As timm and the paper's code: truncated normal (std 0.02) for linear layers, zero biases.
    if isinstance(module, nn.Linear):
        _trunc_normal(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ViT(nn.Module):
    """The paper's ViT: patch tokens, a learnable class token, learned 1D position embeddings,
    pre-norm blocks, a final LayerNorm, and a linear head on the class token. Returns logits."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.dim))
        self.pos_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config.dim, config.heads, config.mlp_dim, config.dropout, attention=config.attention,
                  gelu=config.gelu, bias_in_kernels=config.bias_in_kernels)
            for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim, eps=1e-6)
        self.head = nn.Linear(config.dim, config.num_classes)
        self.apply(_init_weights)
        _trunc_normal(self.pos_embed, config.pos_embed_std)
        _trunc_normal(self.cls_token)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> the encoder's input tokens (B, N+1, D), class token first."""
        x = self.patch_embed(x)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return self.pos_drop(torch.cat([cls, x], dim=1) + self.pos_embed)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        x = self.tokens(x)
        attentions = []
        # The head reads the class token only, so the last block need not compute the other tokens' outputs:
        # the same logits for ~1/depth less work (unless the attention maps, all of them, are asked for).
        last = len(self.blocks) - 1 if self.config.last_block_class_token_only and not return_attention else -1
        for i, block in enumerate(self.blocks):
            x, attention = block(x, return_attention, class_token_only=i == last)
            attentions.append(attention)
        logits = self.head(self.norm(x[:, 0]))
        return (logits, attentions) if return_attention else logits


class BlogViT(nn.Module):
    """The seed blog's model, quirks kept: no class token; the "position embedding" is a Linear of the
    patch pixels (so it carries no position at all); attention scaled by the embedding size instead of
    the head size; ReLU MLP without q/k/v bias; the first patch token's output is classified.
    (The blog's softmax before CrossEntropyLoss is a training-recipe field, `softmax_before_loss`.)"""

    def __init__(self, config: ViTConfig):
        super().__init__()
        config.validate()
        self.config = config
        patch_pixels = config.in_channels * config.patch_size ** 2
        self.encoder = nn.Linear(patch_pixels, config.dim)
        self.pos_embedding = nn.Linear(patch_pixels, config.dim)
        self.blocks = nn.ModuleList(
            Block(config.dim, config.heads, config.mlp_dim, config.dropout, activation="relu", qkv_bias=False,
                  scale=config.dim ** -0.5, attention=config.attention)
            for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.num_classes)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, C*P*P), patches in row-major order."""
        P = self.config.patch_size
        p = x.unfold(2, P, P).unfold(3, P, P)  # (B, C, H/P, W/P, P, P)
        return p.permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], -1, x.shape[1] * P * P)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        p = self.patches(x)
        x = self.encoder(p) + self.pos_embedding(p)
        attentions = []
        for block in self.blocks:
            x, attention = block(x, return_attention)
            attentions.append(attention)
        logits = self.head(self.norm(x)[:, 0])  # the first patch token classifies
        return (logits, attentions) if return_attention else logits


ARCHITECTURES = {"vit": ViT, "blog": BlogViT}


def build_model(config: ViTConfig) -> nn.Module:
    return ARCHITECTURES[config.architecture](config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(config: ViTConfig) -> int:
    """Multiply-adds x2 of the matmuls in one forward pass (the usual count; training is ~3x)."""
    T = config.num_patches + (1 if config.architecture == "vit" else 0)
    D, M, P = config.dim, config.mlp_dim, config.patch_size
    embed = config.num_patches * P * P * config.in_channels * D * (2 if config.architecture == "blog" else 1)
    per_block = T * D * 3 * D + 2 * T * T * D + T * D * D + 2 * T * D * M
    return 2 * (embed + config.depth * per_block + D * config.num_classes)


def executed_flops_per_image(config: ViTConfig) -> int:
    """flops_per_image less what a last block that computes the class token alone skips (its other tokens'
    queries, attention rows, projections and MLPs): the useful multiplies of the forward pass. (At head
    sizes below HEADS_AS_ROWS_BELOW the class token's scores and mix multiply heads - 1 zeros per useful
    product as well, +0.5% at the seed size; they are not counted.)"""
    if config.architecture != "vit" or not config.last_block_class_token_only or config.depth == 0:
        return flops_per_image(config)
    T, D, M = config.num_patches + 1, config.dim, config.mlp_dim
    skipped_per_token = D * D + 2 * T * D + D * D + 2 * D * M  # query, scores and mix, projection, MLP
    return flops_per_image(config) - 2 * (T - 1) * skipped_per_token


__all__ = ["ViT", "BlogViT", "build_model", "count_parameters", "executed_flops_per_image", "flops_per_image"]
