"""`vitscope <command>`: parses flags and calls the modules; holds no logic of its own."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .errors import VitscopeError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit 2 (argparse prints the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def config_from_flags(args) -> tuple[str | None, dict]:
    """(the preset named, or None; overrides) of `add_config_flags`'s flags: the --config file's fields, the flags
    over them."""
    from .config import read_config_file

    overrides = read_config_file(args.config) if args.config else {}
    flags = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
             "dataset": args.dataset, "data_dir": args.data_dir, "device": args.device, "threads": args.threads,
             "precision": args.precision, "max_train_samples": args.max_train_samples,
             "tensorboard": args.tensorboard or None,
             "checkpoint_every": getattr(args, "checkpoint_every", None)}  # train's alone
    overrides.update({k: v for k, v in flags.items() if v is not None})
    named_preset = args.preset or overrides.pop("preset", None)
    overrides.pop("preset", None)
    return named_preset, overrides


def cmd_train(args) -> int:
    from .config import DEFAULT_PRESET, resolve_config
    from .errors import Interrupted
    from .train import default_out, train

    named_preset, overrides = config_from_flags(args)
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        if args.resume:
            if args.out is None:
                raise VitscopeError("--resume needs --out RUN, the run directory to continue")
            given = {**overrides, **({"preset": named_preset} if named_preset else {})}  # checked against the run
            train(None, None, args.out, resume=True, progress=progress, threads=args.threads, given=given,
                  overwrite=args.overwrite)
            return 0
        preset = named_preset or DEFAULT_PRESET
        model_config, train_config, runtime = resolve_config(preset, overrides)
        train(model_config, train_config, args.out or default_out(preset), preset=preset, progress=progress,
              runtime=runtime, overwrite=args.overwrite)
    except Interrupted as e:  # SIGINT or SIGTERM: the checkpoint is saved; 130 or 143, as the shell would say
        if e.message:
            print(f"vitscope train: {e.message}", file=sys.stderr)
        return e.exit_code
    return 0


def cmd_sweep(args) -> int:
    from .config import DEFAULT_PRESET
    from .data import ValidationSplit
    from .sweep import default_sweep_out, sweep

    named_preset, overrides = config_from_flags(args)
    preset = named_preset or DEFAULT_PRESET
    sweep(preset, overrides, out=args.out or default_sweep_out(preset), space_file=args.space, trials=args.trials,
          time_budget=args.time_budget, storage=args.storage, study_name=args.study,
          validation=ValidationSplit(args.validation_size, args.validation_seed),
          progress=not args.no_progress and sys.stderr.isatty())
    return 0


def cmd_eval(args) -> int:
    import torch

    from .device import select_device, select_precision
    from .evaluate import evaluate
    from .rundir import RunDir, load_run

    run = RunDir(args.run).require()
    device = select_device(args.device)
    # the run's own fast paths, so the figures agree with its training log's last evaluation
    model, config = load_run(run.path, device, run.runtime_config())
    dataset = run.dataset(args.data_dir)
    precision = select_precision("fp32" if args.precision == "auto" else args.precision, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = evaluate(model, dataset.test_images, dataset.test_labels, config.pixel_mean, config.pixel_std,
                      device=device, precision=precision)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{run.path}: test accuracy {result['test_acc']:.2%}, test loss {result['test_loss']:.4f} "
              f"on {result['n']} images ({dataset.name})")
    return 0


def cmd_data(args) -> int:
    from .data import load_dataset

    dataset = load_dataset(args.dataset, args.data_dir)
    info = dataset.describe()
    print(f"{info['name']}: {info['train_size']} train + {info['test_size']} test images of "
          f"{info['image_size']}x{info['image_size']}, {info['num_classes']} classes"
          + (", SHA-256 verified" if args.dataset == "mnist" else ""))
    print(f"served by: {dataset.source}")
    print(f"stored in: {dataset.location}")
    return 0


def cmd_analyze(args) -> int:
    from .device import select_device
    from .report import analyze_run

    analyze_run(args.run, args.out, device=select_device(args.device), data_dir=args.data_dir)
    return 0


def cmd_predict(args) -> int:
    from .prediction import load_model, predict_files, save_inputs

    if args.top_k < 1:
        raise VitscopeError("--top-k must be at least 1")
    model = load_model(args.model)
    results = predict_files(model, args.files)
    if args.save_preprocessed:
        save_inputs(results, args.save_preprocessed)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "input"} for r in results]))
    for result in results:
        if "error" in result:
            print(f"vitscope predict: error: {result['file']}: {result['error']}", file=sys.stderr)
        elif not args.json:
            probs = result["probs"]
            top = sorted(range(len(probs)), key=lambda c: -probs[c])[:args.top_k]
            print(f"{result['file']}: {result['label']}  (" + ", ".join(f"{c}: {probs[c]:.1%}" for c in top) + ")")
    if args.save_preprocessed and not args.json:
        print(f"the images the model saw are in {args.save_preprocessed}")
    return 2 if any("error" in r for r in results) else 0


def cmd_export(args) -> int:
    from .export import export_run

    result = export_run(args.run, args.format, args.out)
    print(f"wrote {result.path}: checked in {result.runtime}, max |logit difference| from PyTorch "
          f"{result.max_difference:.1e}")
    return 0


def cmd_serve(args) -> int:
    from .serve import serve

    serve(args.run, args.host, args.port)
    return 0


def add_config_flags(p: ArgumentParser) -> None:
    """The flags that fix a run's config: `train`'s, which `sweep` shares to fix the base its trials start from."""
    from .config import DEFAULT_PRESET, PRESETS

    p.add_argument("--preset", help=f"recipe to start from: {', '.join(PRESETS)} (default {DEFAULT_PRESET}); "
                   + "; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items()).replace("%", "%%"))
    p.add_argument("--epochs", type=int, help="number of epochs (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="training batch size (default: the preset's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    p.add_argument("--seed", type=int, help="random seed for initialisation, shuffling and augmentation (default 0)")
    p.add_argument("--dataset", choices=["mnist", "idx"], help="mnist (default, SHA-256 verified) or idx "
                   "(any IDX dataset in --data-dir)")
    p.add_argument("--data-dir", help="folder with the IDX files (plain or .gz); for mnist, used instead of the cache")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="where to train (default auto)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; under torchrun, "
                   "the machine's cores shared out among its processes)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="auto (default): bf16 autocast only where the device computes bf16 natively")
    p.add_argument("--max-train-samples", type=int, help="train on the first N training images only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also off when stderr is not a TTY)")
    p.add_argument("--config", help="JSON or TOML file of config fields; flags override it")
    p.add_argument("--tensorboard", action="store_true", help="also log to RUN/tensorboard (needs tensorboard)")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="vitscope", description=__doc__.splitlines()[0].split(":")[0] + ": "
                            "train, inspect and use a Vision Transformer on MNIST-sized images.")
    parser.add_argument("--version", action="version", version=f"vitscope {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)

    p = commands.add_parser("train", help="train a ViT and write a run directory",
                            description="Train a ViT on MNIST (or any IDX dataset) and write a run directory.")
    add_config_flags(p)
    p.add_argument("--out", type=Path, help="run directory (default runs/<preset>-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                   "(flags that contradict the run are refused)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out, or write into a folder that "
                   "holds other files (by default both are refused)")
    p.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="also save a checkpoint every STEPS "
                   "optimizer steps (default: one after every epoch and about every 3 minutes of training)")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("sweep", help="search config fields with Optuna on a validation split of the training set",
                            description="Search config fields with Optuna: each trial trains from the base config "
                            "(--preset and the train flags, e.g. --epochs 1 --max-train-samples 6000) with values "
                            "drawn from the search space, and is judged by its accuracy on a validation split "
                            "carved from the training images; the test set is never read. Bad trials are pruned "
                            "after an epoch. Rerunning the same command continues the study to --trials finished "
                            "trials; --seed also seeds the sampler, so the same command tries the same values. Writes "
                            "OUT/trials.csv, OUT/search.png and OUT/best.toml, a --config file for vitscope train. "
                            "Needs: pip install 'vitscope[sweep]'.")
    add_config_flags(p)
    p.add_argument("--space", help="TOML file of the fields to search: lr = {low = 1e-4, high = 1e-2, log = true}, "
                   "depth = {low = 2, high = 6}, batch_size = {choices = [64, 128]} (default: the preset's space)")
    p.add_argument("--trials", type=int, help="finished (complete or pruned) trials the study should reach "
                   "(default 20, or no limit with --time-budget)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="start no trial after this many seconds")
    p.add_argument("--out", type=Path, help="sweep directory (default sweeps/<preset>)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage URL (default sqlite:///OUT/study.db)")
    p.add_argument("--study", metavar="NAME", help="study name in the storage (default: the preset's name)")
    p.add_argument("--validation-size", type=int, metavar="N",
                   help="training images held out to judge trials (default a sixth: 10000 of MNIST's 60000)")
    p.add_argument("--validation-seed", type=int, default=0, help="seed of the validation split (default 0)")
    p.set_defaults(func=cmd_sweep)

    p = commands.add_parser("eval", help="test accuracy and loss of a run",
                            description="Evaluate a run's model on its dataset's test split.")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--json", action="store_true", help='print {"test_acc": .., "test_loss": .., "n": ..}')
    p.add_argument("--data-dir", help="MNIST IDX folder to read instead of the cache")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="default auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto (default) evaluates in fp32")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.set_defaults(func=cmd_eval)

    p = commands.add_parser("data", help="fetch, verify and cache a dataset; say which source served",
                            description="Fetch MNIST (data dir, cache, mirrors, then the offline fallback), verify "
                            "its SHA-256 digests, cache it and say which source served.")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "idx"], help="default mnist")
    p.add_argument("--data-dir", help="folder with the IDX files (plain or .gz)")
    p.set_defaults(func=cmd_data)

    p = commands.add_parser("analyze", help="the ViT paper's figures, analysis.json and report.html for a run",
                            description="Draw what a run's model learned (patch-embedding filters, position "
                            "embedding similarity, mean attention distance, attention rollout) and its errors "
                            "(confusion matrix, worst test errors) into OUT/plots/, with the numbers in "
                            "OUT/analysis.json and everything in one self-contained OUT/report.html.")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--out", type=Path, help="folder to write into (default: the run directory itself)")
    p.add_argument("--data-dir", help="MNIST IDX folder to read instead of the cache")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="default auto")
    p.set_defaults(func=cmd_analyze)

    p = commands.add_parser("predict", help="classify your own digit images (PNG, JPEG, BMP, GIF, WebP, TIFF)",
                            description="Classify digit image files, each preprocessed the way MNIST was made: "
                            "grayscale, a light background inverted, cropped to the ink, the longest side scaled "
                            "to 20 px, strokes brought to MNIST's width, pasted into 28x28 centred by centre of "
                            "mass. Exit 0 only when every file was read; 2 when any was refused (not an image, "
                            "truncated, over 20 MB, over 8192 px a side or 40 megapixels, no ink).")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="image files")
    p.add_argument("--model", type=Path, metavar="RUN",
                   help="run directory (default: the small fast-preset model shipped in the package)")
    p.add_argument("--json", action="store_true", help='print one JSON list of {"file", "label", "probs"} or '
                   '{"file", "error"}')
    p.add_argument("--top-k", type=int, default=3, metavar="K",
                   help="classes shown per file in text output (default 3)")
    p.add_argument("--save-preprocessed", type=Path, metavar="DIR",
                   help="also write the 28x28 image the model saw for each file into DIR")
    p.set_defaults(func=cmd_predict)

    p = commands.add_parser("export", help="export a run's model to ONNX or a Hugging Face transformers directory",
                            description="Export a run's model: --format onnx writes one .onnx file for onnxruntime "
                            "(input pixel_values (B, C, H, W) normalised as in training, output logits; "
                            "normalisation and class names in its metadata); --format hf writes a directory that "
                            "transformers' ViTForImageClassification and AutoImageProcessor load, with a model "
                            "card. The export is run once in onnxruntime or transformers and its logits checked "
                            "against PyTorch's. Needs: pip install 'vitscope[export]'.")
    p.add_argument("run", type=Path, help="run directory (or a Hugging Face directory vitscope exported)")
    p.add_argument("--format", required=True, choices=["onnx", "hf"], help="onnx or hf (Hugging Face transformers)")
    p.add_argument("--out", required=True, type=Path, help="the .onnx file, or the directory for --format hf")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("serve", help="a web page to draw a digit and watch the ViT attend, and its JSON API",
                            description="Serve a web page where you draw a digit (mouse, pen or touch) or drop an "
                            "image file and see the model's top classes, the 28x28 image it saw, the attention "
                            "rollout over it and each layer's and head's class-token attention; and the JSON API "
                            "behind it (POST /api/predict, GET /api/model, GET /api/health; schema at "
                            "/openapi.json). Works offline. Needs: pip install 'vitscope[serve]'.")
    p.add_argument("run", nargs="?", type=Path, metavar="RUN",
                   help="run directory (default: the small fast-preset model shipped in the package)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to others)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except VitscopeError as e:
        print(f"vitscope {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitscope {args.command}: interrupted", file=sys.stderr)
        return 130


def console_main() -> None:
    """The `vitscope` command: `main`, then an immediate exit. Every file it wrote is closed by then, and
    Python's own teardown of torch's modules would only cost time (docs/performance.md#process-overhead).
    Under a profiler or tracer (cProfile, coverage),
    which write their results at exit, it exits the usual way."""
    code = main()
    if sys.getprofile() is not None or sys.gettrace() is not None:
        raise SystemExit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):  # a closed pipe or stream: nothing left to write to
        pass
    os._exit(code or 0)
