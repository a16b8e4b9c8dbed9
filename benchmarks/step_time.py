"""Milliseconds per training step of a preset: eager, compiled forward and loss, compiled whole step (forward,
backward and update as one graph); each with the last block computing every token or the class token alone,
and with each attention form asked for.

    python benchmarks/step_time.py --preset seed
    python benchmarks/step_time.py --preset fast --last-block class --json
    python benchmarks/step_time.py --preset seed --modes whole --last-block class --attention explicit,kernel
    python benchmarks/step_time.py --size mid --modes whole --last-block class --gelu one-exp,kernel

Each variant is `vitscope.train.make_train_step` on the preset's model and recipe (optimizer included),
fed one fixed batch of random uint8 images. After a warm-up (which compiles), timed windows of --steps
steps go round the variants in turn, so the machine's drift in speed reaches all of them alike; the
median window is reported, and the speedup over the first variant both as the ratio of medians and as the
median of the windows' paired ratios. Precision is the preset's `--precision auto` choice unless
--precision says (`--precision fp32,bf16`: both, side by side).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--size", choices=["seed", "mid"], help="throughput.py's model size and step (AdamW, batch "
                    "256), not a preset's")
    ap.add_argument("--batch", type=int, default=0, help="default: the preset's")
    ap.add_argument("--precision", default="", help="fp32 or bf16, or both comma-separated, each a variant "
                    "(default: what --precision auto picks)")
    ap.add_argument("--windows", type=int, default=7)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--modes", default="eager,forward,whole", help="of eager, forward (forward and loss compiled), "
                    "whole (the whole step compiled)")
    ap.add_argument("--last-block", choices=["class", "all", "both"], default="both",
                    help="the last block for the class token alone, for every token, or both")
    ap.add_argument("--attention", default="", help="comma-separated RuntimeConfig.attention forms, each a "
                    "variant (default: the preset's own)")
    ap.add_argument("--gelu", default="", help="comma-separated RuntimeConfig.gelu forms, each a variant")
    ap.add_argument("--bias-in-kernels", default="", help="comma-separated on/off, each a variant of "
                    "RuntimeConfig.bias_in_kernels")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from vitscope.config import PRESETS
    from vitscope.device import cpu_name, select_precision
    from vitscope.model import build_model
    from vitscope.process import keep_freed_memory
    from vitscope.train import make_optimizer, make_scheduler, make_train_step

    keep_freed_memory()  # as `vitscope train` does
    preset = PRESETS[args.preset]
    if args.size:
        from throughput import size_preset  # this folder's
        from vitscope import config
        preset = size_preset(preset, args.size, config)
    device = torch.device("cpu")
    precisions = args.precision.split(",") if args.precision else [select_precision(preset.runtime.precision, device)]
    batch = args.batch or preset.train.batch_size
    images = torch.randint(0, 256, (batch, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (batch,))
    steps = {}
    modes = {"eager": dict(compile="off"), "forward": dict(compile="on", compile_whole_step=False),
             "whole": dict(compile="on", compile_whole_step=True)}
    names = {"eager": "eager", "forward": "compiled forward", "whole": "compiled whole step"}
    last_blocks = {"class": [True], "all": [False], "both": [False, True]}[args.last_block]
    attentions = args.attention.split(",") if args.attention else [preset.runtime.attention]
    gelus = args.gelu.split(",") if args.gelu else [preset.runtime.gelu]
    biases = [value == "on" for value in args.bias_in_kernels.split(",")] if args.bias_in_kernels else [
        preset.runtime.bias_in_kernels]
    for mode, class_token_only, attention, gelu, bias_in_kernels, precision in itertools.product(
            args.modes.split(","), last_blocks, attentions, gelus, biases, precisions):
        runtime = dataclasses.replace(preset.runtime, last_block_class_token_only=class_token_only,
                                      attention=attention, gelu=gelu, bias_in_kernels=bias_in_kernels, **modes[mode])
        recipe = dataclasses.replace(preset.train, batch_size=batch)
        torch.manual_seed(0)
        model = build_model(preset.model, runtime)
        optimizer = make_optimizer(model, recipe, runtime)
        step = make_train_step(model, optimizer, make_scheduler(optimizer, recipe, 10**6), recipe, runtime,
                               preset.model, device, precision)
        for _ in range(3):
            step(images, labels)
        last_block = ", last block class token only" if class_token_only else ", whole last block"
        name = (names[mode] + last_block + (f", {attention} attention" if args.attention else "")
                + (f", {gelu} GELU" if args.gelu else "")
                + (f", biases in kernels {'on' if bias_in_kernels else 'off'}" if args.bias_in_kernels else "")
                + (f", {precision}" if len(precisions) > 1 else ""))
        steps[name] = step, precision
    times = {name: [] for name in steps}
    for _ in range(args.windows):
        for name, (step, _) in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(images, labels)
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    baseline = next(iter(times.values()))
    for name, values in times.items():
        row = {"preset": preset.name, "variant": name, "batch": batch, "precision": steps[name][1],
               "ms_per_step": round(statistics.median(values), 2),
               "speedup": round(statistics.median(baseline) / statistics.median(values), 3),
               "paired_speedup": round(statistics.median(b / v for b, v in zip(baseline, values)), 3),
               "windows": [round(v, 2) for v in values],
               "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}
        print(json.dumps(row) if args.json else
              f"{name:55s} {row['ms_per_step']:7.2f} ms/step  x{row['speedup']:.2f} "
              f"(paired x{row['paired_speedup']:.2f})")

if __name__ == "__main__":
    main()
