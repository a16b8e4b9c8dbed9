"""The maths behind the ViT paper's figures of what a trained model learned (Dosovitskiy et al. 2020,
Fig. 6 and Fig. 7), as pure functions on tensors: usable on any `ViT` or `BlogViT`, from Python or
through `vitscope analyze`.

    embedding_principal_components   principal components of the patch-embedding filters (Fig. 7 left)
    position_similarity              cosine similarity between position embeddings (Fig. 7 centre)
    mean_attention_distance          mean attention distance in pixels, per layer and head (Fig. 7 right)
    attention_rollout                Abnar & Zuidema 2020's rollout of attention through the layers (Fig. 6)

Attention tensors are the model's own, `model(x, return_attention=True)[1]`: one (B, H, T, T) per layer,
where T is N+1 with the class token first (ViT) or N patch tokens only (BlogViT). Which of the two a
tensor is, is read from T and the patch grid's side.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .model import BlogViT, ViT

# How `mean_attention_distance` treats the class token; written into the figure and analysis.json.
CLASS_TOKEN_TREATMENT = ("queries are patch tokens only; their attention to the class token is dropped and the "
                         "remaining weights renormalised to sum to 1")


def has_class_token(tokens: int, grid: int) -> bool:
    """Whether T tokens on a grid x grid patch grid include a class token (T = N+1) or not (T = N)."""
    if tokens == grid * grid + 1:
        return True
    if tokens == grid * grid:
        return False
    raise ValueError(f"{tokens} tokens fit neither {grid}x{grid} patches nor those plus a class token")


# ---- patch geometry ------------------------------------------------------------------------------

def patch_centres(grid: int, patch_size: int) -> torch.Tensor:
    """(N, 2) pixel coordinates (row, column) of the patch centres, patches in row-major order."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return (torch.stack([rows, cols], dim=-1).reshape(-1, 2).double() + 0.5) * patch_size


def patch_distances(grid: int, patch_size: int) -> torch.Tensor:
    """(N, N) Euclidean distances in pixels between the centres of every pair of patches."""
    centres = patch_centres(grid, patch_size)
    return (centres[:, None, :] - centres[None, :, :]).norm(dim=-1)


# ---- attention -----------------------------------------------------------------------------------

def patch_attention(attention: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, H, T, T) -> (B, H, N, N): patch queries attending to patch keys, each row summing to 1.

    With a class token, its row is dropped (it is not at a place in the image) and so is its column,
    and the weights left are renormalised: a distance to the class token has no meaning."""
    if not has_class_token(attention.shape[-1], grid):
        return attention
    patches = attention[..., 1:, 1:]
    return patches / patches.sum(dim=-1, keepdim=True)


def mean_attention_distance(attentions: Sequence[torch.Tensor], grid: int, patch_size: int,
                            queries: torch.Tensor | None = None) -> torch.Tensor:
    """(L, H) mean attention distance in pixels of every head of every layer, averaged over the batch.

    The paper's "attention distance": for a query patch q, sum_k attention(q, k) * |centre(q) - centre(k)|,
    averaged over query patches and images. Analogous to a CNN's receptive field size. The class token
    is treated as CLASS_TOKEN_TREATMENT says. `queries`, a (B, N) mask, averages over the patches it marks
    only (e.g. `ink_patches`: on MNIST an empty border patch that looks at the digit reads as "global")."""
    distances = patch_distances(grid, patch_size)  # (N, N)
    per_query = [(patch_attention(a.double(), grid) * distances).sum(dim=-1) for a in attentions]  # (B, H, N) each
    if queries is None:
        return torch.stack([d.mean(dim=(0, 2)) for d in per_query]).float()
    weight = queries.double()[:, None, :]  # (B, 1, N)
    return torch.stack([(d * weight).sum(dim=(0, 2)) / weight.sum() for d in per_query]).float()


def uniform_attention_distance(grid: int, patch_size: int, queries: torch.Tensor | None = None) -> float:
    """The mean attention distance of a head that attends to every patch equally: the reference a head's distance
    is read against. Over all queries, the mean distance between two patch centres (a patch with itself
    included); over the queries a (B, N) mask marks, the mean of those queries' mean distance to every patch
    (central patches have nearer neighbours, so this is smaller)."""
    to_every_patch = patch_distances(grid, patch_size).mean(dim=1)  # (N,)
    if queries is None:
        return to_every_patch.mean().item()
    weight = queries.double()
    return ((weight @ to_every_patch).sum() / weight.sum()).item()


INK_THRESHOLD = 0.1  # a patch is "ink" when at least this share of its pixels is at least half bright


def ink_patches(images: torch.Tensor, patch_size: int, threshold: float = INK_THRESHOLD) -> torch.Tensor:
    """(B, N) bool: the patches of uint8 images (B, H, W) (or (B, 1, H, W)) that hold part of the digit, in the
    model's row-major patch order."""
    pixels = images.reshape(images.shape[0], 1, images.shape[-2], images.shape[-1]).float()
    share = F.avg_pool2d((pixels >= 128).float(), patch_size)  # (B, 1, grid, grid)
    return (share >= threshold).flatten(1)


