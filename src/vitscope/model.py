"""The Vision Transformer of Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words", sized for MNIST.

Parameter names and shapes follow timm's VisionTransformer (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.i.attn.qkv`, ...), so weights map one-to-one onto other implementations. `BlogViT` is the seed blog's
model with its quirks kept, as the comparison row.

This file is the paper and nothing else. `build_model(config, runtime)` hands the model to fastpath.py, which
swaps in faster CPU computations of the same numbers where a RuntimeConfig asks for them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import RuntimeConfig, ViTConfig


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping PxP patches and project each to `dim`. The weight is a strided Conv2d's,
    as in timm, applied as one matmul over the flattened patches: the same numbers, and a cheaper backward (the
    convolution's also computes the pixels' gradient; docs/performance.md#patch-embedding)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.in_channels, config.dim, config.patch_size, stride=config.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        P = self.proj.stride[0]
        patches = x.reshape(B, C, H // P, P, W // P, P).permute(0, 2, 4, 1, 3, 5)  # (B, H/P, W/P, C, P, P)
        return F.linear(patches.reshape(B, -1, C * P * P), self.proj.weight.flatten(1), self.proj.bias)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention: per head softmax(Q K^T * scale) V, the heads concatenated, then a projection.

    `fused` computes it with F.scaled_dot_product_attention; the explicit form runs whenever the attention
    weights are asked for (the same logits). `scale` defaults to 1/sqrt(head size), as in the paper."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, scale: float | None = None, fused: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = scale if scale is not None else self.head_dim ** -0.5
        self.fused = fused
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """(B, T, D) -> (B, T, D), and the attention weights (B, H, T, T) or None."""
        q, k, v = self.split_heads(self.qkv(x), 3)
        out, attention = self.attend(q, k, v, fused=self.fused and not return_attention)
        return self.proj(self.merge_heads(out)), attention

    def split_heads(self, x: torch.Tensor, parts: int) -> torch.Tensor:
        """(B, T, parts * D) -> (parts, B, H, T, head size)."""
        B, T, _ = x.shape
        return x.reshape(B, T, parts, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)

    @staticmethod
    def merge_heads(x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, head size) -> (B, T, D), the heads side by side."""
        B, H, T, d = x.shape
        return x.transpose(1, 2).reshape(B, T, H * d)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fused: bool):
        """Every head's softmax(Q K^T * scale) V, (B, H, Tq, d), and the weights (B, H, Tq, T) unless fused."""
        if fused:
            return F.scaled_dot_product_attention(q, k, v, scale=self.scale), None
        attention = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return attention @ v, attention


class MLP(nn.Module):
    """fc1, GELU (the exact, erf form; ReLU in the blog's model), fc2."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm encoder block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0, activation: str = "gelu",
                 qkv_bias: bool = True, scale: float | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias, scale=scale)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, mlp_dim, activation, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        attended, attention = self.attn(self.norm1(x), return_attention)
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
        self.blocks = nn.ModuleList(Block(config.dim, config.heads, config.mlp_dim, config.dropout)
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
        """Images (B, C, H, W) -> logits (B, classes); with `return_attention` also each block's attention
        weights (B, H, N+1, N+1)."""
        x = self.tokens(x)
        attentions = []
        for block in self.blocks:
            x, attention = block(x, return_attention)
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
                  scale=config.dim ** -0.5)
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


def build_model(config: ViTConfig, runtime: RuntimeConfig | None = None) -> nn.Module:
    """The model of `config`; with `runtime`, computed by the fast paths it asks for (fastpath.accelerate)."""
    model = ARCHITECTURES[config.architecture](config)
    if runtime is None:
        return model
    from .fastpath import accelerate  # the seam: the paper's model above, the speed work behind it

    return accelerate(model, runtime)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(config: ViTConfig) -> int:
    """Multiply-adds x2 of the matmuls in one forward pass (the usual count; training is ~3x)."""
    T = config.num_patches + (1 if config.architecture == "vit" else 0)
    D, M, P = config.dim, config.mlp_dim, config.patch_size
    embed = config.num_patches * P * P * config.in_channels * D * (2 if config.architecture == "blog" else 1)
    per_block = T * D * 3 * D + 2 * T * T * D + T * D * D + 2 * T * D * M
    return 2 * (embed + config.depth * per_block + D * config.num_classes)


__all__ = ["ViT", "BlogViT", "build_model", "count_parameters", "flops_per_image"]
