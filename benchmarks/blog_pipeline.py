"""The seed blog's own training pipeline, as its post describes it: the comparison row of epoch_time.py.

    python benchmarks/blog_pipeline.py                                  # 20 epochs, as the blog trains
    python benchmarks/blog_pipeline.py --epochs 1 --no-test --out blog.jsonl
    python benchmarks/blog_pipeline.py --epochs 1 --max-steps 300 --no-test    # a short check

Everything that makes it the blog's, and slow on a CPU, is kept:
- a torchvision-style MNIST dataset that decodes each item when it is asked for: the uint8 image becomes a
  PIL image, then ToTensor (a float tensor in [0, 1]), then Normalize((0.5,), (0.5,)), one image at a time;
- torch.utils.data.DataLoader: batch 64, shuffled, the last partial batch dropped, no worker processes;
- the blog's model: no class token; a "position embedding" that is a second Linear of the patch pixels (so it
  carries no position); heads as separate modules whose scores are scaled by the embedding size, not the head
  size; a ReLU MLP; the first patch token classifies; softmax inside the model, and CrossEntropyLoss on top;
- Adam at 3e-4, constant.
torchvision is not needed (its wheels import only beside their own torch): its two transforms are written here
with numpy and torch, computing what torchvision computes. MNIST is read from vitscope's verified cache
(`vitscope data` fills it) or from --data-dir.

One JSON line per epoch: epoch, steps, train_loss, train_acc, test_acc (null with --no-test), seconds (the
training loop alone; the test evaluation is left out).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

N_EMBD = 32  # the blog's n_embd
DROPOUT = 0.0  # the post uses `dropout` without ever setting it


# ---- data, as torchvision.datasets.MNIST with ToTensor and Normalize((0.5,), (0.5,)) delivers it ------------

def to_tensor(image: Image.Image) -> torch.Tensor:
    """transforms.ToTensor on a grayscale PIL image: (1, H, W) float32 in [0, 1]."""
    pixels = torch.from_numpy(np.array(image, np.uint8, copy=True))
    return pixels.view(image.size[1], image.size[0], 1).permute(2, 0, 1).contiguous().float().div(255)


def normalize(tensor: torch.Tensor, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """transforms.Normalize((mean,), (std,)): a new tensor, (x - mean) / std per channel."""
    return tensor.clone().sub_(mean).div_(std)


class MNIST(torch.utils.data.Dataset):
    """One split of MNIST that decodes per item, as torchvision's dataset does: uint8 array -> PIL -> tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels  # uint8 (N, 28, 28), int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[index].numpy())
        return normalize(to_tensor(image)), int(self.labels[index])


# ---- the blog's model, its names and its quirks kept ------------------------------------------------------------

class Head(nn.Module):
    """One head of self-attention, scaled by the embedding size C (the blog's), not the head size."""

    def __init__(self, head_size: int):
        super().__init__()
        self.key = nn.Linear(N_EMBD, head_size, bias=False)
        self.query = nn.Linear(N_EMBD, head_size, bias=False)
        self.value = nn.Linear(N_EMBD, head_size, bias=False)
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[-1]
        weights = self.query(x) @ self.key(x).transpose(-2, -1) * C ** -0.5  # (B, T, T)
        weights = self.dropout(F.softmax(weights, dim=-1))
        return weights @ self.value(x)  # (B, T, head_size)


class MultiHeadAttention(nn.Module):
    def __init__(self, num_heads: int, head_size: int):
        super().__init__()
        self.heads = nn.ModuleList(Head(head_size) for _ in range(num_heads))
        self.proj = nn.Linear(N_EMBD, N_EMBD)
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(torch.cat([head(x) for head in self.heads], dim=-1)))


class FeedForward(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd),
                                 nn.Dropout(DROPOUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.sa = MultiHeadAttention(n_head, n_embd // n_head)
        self.ffwd = FeedForward(n_embd)
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.sa(self.ln1(x))
        return x + self.ffwd(self.ln2(x))


class VisionTransformer(nn.Module):
    """The blog's ViT: 16 patches of 7x7, no class token, probabilities out."""

    def __init__(self, patch_size: int = 7, n_embd: int = N_EMBD, depth: int = 3, n_head: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.encoder = nn.Linear(patch_size ** 2, n_embd)
        self.pos_embedding = nn.Linear(patch_size ** 2, n_embd)  # a Linear of the pixels, not of the position
        self.blocks = nn.Sequential(*(Block(n_embd, n_head) for _ in range(depth)))
        self.ln_f = nn.LayerNorm(n_embd)
        self.vit_head = nn.Linear(n_embd, 10)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        P = self.patch_size
        patches = imgs.unfold(2, P, P).unfold(3, P, P)  # (B, 1, 4, 4, P, P)
        patches = patches.contiguous().view(imgs.shape[0], -1, P * P)  # (B, 16, 49); the blog wrote view(64, 16, 49)
        x = self.encoder(patches) + self.pos_embedding(patches)
        x = self.vit_head(self.ln_f(self.blocks(x)))
        return torch.softmax(x[:, 0], dim=1)  # the first patch token classifies; the loss gets probabilities


# ---- the blog's training loop -----------------------------------------------------------------------------------

def train_epoch(model, loader, criterion, optimizer, max_steps: int | None) -> dict:
    model.train()
    correct = total = steps = 0
    loss_sum = 0.0
    start = time.perf_counter()
    for images, labels in loader:
        outputs = model(images)
        loss = criterion(outputs, labels)  # CrossEntropyLoss of probabilities: the blog's softmax twice
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        correct += (outputs.argmax(1) == labels).sum().item()
        total += labels.size(0)
        loss_sum += loss.item()
        steps += 1
        if max_steps is not None and steps >= max_steps:
            break
    seconds = time.perf_counter() - start
    return {"steps": steps, "train_loss": loss_sum / steps, "train_acc": correct / total, "seconds": seconds}


@torch.no_grad()
def test_accuracy(model, dataset) -> float:
    model.eval()
    correct = sum((model(images).argmax(1) == labels).sum().item()
                  for images, labels in DataLoader(dataset, batch_size=1000))
    return correct / len(dataset)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20, help="default 20, the blog's")
    ap.add_argument("--max-steps", type=int, help="stop each epoch after this many steps (default: the whole epoch)")
    ap.add_argument("--no-test", action="store_true", help="skip the test-set accuracy after each epoch")
    ap.add_argument("--data-dir", help="folder with MNIST's IDX files (default: vitscope's cache)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0, help="for the initialisation and the shuffling (default 0)")
    ap.add_argument("--out", help="also write the JSON lines to this file")
    args = ap.parse_args()
    if args.max_steps is not None and args.max_steps < 1:
        ap.error("--max-steps must be at least 1")

    from vitscope.data import load_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    mnist = load_dataset("mnist", args.data_dir)
    train_set = MNIST(mnist.train_images, mnist.train_labels)
    test_set = MNIST(mnist.test_images, mnist.test_labels)
    loader = DataLoader(train_set, batch_size=64, shuffle=True, drop_last=True)
    model = VisionTransformer()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    log = open(args.out, "w") if args.out else None
    for epoch in range(1, args.epochs + 1):
        row = {"epoch": epoch, **train_epoch(model, loader, criterion, optimizer, args.max_steps)}
        row["test_acc"] = None if args.no_test else test_accuracy(model, test_set)
        line = json.dumps(row)
        print(line, flush=True)
        if log:
            log.write(line + "\n")
            log.flush()
    if log:
        log.close()


if __name__ == "__main__":
    main()
