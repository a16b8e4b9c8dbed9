"""The training loop: in-memory uint8 data, batched augmentation, one optimizer step per batch, an
evaluation and an atomic checkpoint per epoch, and a run directory that holds everything."""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .config import COMPILE_MIN_STEPS, RuntimeConfig, TrainConfig, ViTConfig
from .data import Dataset, load_dataset, random_close, random_rotate_scale, random_shift, random_stroke
from .device import describe_hardware, select_device, select_precision
from .errors import VitscopeError
from .evaluate import evaluate
from .fastpath import executed_flops_per_image
from .model import build_model, count_parameters, flops_per_image
from .optim import MuonAdamW
from .plots import plot_training_curves
from .process import configure
from .rundir import RunDir, config_to_dict
from .step import make_train_step


def default_out(preset: str) -> Path:
    return Path("runs") / f"{preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def parameter_groups(model: torch.nn.Module, weight_decay: float, muon_lr: float | None = None) -> list[dict]:
    """Weight decay on matrices only: not on biases, LayerNorm, the class token or position embeddings.
    With `muon_lr`, the encoder blocks' matrices form a group of their own for Muon."""
    decay, no_decay, muon = [], [], []
    for name, param in model.named_parameters():
        if muon_lr is not None and param.ndim == 2 and name.startswith("blocks."):
            muon.append(param)
        elif param.ndim < 2 or name.endswith(("cls_token", "pos_embed")):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if muon_lr is not None:  # last, so param_groups[0]["lr"] (logged per epoch) stays the AdamW rate
        groups.append({"params": muon, "weight_decay": weight_decay, "lr": muon_lr, "muon": True})
    return [group for group in groups if group["params"]]


def make_optimizer(model: torch.nn.Module, config: TrainConfig, runtime: RuntimeConfig) -> torch.optim.Optimizer:
    """The recipe's optimizer; `runtime.compile` (settled to "on" or "off") compiles Muon's update."""
    if config.optimizer == "muon":
        return MuonAdamW(parameter_groups(model, config.weight_decay, config.muon_lr), lr=config.lr,
                         betas=(0.9, config.beta2), compile=runtime.compile == "on")
    groups = parameter_groups(model, config.weight_decay)
    # The fused kernel updates every parameter in one call: at 40k parameters in ~40 tensors the per-tensor
    # loop of the default implementation is a tenth of a training step on a CPU.
    device = next(model.parameters()).device.type
    fused = runtime.fused_optimizer and device in ("cpu", "cuda")
    optimizer = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return optimizer(groups, lr=config.lr, betas=(0.9, config.beta2), fused=fused or None)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warmup over `warmup_steps`, then constant or cosine decay to zero at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, config.schedule))


def settle_compile(runtime: RuntimeConfig, device: torch.device, steps: int) -> str:
    """"on" or "off": compile = "auto" compiles where it pays, runs of COMPILE_MIN_STEPS steps or more on a
    CPU or CUDA device (torch.compile's MPS backend is still experimental)."""
    if runtime.compile != "auto":
        return runtime.compile
    return "on" if steps >= COMPILE_MIN_STEPS and device.type in ("cpu", "cuda") else "off"


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Shuffling and augmentation of an epoch depend only on (seed, epoch): a resumed run sees the very
    batches an uninterrupted one would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def run_record(preset: str, model_config: ViTConfig, train_config: TrainConfig, runtime: RuntimeConfig,
               dataset: Dataset, device: torch.device, precision: str, model: torch.nn.Module,
               compiled: bool = False) -> dict:
    import safetensors
    hardware = describe_hardware(device)
    return {
        "vitscope_version": __version__, "preset": preset,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": train_config.seed, "model": config_to_dict(model_config), "train": config_to_dict(train_config),
        "runtime": config_to_dict(runtime), "dataset": dataset.describe(), "precision": precision,
        "compiled": compiled, "hardware": hardware,
        "versions": {"vitscope": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "safetensors": safetensors.__version__, "python": hardware["python"]},
        "parameters": count_parameters(model), "flops_per_image": flops_per_image(model_config),
        "flops_per_image_executed": executed_flops_per_image(model_config, runtime),
    }


