"""Where a compiled training step's time goes: torch.profiler over a preset's step, ms per step by operation,
inductor's generated kernels named one by one.

    python benchmarks/profile_step.py --preset seed                 # batch 64, the preset's own
    python benchmarks/profile_step.py --preset seed --batch 256 --top 10
    PYTHONPATH=OLD_CHECKOUT/src python benchmarks/profile_step.py   # another version of vitscope

The step is `vitscope.train.make_train_step` on the preset's model and recipe, compiled, at `--precision
auto`'s choice, fed one fixed batch of random uint8 images. The profiler's own overhead inflates the small
operations; the sum of all rows is printed beside the unprofiled step time.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--batch", type=int, default=0, help="default: the preset's")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    import torch._inductor.config
    torch._inductor.config.cpp.enable_kernel_profile = True  # each generated kernel a profiler event
    from vitscope import device as vitscope_device
    from vitscope.config import PRESETS
    from vitscope.device import cpu_name, select_precision
    from vitscope.model import build_model
    from vitscope.train import make_optimizer, make_scheduler, make_train_step

    if hasattr(vitscope_device, "keep_freed_memory"):  # as `vitscope train` does (versions before it had none)
        vitscope_device.keep_freed_memory()
    preset = PRESETS[args.preset]
    batch = args.batch or preset.train.batch_size
    recipe = dataclasses.replace(preset.train, compile="on", batch_size=batch)
    device = torch.device("cpu")
    precision = select_precision(recipe.precision, device)
    torch.manual_seed(0)
    model = build_model(preset.model)
    optimizer = make_optimizer(model, recipe)
    step = make_train_step(model, optimizer, make_scheduler(optimizer, recipe, 10**6), recipe, preset.model,
                           device, precision)
    images = torch.randint(0, 256, (batch, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (batch,))
    for _ in range(10):
        step(images, labels)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(images, labels)
    unprofiled = (time.perf_counter() - start) / args.steps * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step(images, labels)
    rows = sorted(((event.key, event.self_cpu_time_total / args.steps / 1e3, event.count / args.steps)
                   for event in prof.key_averages()), key=lambda row: -row[1])
    kernels = sum(ms for name, ms, _ in rows if name.startswith("graph_"))
    print(f"{args.preset}, batch {batch}, {precision}, {cpu_name()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}: {unprofiled:.2f} ms per step unprofiled; profiled, all rows "
          f"{sum(ms for _, ms, _ in rows):.2f} ms, of which inductor's kernels {kernels:.2f} ms")
    for name, ms, count in rows[:args.top]:
        print(f"{ms:8.3f} ms {count:6.1f}x  {name[:110]}")


if __name__ == "__main__":
    main()
