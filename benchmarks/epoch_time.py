"""Seconds per training epoch at batch 64: the seed blog's own pipeline against vitscope's presets.

    benchmarks/.venv-peers/bin/python benchmarks/epoch_time.py [--repeats 3] [--json]

The blog's pipeline is ../shared/seed/blog_reconstructed.py (torchvision's MNIST dataset and DataLoader
with ToTensor/Normalize, its own model), so it runs in the environment benchmarks/setup_env.sh makes, and
vitscope is timed in the same one: the ratio compares pipelines, not torch builds. Each repeat runs one
epoch of each, in turn, as separate processes; the training loop's own seconds are compared (the
test-set evaluation is left out on both sides). vitscope's presets run 2 epochs and their second is
timed: a preset's 20-epoch run compiles its step (compile = "auto"), which the first epoch pays for once
(its seconds are reported as first_epoch_seconds). MNIST is read from vitscope's cache (`vitscope data`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOG_SCRIPT = ROOT.parent / "shared" / "seed" / "blog_reconstructed.py"


def blog_epoch(data_root: Path, work: Path) -> float:
    out = work / "blog.jsonl"
    subprocess.run([sys.executable, str(BLOG_SCRIPT), "--epochs", "1", "--data", str(data_root), "--out", str(out)],
                   check=True, capture_output=True, text=True)
    return json.loads(out.read_text().splitlines()[-1])["seconds"]


def vitscope_epoch(preset: str, work: Path, repeat: int) -> tuple[float, float]:
    """(seconds of the second epoch, of the first) of a 2-epoch run of the preset, which compiles as its
    20-epoch run does: the second epoch is the steady state, the first also carries the compilation."""
    run = work / f"{preset}-{repeat}"
    subprocess.run([sys.executable, "-m", "vitscope", "train", "--preset", preset, "--epochs", "2", "--out", str(run),
                    "--no-progress"], check=True, capture_output=True, text=True)
    first, second = (json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines())
    return second, first


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--presets", default="seed,blog")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import torch

    from vitscope.data import SPLITS, cache_root, load_dataset
    from vitscope.device import cpu_name

    load_dataset("mnist")  # fetched and verified into the cache if it is not there yet
    seconds: dict[str, list[float]] = {"blog pipeline": []} | {f"vitscope {p}": [] for p in args.presets.split(",")}
    first_epochs: dict[str, list[float]] = {name: [] for name in seconds if name != "blog pipeline"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        raw = work / "MNIST" / "raw"  # torchvision's layout, pointing at vitscope's verified cache
        raw.mkdir(parents=True)
        for stem in SPLITS.values():
            (raw / stem).symlink_to(cache_root() / "mnist" / stem)
        for repeat in range(args.repeats):
            seconds["blog pipeline"].append(blog_epoch(work, work))
            for preset in args.presets.split(","):
                steady, first = vitscope_epoch(preset, work, repeat)
                seconds[f"vitscope {preset}"].append(steady)
                first_epochs[f"vitscope {preset}"].append(first)
            print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in seconds.items()),
                  file=sys.stderr, flush=True)
    blog = statistics.median(seconds["blog pipeline"])
    context = {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    for name, values in seconds.items():
        row = {"pipeline": name, "median_seconds": round(statistics.median(values), 2),
               "speedup_vs_blog": round(blog / statistics.median(values), 2), "seconds": values,
               "first_epoch_seconds": first_epochs.get(name), **context}
        print(json.dumps(row) if args.json else
              f"{name:18s} {row['median_seconds']:6.2f} s/epoch  x{row['speedup_vs_blog']:.2f}  {values}")


if __name__ == "__main__":
    main()
