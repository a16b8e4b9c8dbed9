"""Where a compiled training step's time goes: torch.profiler over a preset's step, ms per step by operation,
inductor's generated kernels named one by one.

    python benchmarks/profile_step.py --preset seed                 # batch 64, the preset's own
    python benchmarks/profile_step.py --preset seed --batch 256 --top 10
    python benchmarks/profile_step.py --size mid --precision bf16 --shapes   # throughput.py's step and size
    PYTHONPATH=OLD_CHECKOUT/src python benchmarks/profile_step.py   # another version of vitscope

The step is `vitscope.train.make_train_step` on the preset's model and recipe, compiled, at `--precision
auto`'s choice, fed one fixed batch of random uint8 images. With --size, it is the step throughput.py times
for vitscope instead (that size, explicit attention, AdamW, batch 256 unless --batch says otherwise).
--shapes adds a table of the matmuls by shape, each with its achieved GFLOP/s. The profiler's own overhead inflates
the small operations; the sum of all rows is printed beside the unprofiled step time.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

from torch.profiler import ProfilerActivity, profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--batch", type=int, default=0, help="default: the preset's")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--size", choices=["seed", "mid"], help="throughput.py's model size and step, not a preset's")
    ap.add_argument("--precision", default="", help="fp32 or bf16 (default: the preset's, as `vitscope train`)")
    ap.add_argument("--shapes", action="store_true", help="also the matmuls by shape, with GFLOP/s")
    ap.add_argument("--attention", default="explicit", help="with --size: the RuntimeConfig.attention form")
    args = ap.parse_args()
    import torch._inductor.config
    torch._inductor.config.cpp.enable_kernel_profile = True  # each generated kernel a profiler event
    from vitscope.config import PRESETS
    from vitscope.device import cpu_name, select_precision
    from vitscope.model import build_model
    from vitscope.process import keep_freed_memory
    from vitscope.train import make_optimizer, make_scheduler, make_train_step

    keep_freed_memory()  # as `vitscope train` does
    if args.size:
        from throughput import SIZES  # this folder's
        from vitscope import RuntimeConfig, TrainConfig, ViTConfig
        model_config = ViTConfig(**SIZES[args.size])
        recipe = TrainConfig(optimizer="adamw", lr=1e-3, batch_size=args.batch or 256)
        runtime = RuntimeConfig(attention=args.attention, compile="on")
        name = f"{args.size} size"
    else:
        preset = PRESETS[args.preset]
        model_config = preset.model
        recipe = dataclasses.replace(preset.train, batch_size=args.batch or preset.train.batch_size)
        runtime = dataclasses.replace(preset.runtime, compile="on")
        name = args.preset
    batch = recipe.batch_size
    device = torch.device("cpu")
    precision = select_precision(args.precision or runtime.precision, device)
    torch.manual_seed(0)
    model = build_model(model_config, runtime)
    optimizer = make_optimizer(model, recipe, runtime)
    step = make_train_step(model, optimizer, make_scheduler(optimizer, recipe, 10**6), recipe, runtime,
                           model_config, device, precision)
    images = torch.randint(0, 256, (batch, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (batch,))
    for _ in range(10):
        step(images, labels)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(images, labels)
    unprofiled = (time.perf_counter() - start) / args.steps * 1e3
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        for _ in range(args.steps):
            step(images, labels)
    rows = sorted(((event.key, event.self_cpu_time_total / args.steps / 1e3, event.count / args.steps)
                   for event in prof.key_averages()), key=lambda row: -row[1])
    kernels = sum(ms for key, ms, _ in rows if key.startswith("graph_"))
    print(f"{name}, batch {batch}, {precision}, {cpu_name()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}: {unprofiled:.2f} ms per step unprofiled; profiled, all rows "
          f"{sum(ms for _, ms, _ in rows):.2f} ms, of which inductor's kernels {kernels:.2f} ms")
    for key, ms, count in rows[:args.top]:
        print(f"{ms:8.3f} ms {count:6.1f}x  {key[:110]}")
    if args.shapes:
        print("matmuls by shape (ms per step, calls per step, GFLOP/s, operand shapes):")
        for ms, count, gflops, key, shapes in matmuls_by_shape(prof, args.steps):
            print(f"{ms:8.3f} ms {count:6.1f}x {gflops:6.0f} GFLOP/s  {key:11s} {shapes}")


def matmuls_by_shape(prof, steps: int) -> list[tuple]:
    """(ms per step, calls per step, GFLOP/s, op, shapes) of every mm, addmm and bmm shape, slowest first."""
    rows = []
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key not in ("aten::mm", "aten::addmm", "aten::bmm"):
            continue
        shapes = [shape for shape in event.input_shapes if shape]
        if event.key == "aten::addmm":
            shapes = shapes[1:]  # the bias first
        *batch, m, k = shapes[0]
        n = shapes[1][-1]
        flops = 2 * (batch[0] if batch else 1) * m * k * n * event.count
        ms = event.self_cpu_time_total / steps / 1e3
        rows.append((ms, event.count / steps, flops / steps / (ms * 1e-3) / 1e9 if ms else 0.0, event.key,
                     shapes))
    return sorted(rows, key=lambda row: -row[0])


if __name__ == "__main__":
    main()
