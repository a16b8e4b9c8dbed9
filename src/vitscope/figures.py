"""The figures of `vitscope analyze`: the ViT paper's Fig. 6 and Fig. 7 for an MNIST-sized model, plus a
confusion matrix and the worst test errors. Each function draws numbers it is given into one PNG."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

DPI = 110


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], dpi: float | None = None, **kwargs):
    """pyplot.subplots without pyplot: a Figure of its own that draws to PNG through Agg whatever the process's
    backend, so vitscope never sets or needs one (a notebook's stays as it was), and nothing to close."""
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _grid_shape(count: int, columns: int) -> tuple[int, int]:
    columns = min(columns, count)
    return math.ceil(count / columns), columns


def plot_embedding_filters(components: torch.Tensor, explained_variance: torch.Tensor, path: Path,
                           count: int = 16) -> Path:
    """The first `count` principal components (K, C, P, P) as PxP images, each with its explained variance."""
    count = min(count, len(components))
    rows, cols = _grid_shape(count, 8)
    fig, axes = subplots(rows, cols, figsize=(1.35 * cols, 1.55 * rows + 0.5), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= count:
            continue
        C, P, _ = components[i].shape
        image = components[i].permute(1, 0, 2).reshape(P, C * P).numpy()  # channels side by side
        limit = np.abs(image).max()
        ax.imshow(image, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_title(f"PC{i + 1}  {explained_variance[i]:.1%}", fontsize=8)
    P = components.shape[-1]
    shown = explained_variance[:count].sum().item()
    fig.suptitle(f"Patch-embedding filters ({P}x{P}): first {count} principal components, "
                 f"{shown:.0%} of the variance\n(red positive, blue negative; each scaled to its own range, "
                 "sign arbitrary)", fontsize=9)
    return _save(fig, path)


def plot_position_similarity(similarity: torch.Tensor | None, grid: int, path: Path, note: str = "",
                             by_relation: dict[str, float] | None = None) -> Path:
    """A grid x grid array of small heatmaps: tile (r, c) shows the cosine similarity of position (r, c)'s
    embedding with every position's; `by_relation` (analysis.similarity_by_relation), the reference a reader
    needs, is written under the title. With `similarity` None, the figure says `note` instead."""
    if similarity is None:
        fig, ax = subplots(figsize=(5.5, 2.2))
        ax.axis("off")
        ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True, fontsize=10)
        ax.set_title("Position embedding similarity", fontsize=11)
        return _save(fig, path)
    fig, axes = subplots(grid, grid, figsize=(0.9 * grid + 1.4, 0.9 * grid + 0.8), squeeze=False,
                         gridspec_kw={"wspace": 0.08, "hspace": 0.08})
    tiles = similarity.reshape(grid, grid, grid, grid).numpy()
    for r in range(grid):
        for c in range(grid):
            ax = axes[r, c]
            image = ax.imshow(tiles[r, c], cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(str(r + 1), fontsize=8, rotation=0, labelpad=8)
            if r == grid - 1:
                ax.set_xlabel(str(c + 1), fontsize=8)
    fig.supylabel("input patch row", fontsize=9)
    fig.supxlabel("input patch column", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity")
    title = "Position embedding similarity"
    if by_relation:
        title += (f"\nmean cosine similarity of two positions in the same row {by_relation['same_row']:+.2f}, "
                  f"same column {by_relation['same_column']:+.2f},\nneither {by_relation['other']:+.2f}: "
                  "rows and columns are learned where the first two stand above the third")
    fig.suptitle(title, fontsize=11 if not by_relation else 9)
    return _save(fig, path)


def plot_attention_distance(panels: list[tuple[str, torch.Tensor, float]], path: Path, patch_size: int,
                            images: int, class_token: str) -> Path:
    """One panel per (title, distances (L, H) in pixels, uniform-attention distance) in `panels`: one dot per head
    at its layer's depth, the distance uniform attention would give as a dashed line, and on the right axis the
    distance as a multiple of it. `class_token` says how the class token was treated."""
    fig, axes = subplots(1, len(panels), figsize=(6.3 * len(panels), 4.4), squeeze=False,
                         gridspec_kw={"wspace": 0.45})
    top = max(max(d.max().item(), u) for _, d, u in panels) * 1.1 + 1
    for ax, (title, distances, uniform) in zip(axes[0], panels):
        layers, heads = distances.shape
        colours = matplotlib.colormaps["tab10"](np.arange(heads) % 10)
        for h in range(heads):
            # A small sideways offset per head, so heads at the same distance stay visible.
            x = np.arange(1, layers + 1) + (h - (heads - 1) / 2) * 0.04
            ax.scatter(x, distances[:, h].numpy(), color=colours[h], label=f"head {h + 1}", s=30, zorder=3)
        ax.axhline(uniform, color="grey", linestyle="--", linewidth=1)
        ax.text(0.55, uniform, f" uniform attention {uniform:.1f} px", color="grey", fontsize=8, va="bottom")
        ax.set_xticks(range(1, layers + 1))
        ax.set_xlim(0.5, layers + 0.5)
        ax.set_ylim(0, top)
        ax.set_xlabel("network depth (layer)")
        ax.set_ylabel("mean attention distance (pixels)")
        ax.secondary_yaxis("right", functions=(lambda d, u=uniform: d / u, lambda r, u=uniform: r * u)) \
            .set_ylabel("x uniform attention", color="grey")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right", ncol=2 if heads > 4 else 1)
    fig.suptitle(f"Mean attention distance per head ({images} test images, {patch_size}x{patch_size} patches)",
                 fontsize=11)
    fig.text(0.5, -0.02, f"Class token: {class_token}.", ha="center", va="top", fontsize=7.5, wrap=True)
    return _save(fig, path)


def plot_attention_rollout(images: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor,
                           predictions: torch.Tensor, path: Path, reader: str) -> Path:
    """Each digit (B, H, W) beside itself with its rollout map (B, grid, grid) laid over it."""
    count = len(images)
    rows, cols = _grid_shape(count, 6)
    fig, axes = subplots(2 * rows, cols, figsize=(1.45 * cols, 2.9 * rows + 0.6), squeeze=False,
                         gridspec_kw={"hspace": 0.12, "wspace": 0.05})
    size = images.shape[-1]
    for i in range(rows * cols):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        top.axis("off")
        bottom.axis("off")
        if i >= count:
            continue
        top.imshow(images[i].numpy(), cmap="gray", vmin=0, vmax=255)
        verdict = "" if labels[i] == predictions[i] else f" -> {predictions[i].item()}"
        top.set_title(f"{labels[i].item()}{verdict}", fontsize=9, color="black" if not verdict else "red")
        # One map pixel per patch, stretched over the image unsmoothed (interpolating a 4x4 map draws bands
        # that are not there); the digit is drawn as an outline so that it does not brighten the map.
        bottom.imshow(maps[i].numpy(), cmap="inferno", interpolation="nearest",
                      extent=(-0.5, size - 0.5, size - 0.5, -0.5), vmin=0, vmax=maps[i].max().item())
        bottom.contour(images[i].numpy(), levels=[128], colors="cyan", linewidths=0.8)
    fig.suptitle(f"Attention rollout of the {reader} over sample test digits\n(top: input with its label, "
                 "and the prediction in red when wrong; bottom: rollout, bright = attended, digit outlined)",
                 fontsize=9)
    return _save(fig, path)


def plot_confusion_matrix(matrix: torch.Tensor, path: Path) -> Path:
    """Counts (K, K), rows true, columns predicted; colour on a compressed scale so that rare errors show."""
    K = matrix.shape[0]
    fig, ax = subplots(figsize=(0.5 * K + 2.2, 0.5 * K + 1.6))
    norm = PowerNorm(0.3, vmin=0, vmax=max(1, matrix.max().item()))
    ax.imshow(matrix.numpy(), cmap="Blues", norm=norm)
    errors = matrix.sum().item() - matrix.diag().sum().item()
    for t in range(K):
        for p in range(K):
            n = matrix[t, p].item()
            if n:
                dark = norm(n) > 0.6
                ax.text(p, t, str(n), ha="center", va="center", fontsize=7 if n < 1000 else 6,
                        color="white" if dark else ("black" if t == p else "firebrick"))
    ax.set_xticks(range(K))
    ax.set_yticks(range(K))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix: {errors} errors in {matrix.sum().item()} test images", fontsize=10)
    return _save(fig, path)


def plot_misclassified(images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor,
                       confidences: torch.Tensor, path: Path, total_errors: int) -> Path:
    """The given wrong predictions, most confident first, each titled true -> predicted (confidence)."""
    if len(images) == 0:
        fig, ax = subplots(figsize=(5, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "No misclassified test images.", ha="center", va="center", fontsize=11)
        return _save(fig, path)
    rows, cols = _grid_shape(len(images), 8)
    fig, axes = subplots(rows, cols, figsize=(1.25 * cols, 1.45 * rows + 0.5), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i].numpy(), cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{labels[i].item()} -> {predictions[i].item()}  {confidences[i]:.0%}", fontsize=8)
    fig.suptitle(f"The {len(images)} most confident of {total_errors} test errors (true -> predicted, confidence)",
                 fontsize=10)
    return _save(fig, path)