class TensorBoard:
    """Optional TensorBoard scalars (pip install 'vitscope[tensorboard]')."""

    def __init__(self, folder: Path | None):
        self.writer = None
        if folder is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise VitscopeError("--tensorboard needs the tensorboard package: "
                                    "pip install 'vitscope[tensorboard]'") from None
            self.writer = SummaryWriter(str(folder))

    def log(self, row: dict) -> None:
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch":
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(model_config: ViTConfig | None, train_config: TrainConfig | None, out: str | Path, preset: str = "custom",
          resume: bool = False, progress: bool = True, stop_after_epoch: int | None = None,
          threads: int | None = None, log=print, runtime: RuntimeConfig | None = None, dataset: Dataset | None = None,
          on_epoch: Callable[[dict], None] | None = None) -> RunDir:
    """Train and write a run directory at `out`; with `resume`, continue the run there from its checkpoint
    (its own config.json rules; `threads` may still change). `runtime` defaults to RuntimeConfig().
    `stop_after_epoch` ends this call early, as an interruption would, leaving a resumable checkpoint.
    `dataset`, where given, is used instead of loading the one `train_config` names (a sweep's trials share one
    whose held-out split is carved from the training images). `on_epoch(row)` is called with each epoch's metrics
    once they are saved; an exception it raises (a pruned sweep trial) ends training there."""
    run = RunDir(out)
    if resume:
        model_config, train_config, runtime = run.configs()
        preset = run.read_config().get("preset", preset)
        checkpoint = run.load_checkpoint()
    else:
        if run.exists():
            raise VitscopeError(f"{run.path} already holds a run: pass --resume to continue it, "
                                "or choose another --out")
        checkpoint = None
    runtime = runtime or RuntimeConfig()
    model_config.validate()
    train_config.validate()
    runtime.validate()
    configure(runtime, threads)
    device = select_device(runtime.device)
    precision = select_precision(runtime.precision, device)

    if dataset is None:
        dataset = load_dataset(train_config.dataset, train_config.data_dir, train_config.max_train_samples)
    # Image size and class count come from the data (an IDX set may be 32x32 with 26 classes).
    model_config = dataclasses.replace(model_config, image_size=dataset.image_size, num_classes=dataset.num_classes)
    log(f"data: {dataset.name} from {dataset.source}: {len(dataset.train_labels)} train, "
        f"{len(dataset.test_labels)} test images of {dataset.image_size}x{dataset.image_size}, "
        f"{dataset.num_classes} classes")

    n_train = len(dataset.train_labels)
    batch_size = min(train_config.batch_size, n_train)
    steps_per_epoch = n_train // batch_size  # the last partial batch is dropped: every step has one shape
    start_epoch = checkpoint["epoch"] if checkpoint is not None else 0
    compile_setting = settle_compile(runtime, device, steps_per_epoch * (train_config.epochs - start_epoch))
    step_runtime = dataclasses.replace(runtime, compile=compile_setting)  # "auto" settled

    torch.manual_seed(train_config.seed)
    model = build_model(model_config, runtime).to(device)
    optimizer = make_optimizer(model, train_config, step_runtime)
    scheduler = make_scheduler(optimizer, train_config, steps_per_epoch)
    history: list[dict] = []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in checkpoint:
            torch.cuda.set_rng_state(checkpoint["rng_cuda"])
        history = checkpoint["history"]
        log(f"resuming {run.path} after epoch {start_epoch} of {train_config.epochs}")
    else:
        run.write_config(run_record(preset, model_config, train_config, runtime, dataset, device, precision, model,
                                    compiled=compile_setting == "on"))
    run.write_metrics(history)
    log(f"model: {model_config.architecture} ViT, {count_parameters(model):,} parameters, "
        f"{model_config.num_patches} patches of {model_config.patch_size}x{model_config.patch_size}; "
        f"device {device}, {precision}, {torch.get_num_threads()} threads, "
        f"{'compiled' if compile_setting == 'on' else 'eager'}")

    train_images = dataset.train_images.to(device)
    train_labels = dataset.train_labels.to(device)
    test_images, test_labels = dataset.test_images.to(device), dataset.test_labels
    train_step = make_train_step(model, optimizer, scheduler, train_config, step_runtime, model_config, device,
                                 precision)

    tensorboard = TensorBoard(run.path / "tensorboard" if runtime.tensorboard else None)
    epochs = train_config.epochs
    for epoch in range(start_epoch, epochs):
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
        model.train()
        generator = epoch_generator(train_config.seed, epoch)
        order = torch.randperm(n_train, generator=generator).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                   disable=not progress, file=sys.stderr, dynamic_ncols=True)
        start = time.perf_counter()
        for step in range(steps_per_epoch):
            index = order[step * batch_size:(step + 1) * batch_size]
            images = random_rotate_scale(train_images[index], train_config.augment_rotate,
                                         train_config.augment_scale, generator)
            images = random_shift(images, train_config.augment_shift, generator)
            images = random_stroke(images, train_config.augment_stroke, generator)
            images = random_close(images, train_config.augment_close, generator)
            loss, hits = train_step(images, train_labels[index])
            loss_sum += loss
            correct += hits
            if progress and (step % 25 == 24 or step == steps_per_epoch - 1):
                seen = (step + 1) * batch_size
                bar.set_postfix(loss=f"{loss_sum.item() / (step + 1):.4f}", acc=f"{correct.item() / seen:.2%}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}", refresh=False)
                bar.update(step + 1 - bar.n)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        bar.close()
        if epoch == start_epoch and train_step.compiled is not None:
            log(train_step.compiled.describe())  # why this process's first epoch took longer, or did not
            if getattr(train_step, "graph_note", None):
                log(train_step.graph_note)
            if getattr(train_step.compiled, "source", None) == "eager":  # torch.compile failed: say what ran
                record = run.read_config()
                run.write_config({**record, "compiled": False, "compile_failed": True})
        lr = optimizer.param_groups[0]["lr"]  # where the schedule stands at the end of the epoch
        # The last epoch is evaluated in fp32 whatever the training precision, so the final row of metrics.jsonl
        # and `vitscope eval` agree; the epochs before it in the training precision (bf16 halves the cost of
        # an evaluation on a CPU with native bf16, and the curve moves by ~0.01%).
        final = epoch + 1 == epochs
        result = evaluate(model, test_images, test_labels, model_config.pixel_mean, model_config.pixel_std,
                          runtime.eval_batch_size, device, "fp32" if final else precision)
        seen = steps_per_epoch * batch_size
        row = {"epoch": epoch + 1, "train_loss": loss_sum.item() / steps_per_epoch, "train_acc": correct.item() / seen,
               "test_loss": result["test_loss"], "test_acc": result["test_acc"], "lr": lr,
               "seconds": round(seconds, 3), "images_per_second": round(seen / seconds, 1)}
        history.append(row)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": history,
                 "rng_cpu": torch.get_rng_state()}
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state()
        run.save_checkpoint(state)
        run.write_metrics(history)
        tensorboard.log(row)
        log(f"epoch {epoch + 1:>3}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%}  "
            f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.2%}  lr {lr:.2e}  "
            f"{seconds:.1f} s  {row['images_per_second']:.0f} img/s")
        if on_epoch is not None:
            on_epoch(row)
    tensorboard.close()

    if len(history) == epochs:
        run.save_weights(model)
        plot_training_curves(history, run.plots, title=f"{preset} ({model_config.architecture})")
        log(f"done: test accuracy {history[-1]['test_acc']:.2%} after {epochs} epochs, "
            f"{sum(row['seconds'] for row in history):.0f} s of training")
    else:
        log(f"stopped after epoch {len(history)} of {epochs}; continue with --resume --out {run.path}")
    log(f"run directory: {run.path}")
    return run
