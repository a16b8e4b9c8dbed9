"""Batched inference over a whole in-memory split: logits, accuracy and loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import normalize
from .device import autocast


@torch.inference_mode()
def logits_of(model: torch.nn.Module, images: torch.Tensor, mean: float, std: float, batch_size: int = 1000,
              device: torch.device | str = "cpu", precision: str = "fp32") -> torch.Tensor:
    """uint8 images (N, H, W) -> fp32 logits (N, num_classes) on the CPU, in big batches."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size].to(device, non_blocking=True), mean, std)
        with autocast(device, precision):
            out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float,
             batch_size: int = 1000, device: torch.device | str = "cpu", precision: str = "fp32") -> dict:
    """{"test_acc", "test_loss", "n"}: accuracy, mean cross-entropy of the logits, number of images."""
    return scores(logits_of(model, images, mean, std, batch_size, device, precision), labels)


def score_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(summed cross-entropy, correct predictions, images) as float64 (3,): what the parts of a split, scored by
    different processes, add up to."""
    if len(labels) == 0:
        return torch.zeros(3, dtype=torch.float64)
    return torch.tensor([F.cross_entropy(logits, labels, reduction="sum").item(),
                         (logits.argmax(1) == labels).sum().item(), len(labels)], dtype=torch.float64)


def scores_from_sums(sums: torch.Tensor) -> dict:
    """{"test_acc", "test_loss", "n"} from `score_sums` (added over the parts of a split)."""
    loss, correct, n = sums.tolist()
    # The accuracy in float32, as (predictions == labels).float().mean() computes it.
    accuracy = (torch.tensor(correct, dtype=torch.float32) / n).item() if n else float("nan")
    return {"test_acc": accuracy, "test_loss": loss / n if n else float("nan"), "n": int(n)}


def scores(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """{"test_acc", "test_loss", "n"} from logits already computed."""
    return scores_from_sums(score_sums(logits, labels))
