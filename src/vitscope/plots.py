"""Training curves: the seed blog's two figures, accuracy and loss per epoch, train beside test."""
from __future__ import annotations

from pathlib import Path

from .figures import subplots


def plot_training_curves(history: list[dict], folder: Path, title: str = "") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    epochs = [row["epoch"] for row in history]
    written = []
    for metric, ylabel in (("acc", "accuracy"), ("loss", "loss")):
        fig, ax = subplots(figsize=(6, 4), dpi=120)
        ax.plot(epochs, [row[f"train_{metric}"] for row in history], "o-", label="train", markersize=3)
        ax.plot(epochs, [row[f"test_{metric}"] for row in history], "s-", label="test", markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        final = f"final test {history[-1]['test_acc']:.2%}" if metric == "acc" and history else ""
        ax.set_title(f"{title}  {final}".strip())
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = folder / f"{'accuracy' if metric == 'acc' else 'loss'}.png"
        fig.savefig(path)
        written.append(path)
    return written
