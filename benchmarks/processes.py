"""One process against N under torchrun: how far apart the models are (after one step and after the run), and
how fast each trains.

    python benchmarks/processes.py                                  # fast preset, 60 steps of 256 on MNIST
    python benchmarks/processes.py --precision fp32 --repeats 1     # the differences without bf16's rounding

Each repeat runs `vitscope train` with the same global batch, seed and settings, uncompiled (several processes run
the usual step, not the whole compiled one, so compiled runs would compare two different steps), in three layouts,
one after the other: one process with torch's threads on every core, one process with one thread, and N processes
under `torchrun --standalone --nproc_per_node N` (the cores shared out: one thread each on 2 cores). Reported:
images per second of the training steps (metrics.jsonl) of each, and between the first and the last layout the
largest weight difference apart from the attention's key bias (softmax ignores it, so its gradient is rounding noise
that Adam scales up to steps of the learning rate's size), that of the key bias, the largest logit difference on the
test set, the predictions that differ, and the test metrics of both. A first pair of runs of one step gives the
difference one step makes. MNIST is read from vitscope's cache (`vitscope data`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def train(out: Path, processes: int, flags: list[str]) -> float:
    """Images per second of the run's training steps."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                 "-m", "vitscope"] if processes > 1 else [sys.executable, "-m", "vitscope"])
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    subprocess.run([*launcher, "train", *flags, "--out", str(out), "--no-progress", "--overwrite"], check=True,
                   capture_output=True, text=True, env=env)
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["images_per_second"]


def compare(one: Path, many: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    from vitscope import load_run
    from vitscope.rundir import RunDir

    a, b = load_file(str(one / "model.safetensors")), load_file(str(many / "model.safetensors"))
    weights, key_bias = 0.0, 0.0
    for name in a:
        difference = (a[name] - b[name]).abs()
        if name.endswith("attn.qkv.bias"):
            key_bias = max(key_bias, difference.view(3, -1)[1].max().item())
            difference = difference.view(3, -1)[[0, 2]]
        weights = max(weights, difference.max().item())
    dataset = RunDir(one).dataset()
    logits = []
    for run in (one, many):
        model, config = load_run(run)
        with torch.no_grad():
            images = (dataset.test_images.float().unsqueeze(1) / 255 - config.pixel_mean) / config.pixel_std
            logits.append(torch.cat([model(chunk) for chunk in images.split(1000)]))
    rows = [json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]) for run in (one, many)]
    return {"max_weight_difference": weights, "max_key_bias_difference": key_bias,
            "max_logit_difference": (logits[0] - logits[1]).abs().max().item(),
            "predictions_differing": int((logits[0].argmax(1) != logits[1].argmax(1)).sum()),
            "test_acc": [rows[0]["test_acc"], rows[1]["test_acc"]],
            "test_loss": [rows[0]["test_loss"], rows[1]["test_loss"]]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60, help="training steps of each run (default 60)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import torch

    results = {"cpu": _cpu_name(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
               "preset": args.preset, "processes": args.processes, "batch_size": args.batch_size, "steps": args.steps,
               "precision": args.precision, "load_average_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        (work / "eager.toml").write_text('compile = "off"\n')
        flags = ["--preset", args.preset, "--batch-size", str(args.batch_size), "--epochs", "1", "--precision",
                 args.precision, "--config", str(work / "eager.toml")]
        one_step = ["--max-train-samples", str(args.batch_size)]
        train(work / "one", 1, flags + one_step)
        train(work / "many", args.processes, flags + one_step)
        results["after_one_step"] = compare(work / "one", work / "many")
        run = flags + ["--max-train-samples", str(args.batch_size * args.steps)]
        layouts = {"one_process_all_cores": (1, []), "one_process_one_thread": (1, ["--threads", "1"]),
                   f"{args.processes}_processes": (args.processes, [])}
        speeds = {name: [] for name in layouts}
        for _ in range(args.repeats):
            for name, (processes, extra) in layouts.items():
                out = work / ("many" if processes > 1 else "one" if not extra else "one-thread")
                speeds[name].append(train(out, processes, run + extra))
        results["images_per_second"] = {name: statistics.median(values) for name, values in speeds.items()}
        results["images_per_second_all"] = speeds
        results["after_the_run"] = compare(work / "one", work / "many")
        results["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(results) if args.json else json.dumps(results, indent=1))


def _cpu_name() -> str:
    from vitscope.device import cpu_name

    return cpu_name()


if __name__ == "__main__":
    main()
