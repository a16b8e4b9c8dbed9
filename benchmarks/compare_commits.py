"""Milliseconds per training step of a preset at several commits, side by side in one process.

    python benchmarks/compare_commits.py cd69175 HEAD                  # the fast preset
    python benchmarks/compare_commits.py cd69175 HEAD --preset seed --windows 9
    python benchmarks/compare_commits.py HEAD~1 HEAD --size mid --seconds 2   # throughput.py's mid size and step

Separate processes run minutes apart, and this shared machine's speed drifts by tens of percent between
minutes, so a change of a few percent only shows when the versions share the minutes. Each commit's
`src/vitscope` is exported (`git archive`) into a temporary folder as a package of its own name, imported
beside the others, and its own `make_train_step` is built on its own preset's model and recipe, compiled
(`compile = "on"`), at `--precision auto`'s choice. After a warm-up, timed windows go round the commits in
turn; per window each commit's speed-up over the first is taken, and their median is reported.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def export_package(commit: str, folder: Path) -> str:
    """`src/vitscope` at `commit` as the package `vitscope_<sha>` under `folder`; its name."""
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", sha, "src/vitscope"], cwd=ROOT, check=True, capture_output=True).stdout
    name = f"vitscope_{sha}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder / "export", filter="data")
    (folder / "export" / "src" / "vitscope").rename(folder / name)  # relative imports only: any name works
    return name


def build_step(package: str, preset: str, batch: int, size: str | None = None):
    config, model_module, train, device_module = (importlib.import_module(f"{package}.{module}")
                                                  for module in ("config", "model", "train", "device"))
    recipe = config.PRESETS[preset]
    if size:
        from throughput import size_preset  # this folder's
        recipe = size_preset(recipe, size, config)
    device = torch.device("cpu")
    torch.manual_seed(0)
    if hasattr(config, "RuntimeConfig"):  # the runtime settings in a config of their own
        runtime = dataclasses.replace(recipe.runtime, compile="on")
        train_config = dataclasses.replace(recipe.train, batch_size=batch or recipe.train.batch_size)
        precision = device_module.select_precision(runtime.precision, device)
        model = model_module.build_model(recipe.model, runtime)
        optimizer = train.make_optimizer(model, train_config, runtime)
        step = train.make_train_step(model, optimizer, train.make_scheduler(optimizer, train_config, 10**6),
                                     train_config, runtime, recipe.model, device, precision)
    else:  # commits before the split: the runtime settings in TrainConfig and ViTConfig
        train_config = dataclasses.replace(recipe.train, compile="on", batch_size=batch or recipe.train.batch_size)
        precision = device_module.select_precision(train_config.precision, device)
        model = model_module.build_model(recipe.model)
        optimizer = train.make_optimizer(model, train_config)
        step = train.make_train_step(model, optimizer, train.make_scheduler(optimizer, train_config, 10**6),
                                     train_config, recipe.model, device, precision)
    images = torch.randint(0, 256, (train_config.batch_size, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (train_config.batch_size,))
    for _ in range(10):  # compiles
        step(images, labels)
    return step, images, labels, precision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("commits", nargs="+", help="git revisions; the first is the baseline")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--size", choices=["seed", "mid"], help="throughput.py's model size and step (AdamW, batch "
                    "256), not a preset's")
    ap.add_argument("--batch", type=int, default=0, help="default: the preset's")
    ap.add_argument("--windows", type=int, default=9)
    ap.add_argument("--seconds", type=float, default=0.8, help="about this long per window")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from vitscope.device import cpu_name
    from vitscope.process import keep_freed_memory

    keep_freed_memory()  # as `vitscope train` does (one process: every commit's step runs with it)
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, tmp)
        packages = [export_package(commit, Path(tmp)) for commit in args.commits]
        steps = {package: build_step(package, args.preset, args.batch, args.size) for package in packages}
        times: dict[str, list[float]] = {package: [] for package in packages}
        for _ in range(args.windows):
            for package, (step, images, labels, _) in steps.items():
                start = time.perf_counter()
                count = 0
                while (elapsed := time.perf_counter() - start) < args.seconds or count < 3:
                    step(images, labels)
                    count += 1
                times[package].append(elapsed / count * 1e3)
    baseline = times[packages[0]]
    for commit, package in zip(args.commits, packages):
        ratios = [b / t for b, t in zip(baseline, times[package])]
        row = {"commit": commit, "package": package, "preset": args.size or args.preset, "precision": steps[package][3],
               "batch": len(steps[package][2]), "ms_per_step": round(statistics.median(times[package]), 2),
               "speedup": round(statistics.median(ratios), 3), "windows": [round(t, 2) for t in times[package]],
               "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}
        print(json.dumps(row) if args.json else
              f"{commit:>12} {row['ms_per_step']:7.2f} ms/step  x{row['speedup']:.3f} "
              f"(per-window range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
