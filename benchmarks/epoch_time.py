"""Seconds per training epoch at batch 64: the seed blog's own pipeline against vitscope's presets.

    python benchmarks/epoch_time.py [--repeats 3] [--json]
    python benchmarks/epoch_time.py --repeats 1 --max-steps 100      # a short check: 100 steps per epoch

The blog's pipeline is benchmarks/blog_pipeline.py (a torchvision-style MNIST dataset decoded per item,
ToTensor/Normalize, torch's DataLoader, the blog's own model). Each repeat runs one epoch of each, in turn, as
separate processes in this environment; the training loop's own seconds are compared (the test-set evaluation
is left out on both sides). vitscope's presets run 2 epochs and their second is timed: a preset's 20-epoch run
compiles its step (compile = "auto"), which the first epoch pays for once (its seconds are reported as
first_epoch_seconds). --max-steps N stops every epoch of both after N steps (vitscope's through
--max-train-samples 64 N); below 250, vitscope's two epochs stay under compile = "auto"'s 500 steps and run
uncompiled, so such a check times another step than a full epoch does. MNIST is read from vitscope's cache
(`vitscope data`).
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
BLOG_PIPELINE = ROOT / "benchmarks" / "blog_pipeline.py"
BATCH = 64  # the blog's, and the seed and blog presets'


def blog_epoch(work: Path, max_steps: int | None) -> float:
    out = work / "blog.jsonl"
    limit = ["--max-steps", str(max_steps)] if max_steps else []
    subprocess.run([sys.executable, str(BLOG_PIPELINE), "--epochs", "1", "--no-test", "--out", str(out), *limit],
                   check=True, capture_output=True, text=True)
    return json.loads(out.read_text().splitlines()[-1])["seconds"]


def vitscope_epoch(preset: str, work: Path, repeat: int, max_steps: int | None) -> tuple[float, float]:
    """(seconds of the second epoch, of the first) of a 2-epoch run of the preset, which compiles as its
    20-epoch run does: the second epoch is the steady state, the first also carries the compilation."""
    run = work / f"{preset}-{repeat}"
    limit = ["--max-train-samples", str(BATCH * max_steps)] if max_steps else []
    subprocess.run([sys.executable, "-m", "vitscope", "train", "--preset", preset, "--epochs", "2", "--out", str(run),
                    "--no-progress", *limit], check=True, capture_output=True, text=True)
    first, second = (json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines())
    return second, first


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--presets", default="seed,blog")
    ap.add_argument("--max-steps", type=int, help="stop every epoch after this many steps (default: whole epochs)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.max_steps is not None and args.max_steps < 1:
        ap.error("--max-steps must be at least 1")
    import torch

    from vitscope.data import load_dataset
    from vitscope.device import cpu_name

    load_dataset("mnist")  # fetched and verified into the cache if it is not there yet
    seconds: dict[str, list[float]] = {"blog pipeline": []} | {f"vitscope {p}": [] for p in args.presets.split(",")}
    first_epochs: dict[str, list[float]] = {name: [] for name in seconds if name != "blog pipeline"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for repeat in range(args.repeats):
            seconds["blog pipeline"].append(blog_epoch(work, args.max_steps))
            for preset in args.presets.split(","):
                steady, first = vitscope_epoch(preset, work, repeat, args.max_steps)
                seconds[f"vitscope {preset}"].append(steady)
                first_epochs[f"vitscope {preset}"].append(first)
            print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in seconds.items()),
                  file=sys.stderr, flush=True)
    blog = statistics.median(seconds["blog pipeline"])
    context = {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "max_steps": args.max_steps}
    for name, values in seconds.items():
        row = {"pipeline": name, "median_seconds": round(statistics.median(values), 2),
               "speedup_vs_blog": round(blog / statistics.median(values), 2), "seconds": values,
               "first_epoch_seconds": first_epochs.get(name), **context}
        print(json.dumps(row) if args.json else
              f"{name:18s} {row['median_seconds']:6.2f} s/epoch  x{row['speedup_vs_blog']:.2f}  {values}")


if __name__ == "__main__":
    main()
