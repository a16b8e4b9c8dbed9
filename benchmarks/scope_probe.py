"""What a trained run shows of the paper's Fig. 7, as one JSON row: test accuracy and training time (from
metrics.jsonl), per-layer min/max mean attention distance over all patch queries and over ink queries only,
each against uniform attention, and the position embeddings' mean cosine similarity by relation.

    python benchmarks/scope_probe.py RUN [--images 2000] [--label NAME] [--append FILE.jsonl]

The rows of docs/performance.md#scope-preset were made with this (results/scope-*.jsonl).
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from vitscope.analysis import (
    ink_patches,
    mean_attention_distance,
    position_similarity,
    similarity_by_relation,
    uniform_attention_distance,
)
from vitscope.data import normalize
from vitscope.rundir import RunDir, load_run


@torch.inference_mode()
def probe(run_path: str, images: int) -> dict:
    run = RunDir(run_path).require()
    dataset = run.dataset(None)
    model, config = load_run(run.path)
    model.eval()
    grid = config.image_size // config.patch_size
    x = dataset.test_images[:images]
    _, attentions = model(normalize(x, config.pixel_mean, config.pixel_std), return_attention=True)
    uniform = uniform_attention_distance(grid, config.patch_size)
    every = mean_attention_distance(attentions, grid, config.patch_size) / uniform  # (L, H)
    ink_queries = ink_patches(x, config.patch_size)
    ink_uniform = uniform_attention_distance(grid, config.patch_size, ink_queries)
    ink = mean_attention_distance(attentions, grid, config.patch_size, ink_queries) / ink_uniform
    metrics = run.read_metrics()
    record = run.read_config()
    rel = similarity_by_relation(position_similarity(model), grid)
    return {
        "run": run.path.name, "model": record["model"], "train": record["train"],
        "test_acc": metrics[-1]["test_acc"], "train_seconds": round(sum(m["seconds"] for m in metrics), 1),
        "uniform_px": round(uniform, 3), "ink_uniform_px": round(ink_uniform, 3),
        "distance_over_uniform": [[round(v, 3) for v in row] for row in every.tolist()],
        "ink_distance_over_uniform": [[round(v, 3) for v in row] for row in ink.tolist()],
        "per_layer_min_max": [[round(r.min().item(), 3), round(r.max().item(), 3)] for r in every],
        "ink_per_layer_min_max": [[round(r.min().item(), 3), round(r.max().item(), 3)] for r in ink],
        "position_similarity": {k: round(v, 4) for k, v in rel.items()},
        "row_minus_other": round(rel["same_row"] - rel["other"], 4),
        "column_minus_other": round(rel["same_column"] - rel["other"], 4),
        "images": images, "host": platform.node() and record.get("hardware"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--label", default="")
    parser.add_argument("--append", type=Path)
    args = parser.parse_args()
    row = {"label": args.label, **probe(args.run, args.images)}
    print(json.dumps({k: row[k] for k in ("label", "test_acc", "train_seconds", "per_layer_min_max",
                                           "ink_per_layer_min_max", "row_minus_other", "column_minus_other")}))
    if args.append:
        with args.append.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
