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


def scores(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """{"test_acc", "test_loss", "n"} from logits already computed."""
    return {"test_acc": (logits.argmax(1) == labels).float().mean().item(),
            "test_loss": F.cross_entropy(logits, labels).item(), "n": len(labels)}
