"""Microseconds per batch of each batched augmentation, on the CPU, median over timed windows.

    python benchmarks/augment_time.py                    # the seed preset's batch (64) and fast's (256)
    python benchmarks/augment_time.py --batch 256 --json

Also times random_shift's earlier form (a gather through a (B, H*W) tensor of flat indices, replaced in
8e46e67 by one pick from an unfolded view) beside it, and checks that both give the same bytes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vitscope import data


def shift_by_flat_indices(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """random_shift as it was before 8e46e67, for comparison."""
    B, H, W = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    Hp, Wp = H + 2 * max_shift, W + 2 * max_shift
    offsets = torch.randint(0, 2 * max_shift + 1, (2, B), generator=generator)
    corner = torch.arange(B) * (Hp * Wp) + offsets[0] * Wp + offsets[1]
    within = (torch.arange(H)[:, None] * Wp + torch.arange(W)).flatten()
    return padded.flatten()[corner[:, None] + within].view(B, H, W)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--windows", type=int, default=7)
    ap.add_argument("--calls", type=int, default=200, help="calls per window")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    forms = {  # name: (function, its setting as the presets use it)
        "shift 2 px (seed)": (data.random_shift, 2),
        "shift 2 px, flat-index gather (before)": (shift_by_flat_indices, 2),
        "shift 1 px (fast)": (data.random_shift, 1),
        "shift 1 px, flat-index gather (before)": (shift_by_flat_indices, 1),
        "rotate 12 deg + scale 15% (fast)": (lambda x, _, g: data.random_rotate_scale(x, 12.0, 0.15, g), None),
        "stroke 1 px": (data.random_stroke, 1.0),
        "close 1 px": (data.random_close, 1),
    }
    for batch in args.batch:
        images = torch.randint(0, 256, (batch, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        for shift in (1, 2):
            same = torch.equal(data.random_shift(images, shift, torch.Generator().manual_seed(1)),
                               shift_by_flat_indices(images, shift, torch.Generator().manual_seed(1)))
            assert same, f"the two shifts differ at {shift} px"
        times = {name: [] for name in forms}
        for _ in range(args.windows):  # windows go round the forms, so drift reaches each alike
            for name, (fn, setting) in forms.items():
                generator = torch.Generator().manual_seed(2)
                start = time.perf_counter()
                for _ in range(args.calls):
                    fn(images, setting, generator)
                times[name].append((time.perf_counter() - start) / args.calls * 1e6)
        for name, values in times.items():
            row = {"form": name, "batch": batch, "us": round(statistics.median(values), 1),
                   "threads": torch.get_num_threads()}
            print(json.dumps(row) if args.json else f"batch {batch:4d}  {name:42s} {row['us']:8.1f} us")


if __name__ == "__main__":
    main()
