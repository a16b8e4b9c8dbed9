"""Page faults, kernel time and milliseconds per training step with glibc's default malloc against
`vitscope.process.keep_freed_memory`, in alternating processes (the setting is per process).

    python benchmarks/malloc_pages.py                      # the fast preset, 4 processes of each
    python benchmarks/malloc_pages.py --preset seed --pairs 3 --json

Each process builds the preset's compiled step (`make_train_step`), feeds it real MNIST batches with the
preset's augmentation, as `vitscope train` does (MNIST must be cached: `vitscope data`), and after a
warm-up times --windows windows of --steps steps; it reports the median window and the page faults and
kernel (system) CPU time per step over all windows, from getrusage. Processes run one after another.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def measure(preset_name: str, keep: bool, windows: int, steps: int) -> dict:
    from vitscope.config import PRESETS
    from vitscope.data import load_dataset, random_close, random_rotate_scale, random_shift, random_stroke
    from vitscope.device import cpu_name, select_precision
    from vitscope.model import build_model
    from vitscope.process import keep_freed_memory
    from vitscope.train import make_optimizer, make_scheduler, make_train_step

    applied = keep_freed_memory() if keep else False
    preset = PRESETS[preset_name]
    recipe, model_config = preset.train, preset.model
    runtime = dataclasses.replace(preset.runtime, compile="on")
    data = load_dataset(recipe.dataset, recipe.data_dir)
    device = torch.device("cpu")
    precision = select_precision(runtime.precision, device)
    torch.manual_seed(0)
    model = build_model(model_config, runtime)
    optimizer = make_optimizer(model, recipe, runtime)
    step = make_train_step(model, optimizer, make_scheduler(optimizer, recipe, 10**6), recipe, runtime,
                           model_config, device, precision)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.train_labels), generator=generator)
    batch = recipe.batch_size

    def run(i: int) -> None:
        index = order[i * batch % (len(order) - batch):][:batch]
        images = random_rotate_scale(data.train_images[index], recipe.augment_rotate, recipe.augment_scale,
                                     generator)
        images = random_shift(images, recipe.augment_shift, generator)
        images = random_stroke(images, recipe.augment_stroke, generator)
        step(random_close(images, recipe.augment_close, generator), data.train_labels[index])

    for i in range(10):
        run(i)
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = []
    for _ in range(windows):
        start = time.perf_counter()
        for i in range(steps):
            run(i)
        times.append((time.perf_counter() - start) / steps * 1e3)
    after = resource.getrusage(resource.RUSAGE_SELF)
    total = windows * steps
    return {"preset": preset_name, "malloc": "freed memory kept" if applied else "glibc default",
            "ms_per_step": round(statistics.median(times), 2),
            "page_faults_per_step": round((after.ru_minflt - before.ru_minflt) / total),
            "kernel_ms_per_step": round((after.ru_stime - before.ru_stime) / total * 1e3, 2),
            "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--pairs", type=int, default=4, help="processes of each setting, alternated")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=["default", "kept"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.preset, args.child == "kept", args.windows, args.steps)))
        return
    for _ in range(args.pairs):
        for setting in ("default", "kept"):
            out = subprocess.run([sys.executable, __file__, "--child", setting, "--preset", args.preset,
                                  "--windows", str(args.windows), "--steps", str(args.steps)],
                                 check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(row) if args.json else
                  f"{row['malloc']:18s} {row['ms_per_step']:7.2f} ms/step  {row['page_faults_per_step']:5d} "
                  f"page faults/step  {row['kernel_ms_per_step']:6.2f} ms kernel time/step", flush=True)


if __name__ == "__main__":
    main()