def class_token_attention(attentions: Sequence[torch.Tensor], grid: int) -> torch.Tensor | None:
    """(L, H) mean weight the patch queries of each head put on the class token, averaged over the batch:
    the part that `mean_attention_distance` drops. None when there is no class token."""
    if not has_class_token(attentions[0].shape[-1], grid):
        return None
    return torch.stack([a[..., 1:, 0].double().mean(dim=(0, 2)) for a in attentions]).float()


def attention_rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, T, T) attention rollout (Abnar & Zuidema 2020): how much each output token draws on each input token.

    Per layer: average the heads, add the identity for the residual connection, renormalise the rows;
    then multiply through the layers, last on the left: A_L ... A_2 A_1."""
    rollout = None
    for attention in attentions:
        a = attention.double().mean(dim=1)  # (B, T, T)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout.float()


def rollout_map(rollout: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, T, T) rollout -> (B, grid, grid): the row of the token the head reads (the class token, or for
    BlogViT the first patch token), over the patches only, renormalised to sum to 1."""
    row = rollout[:, 0, 1:] if has_class_token(rollout.shape[-1], grid) else rollout[:, 0, :]
    row = row / row.sum(dim=-1, keepdim=True)
    return row.reshape(-1, grid, grid)


# ---- embeddings ----------------------------------------------------------------------------------

def patch_embedding_filters(model: ViT | BlogViT) -> torch.Tensor:
    """(D, C, P, P) the linear patch embedding's filters: one PxP image per embedding dimension."""
    config = model.config
    shape = (config.dim, config.in_channels, config.patch_size, config.patch_size)
    if isinstance(model, BlogViT):
        # BlogViT embeds a patch p as encoder(p) + pos_embedding(p): two Linears of the same pixels, so its
        # filters are the sum of their weights. Neither alone is meaningful: both get the same gradient, so
        # their difference stays at its random initialisation. Pixels are laid out (C, P, P) by .patches.
        return (model.encoder.weight + model.pos_embedding.weight).detach().cpu().reshape(shape)
    return model.patch_embed.proj.weight.detach().cpu().reshape(shape)


def embedding_principal_components(model: ViT | BlogViT) -> tuple[torch.Tensor, torch.Tensor]:
    """(components (K, C, P, P), explained variance ratio (K,)) of the D patch-embedding filters, by PCA:
    filters as D samples of C*P*P pixels, mean filter removed, K = min(D, C*P*P) components, strongest first.
    The paper's Fig. 7 left shows the first 28 of ViT-L/32's. A component's sign is arbitrary."""
    filters = patch_embedding_filters(model)
    flat = filters.reshape(filters.shape[0], -1).double()
    _, singular_values, components = torch.linalg.svd(flat - flat.mean(dim=0), full_matrices=False)
    variance = singular_values ** 2
    ratio = variance / variance.sum()
    return components.float().reshape(-1, *filters.shape[1:]), ratio.float()


def position_embeddings(model: ViT | BlogViT) -> torch.Tensor | None:
    """(N, D) the learned position embeddings of the patch tokens (the class token's dropped), or None for
    BlogViT, whose "position embedding" is a Linear of the patch pixels and so encodes no position."""
    if isinstance(model, BlogViT):
        return None
    return model.pos_embed.detach().cpu()[0, 1:]


def position_similarity(model: ViT) -> torch.Tensor:
    """(N, N) cosine similarity of every patch position's embedding with every other's (Fig. 7 centre);
    row i reshaped to the patch grid shows which places position i's embedding resembles."""
    embeddings = position_embeddings(model)
    if embeddings is None:
        raise ValueError(f"{type(model).__name__} has no position embedding")
    unit = F.normalize(embeddings.double(), dim=-1)
    return (unit @ unit.T).float()


def similarity_by_relation(similarity: torch.Tensor, grid: int) -> dict[str, float]:
    """Mean similarity of pairs of distinct positions in the same row, in the same column, and in neither:
    how much row/column structure the position embeddings learned (the paper sees it in ImageNet ViTs)."""
    index = torch.arange(grid * grid)
    rows, cols = index // grid, index % grid
    same_row = rows[:, None] == rows[None, :]
    same_col = cols[:, None] == cols[None, :]
    distinct = index[:, None] != index[None, :]
    groups = {"same_row": same_row & distinct, "same_column": same_col & distinct,
              "other": ~same_row & ~same_col}
    return {name: similarity[mask].mean().item() for name, mask in groups.items()}


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts: row = true class, column = predicted class."""
    return torch.bincount(labels * num_classes + predictions, minlength=num_classes ** 2).reshape(num_classes,
                                                                                                  num_classes)
