"""Time-to-accuracy: the wall-clock of whole `vitscope train --preset fast` processes, and their accuracy.

    python benchmarks/time_to_accuracy.py --seeds 0 1 2 3 4
    python benchmarks/time_to_accuracy.py --preset seed --seeds 0 --json

Each seed is one `vitscope train` process, timed from its start to its exit (Python start-up, imports, data
from the local cache, any compilation, training, the per-epoch evaluations, writing the run directory).
MNIST must already be cached (`vitscope data` once), so no download is timed. Runs go one after another,
never side by side: two training processes on a 2-core machine slow each other down many times over.
With --cold, each process gets an empty TorchInductor cache (only matters where the preset compiles).

For choosing a recipe, --validation trains on the first 50,000 training images and reports accuracy on the
other 10,000 (written as an IDX set, so `test_acc` in that mode is validation accuracy): the MNIST test set
is then only read once the recipe is fixed.

    python benchmarks/time_to_accuracy.py --validation --seeds 0 1 -- --config my_recipe.toml

With --avx2-proxy, each process runs through `avx2_proxy.py`: on a CPU with AVX-512, vitscope as an AVX2-only
CPU such as the Zen 3 host would run it (a stand-in: see that script).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VALIDATION_SIZE = 10_000


def write_validation_split(folder: Path) -> Path:
    """The MNIST training set cut into 50,000 training and 10,000 validation images, as IDX files."""
    from vitscope.data import SPLITS, load_dataset, write_idx

    folder.mkdir(parents=True, exist_ok=True)
    mnist = load_dataset("mnist")
    images, labels = mnist.train_images.numpy(), mnist.train_labels.numpy()
    cut = len(labels) - VALIDATION_SIZE
    parts = {"train_images": images[:cut], "train_labels": labels[:cut],
             "test_images": images[cut:], "test_labels": labels[cut:]}
    for key, array in parts.items():
        write_idx(folder / SPLITS[key], array)
    return folder


def run_one(preset: str, seed: int, out: Path, cold: bool, extra: list[str], avx2_proxy: bool = False) -> dict:
    env = dict(os.environ)
    if cold:
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")
    launcher = [str(Path(__file__).with_name("avx2_proxy.py"))] if avx2_proxy else ["-m", "vitscope"]
    command = [sys.executable, *launcher, "train", "--preset", preset, "--seed", str(seed),
               "--out", str(out), "--no-progress", *extra]
    start = time.perf_counter()
    p = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (out.parent / f"seed{seed}.log").write_text(p.stdout + p.stderr)  # the training log, beside the run
    if p.returncode:
        raise SystemExit(f"seed {seed} failed:\n{p.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((out / "config.json").read_text())
    return {"preset": preset, "seed": seed, "cold_cache": cold, "wall_s": round(wall, 1),
            "train_s": round(sum(r["seconds"] for r in rows), 1), "epochs": len(rows),
            "test_acc": rows[-1]["test_acc"], "precision": config["precision"],
            "compiled": config.get("compiled", False), "cpu": config["hardware"]["cpu"],
            "gpu": config["hardware"].get("gpu"),
            "torch": config["versions"]["torch"], "avx2_proxy": avx2_proxy, "run": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default="runs/time-to-accuracy", help="parent folder of the run directories")
    ap.add_argument("--cold", action="store_true", help="an empty compile cache for every process")
    ap.add_argument("--validation", action="store_true",
                    help="train on 50,000 training images, score on the other 10,000 (for choosing a recipe)")
    ap.add_argument("--avx2-proxy", action="store_true",
                    help="run each process as an AVX2-only CPU would (benchmarks/avx2_proxy.py)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("extra", nargs="*", help="more `vitscope train` flags, after --")
    args = ap.parse_args()
    parent = Path(args.out) / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    extra = list(args.extra)
    if args.validation:
        extra += ["--dataset", "idx", "--data-dir", str(write_validation_split(parent / "validation-split"))]
    results = []
    for seed in args.seeds:
        result = run_one(args.preset, seed, parent / f"seed{seed}", args.cold, extra, args.avx2_proxy)
        result["scored_on"] = "validation" if args.validation else "test"
        results.append(result)
        print(json.dumps(result) if args.json else
              f"seed {seed}: {result['test_acc']:.2%} {result['scored_on']}, {result['wall_s']:.1f} s wall-clock "
              f"({result['train_s']:.1f} s in the training loop)", flush=True)
    accs = [r["test_acc"] for r in results]
    walls = [r["wall_s"] for r in results]
    summary = {"preset": args.preset, "seeds": len(results), "mean_test_acc": round(statistics.mean(accs), 5),
               "min_test_acc": min(accs), "max_test_acc": max(accs), "median_wall_s": statistics.median(walls),
               "scored_on": results[0]["scored_on"], "cold_cache": args.cold, "cpu": results[0]["cpu"],
               "gpu": results[0]["gpu"], "avx2_proxy": args.avx2_proxy,
               "precision": results[0]["precision"]}
    print(json.dumps(summary) if args.json else
          f"{args.preset}: mean {summary['scored_on']} accuracy {summary['mean_test_acc']:.2%} "
          f"over {len(results)} seeds "
          f"(min {summary['min_test_acc']:.2%}, max {summary['max_test_acc']:.2%}); median wall-clock "
          f"{summary['median_wall_s']:.1f} s on {summary['gpu'] or summary['cpu']} ({summary['precision']}"
          f"{', as an AVX2-only CPU: avx2_proxy.py' if args.avx2_proxy else ''})")


if __name__ == "__main__":
    main()
