"""The training loop: in-memory uint8 data, batched augmentation, one optimizer step per batch, an evaluation per
epoch, checkpoints that lose nothing, and a run directory that holds everything.

Under torchrun each process trains on its share of every global batch (DistributedDataParallel averages the
gradients; distributed.py has the rest), so N processes train the model one process would, up to the order of
the reductions. Checkpoints are written after every epoch and every `checkpoint_every` steps (else every few
minutes), and on SIGINT or SIGTERM; a resumed run, or a worker group torchrun restarts, continues from the last
one exactly where it was.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .config import (
    CHECKPOINT_SECONDS,
    COMPILE_MIN_STEPS,
    RESUME_MAY_CHANGE,
    RuntimeConfig,
    TrainConfig,
    ViTConfig,
    configs_from_record,
    contradictions,
)
from .data import BatchShare, Dataset, load_dataset, random_close, random_rotate_scale, random_shift, random_stroke
from .device import describe_hardware, select_device, select_precision
from .distributed import Distributed
from .errors import Interrupted, VitscopeError
from .evaluate import logits_of, score_sums, scores_from_sums
from .fastpath import executed_flops_per_image
from .model import build_model, count_parameters, flops_per_image
from .optim import MuonAdamW
from .plots import plot_training_curves
from .process import configure
from .rundir import RunDir, config_to_dict, parse_checkpoint
from .step import make_train_step


def default_out(preset: str, environ=None) -> Path:
    """runs/<preset>-<timestamp>; under torchrun runs/<preset>-<its run id>, which a restarted worker group finds
    again."""
    run_id = (environ if environ is not None else os.environ).get("TORCHELASTIC_RUN_ID")
    if run_id:
        return Path("runs") / f"{preset}-{re.sub(r'[^A-Za-z0-9_.-]', '_', run_id)}"
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
    CPU or CUDA device (torch.compile's MPS backend is still experimental). `steps`: the whole run's, so that a
    resumed run, which takes the choice from config.json (`recorded_compile`), computes as it began."""
    if runtime.compile != "auto":
        return runtime.compile
    return "on" if steps >= COMPILE_MIN_STEPS and device.type in ("cpu", "cuda") else "off"


def recorded_compile(record: dict) -> str | None:
    """The compiled-or-eager choice a run made ("on" even where torch.compile then failed and it ran eagerly)."""
    if "compiled" not in record:
        return None
    return "on" if record["compiled"] or record.get("compile_failed") else "off"


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Shuffling and augmentation of an epoch depend only on (seed, epoch): a resumed run sees the very
    batches an uninterrupted one would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of a process's own random draws (dropout) in a run of several: each draws its own."""
    return seed * 1_000_003 + 7_919 * (rank + 1)


def augment(images: torch.Tensor, config: TrainConfig, generator: torch.Generator,
            share: BatchShare | None = None) -> torch.Tensor:
    """The recipe's augmentations of a batch (B, H, W) uint8, or of a process's share of one."""
    images = random_rotate_scale(images, config.augment_rotate, config.augment_scale, generator, share)
    images = random_shift(images, config.augment_shift, generator, share)
    images = random_stroke(images, config.augment_stroke, generator, share)
    return random_close(images, config.augment_close, generator, share)


def run_record(preset: str, model_config: ViTConfig, train_config: TrainConfig, runtime: RuntimeConfig,
               dataset: Dataset, device: torch.device, precision: str, model: torch.nn.Module,
               compiled: bool = False, distributed: dict | None = None) -> dict:
    import safetensors
    hardware = describe_hardware(device)
    return {
        "vitscope_version": __version__, "preset": preset,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": train_config.seed, "model": config_to_dict(model_config), "train": config_to_dict(train_config),
        "runtime": config_to_dict(runtime), "dataset": dataset.describe(), "precision": precision,
        "compiled": compiled, "distributed": distributed or {"world_size": 1}, "hardware": hardware,
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




class StopSignals:
    """SIGINT and SIGTERM while a run trains. Before this process's first step there is nothing new to save, and a
    signal stops it at once; after it, the signal is noted, and the loop saves a checkpoint at the end of the step
    and stops there (every process at the same step: `Distributed.agree`)."""

    def __init__(self):
        self.received: int | None = None
        self.stepped = False  # whether this process has trained a step since it started
        self.previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum: int, frame) -> None:
        if not self.stepped:
            raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} before the first training step: "
                                      "nothing new to save")
        self.received = self.received or signum


class EpochTally:
    """An epoch's training loss at each step and its correct predictions, kept on the device (the loop never waits
    on them), each process counting its own share of every batch; `carried` from a checkpoint taken mid-epoch."""

    def __init__(self, steps: int, device: torch.device, carried: dict | None = None):
        self.losses = torch.zeros(steps, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        carried = carried or {}
        self.carried_losses = carried.get("epoch_losses", torch.zeros(steps))  # the whole batches' losses, CPU
        self.carried_correct = int(carried.get("epoch_correct", 0))
        self.carried_seconds = float(carried.get("epoch_seconds", 0.0))

    def add(self, step: int, loss: torch.Tensor, hits: torch.Tensor) -> None:
        self.losses[step] = loss
        self.correct += hits

    def running(self, begin: int, steps_done: int, share_size: int) -> tuple[float, float]:
        """This process's mean loss and accuracy over the steps from `begin` to `steps_done`, for the progress bar."""
        steps = steps_done - begin
        return self.losses[begin:steps_done].sum().item() / steps, self.correct.item() / (steps * share_size)

    def reduced(self, world: Distributed) -> tuple[torch.Tensor, int]:
        """The whole batches' loss at each step (the mean of the processes' shares; zeros for steps not yet taken)
        and the epoch's correct predictions over all processes."""
        losses = world.mean(self.losses.detach().clone()).cpu() + self.carried_losses
        return losses, world.sum(self.correct.clone()).item() + self.carried_correct


def first_nonfinite(losses: torch.Tensor) -> int | None:
    """The index of the first loss that is NaN or infinite."""
    bad = (~torch.isfinite(losses)).nonzero()
    return int(bad[0]) if len(bad) else None


def training_state(model, optimizer, scheduler, world: Distributed, epoch: int, done: int, history: list[dict],
                   device: torch.device, generator: torch.Generator | None = None,
                   tally: tuple[torch.Tensor, int, float] | None = None) -> dict:
    """Everything a resumed run needs to go on exactly: weights, optimizer, schedule, every process's random state,
    the run's position (`epoch` finished, `done` steps in all) and its metrics; mid-epoch also the data generator
    and the epoch's tally so far (losses, correct, seconds). Collective: every process calls it."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "epoch": epoch, "step": done, "history": history, "rng_cpu": world.gather(torch.get_rng_state())}
    if device.type == "cuda":
        state["rng_cuda"] = world.gather(torch.cuda.get_rng_state())
    if generator is not None:
        losses, correct, seconds = tally
        state.update(data_rng=generator.get_state(), epoch_losses=losses, epoch_correct=correct,
                     epoch_seconds=seconds)
    return state


def restore_random_state(checkpoint: dict, world: Distributed, seed: int, device: torch.device) -> None:
    """Each process's random state from the checkpoint (of the same number of processes); with another number of
    processes each seeds its own anew (only dropout draws from it)."""
    for key, setter in (("rng_cpu", torch.set_rng_state),
                        ("rng_cuda", torch.cuda.set_rng_state if device.type == "cuda" else None)):
        if key not in checkpoint or setter is None:
            continue
        states = checkpoint[key] if checkpoint[key].dim() == 2 else checkpoint[key].unsqueeze(0)  # older: one
        if len(states) == world.world_size:
            setter(states[world.rank].clone())  # a copy of its own: the setters read a row at offset 0 (torch 2.13)
        else:
            torch.manual_seed(rank_seed(seed + checkpoint["step"], world.rank))


def read_record(run: RunDir) -> dict | None:
    """The config.json of a vitscope training run at `run`, else None (no file, or someone else's)."""
    try:
        record = json.loads(run.config_file.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "vitscope_version" in record and "train" in record else None


def plan_start(run: RunDir, world: Distributed, resume: bool, overwrite: bool,
               given: dict) -> tuple[dict, bytes | None]:
    """What rank 0 finds at `--out`, as {"resume": bool, "record": config.json or None, "note": a line for the log}
    or {"error": message}, and the checkpoint's bytes: a new run, the run there continued, or a refusal."""
    if run.path.exists() and not run.path.is_dir():
        return {"error": f"--out {run.path} is a file, not a folder"}, None
    record = read_record(run)
    restarted = (record is not None and world.restart > 0 and world.run_id is not None
                 and record.get("distributed", {}).get("torchrun_run_id") == world.run_id)
    if resume or restarted:
        if record is None:
            return {"error": f"{run.path} is not a vitscope run directory (no config.json): nothing to resume"
                    if run.path.is_dir() else f"no run directory at {run.path}: nothing to resume"}, None
        problems = contradictions(record, given)
        if problems:
            return {"error": f"{run.path} holds a run with other settings than these: {'; '.join(problems)}. "
                    "A resumed run keeps its own: leave them out, or start a new run (another --out, or "
                    "--overwrite)"}, None
        checkpoint = run.read_checkpoint()
        note = f"torchrun restart {world.restart}: continuing {run.path}" if restarted else f"continuing {run.path}"
        if checkpoint is None:
            note += " from the beginning (it has no checkpoint yet)"
        return {"resume": True, "record": record, "note": note}, checkpoint
    if record is not None and not overwrite:
        unstarted = run.read_checkpoint() is None and not run.weights_file.exists()
        if not (unstarted and not contradictions(record, given)):
            return {"error": f"{run.path} already holds a run: pass --resume to continue it, --overwrite to replace "
                             "it, or choose another --out"}, None
        overwrite = True  # stopped before its first checkpoint: the same command starts it again
    elif record is None and not run.is_empty() and not overwrite:  # someone else's files, a config.json too
        return {"error": f"{run.path} holds other files, not a vitscope run: choose another --out, or pass "
                         "--overwrite to write the run into it"}, None
    if overwrite and run.path.is_dir():
        run.clear()
    return {"resume": False, "record": None, "note": None}, None


def open_run(run: RunDir, world: Distributed, resume: bool, overwrite: bool, given: dict):
    """`plan_start` on rank 0, and its answer on every process: (config.json of the run continued or None, its
    checkpoint or None, a note for the log). A refusal is a VitscopeError on every process."""
    plan, checkpoint = plan_start(run, world, resume, overwrite, given) if world.is_main else (None, None)
    plan = json.loads(world.broadcast_bytes(json.dumps(plan).encode() if world.is_main else None))
    if "error" in plan:
        raise VitscopeError(plan["error"])
    data = world.broadcast_bytes((checkpoint or b"") if world.is_main else None) if plan["resume"] else None
    return plan["record"], parse_checkpoint(data, run.checkpoint_file) if data else None, plan["note"]


def train(model_config: ViTConfig | None, train_config: TrainConfig | None, out: str | Path, preset: str = "custom",
          resume: bool = False, progress: bool = True, stop_after_epoch: int | None = None,
          threads: int | None = None, log=print, runtime: RuntimeConfig | None = None, overwrite: bool = False,
          given: dict | None = None, dataset: Dataset | None = None,
          on_epoch: Callable[[dict], None] | None = None) -> RunDir:
    """Train and write a run directory at `out`. With `resume`, continue the run there from its last checkpoint
    (from its start where it has none): its own config.json rules, `given` (the fields a user set, "preset" too)
    must agree with it except for RESUME_MAY_CHANGE, and `threads` may still change. Without it, `out` must be new,
    empty, or hold a run of these settings stopped before its first checkpoint; `overwrite` replaces what a run
    wrote there. Under torchrun this is one process of a data-parallel run, and a restarted worker group continues
    its run by itself. `runtime` defaults to RuntimeConfig(). `stop_after_epoch` ends this call early, as an
    interruption would, leaving a resumable checkpoint. SIGINT and SIGTERM save a checkpoint and raise
    `Interrupted`. `dataset`, where given, is used instead of loading the one `train_config` names (a sweep's
    trials share one whose held-out split is carved from the training images). `on_epoch(row)` is called with
    each epoch's metrics once they are saved; an exception it raises (a pruned sweep trial) ends training there."""
    if resume and overwrite:
        raise VitscopeError("--resume continues the run in --out and --overwrite replaces it: choose one")
    world = Distributed.from_environment()
    try:
        with StopSignals() as signals:
            return _train(world, signals, model_config, train_config, RunDir(out), preset, resume, progress,
                          stop_after_epoch, threads, log if world.is_main else _quiet, runtime, overwrite, given,
                          dataset, on_epoch)
    finally:
        world.close()


def _quiet(*args, **kwargs) -> None:
    pass


def _train(world: Distributed, signals: StopSignals, model_config, train_config, run: RunDir, preset: str,
           resume: bool, progress: bool, stop_after_epoch, threads, log, runtime, overwrite, given, dataset,
           on_epoch) -> RunDir:
    if not resume:
        runtime = runtime or RuntimeConfig()
        given = {**config_to_dict(model_config), **config_to_dict(train_config), **config_to_dict(runtime),
                 "preset": preset}
    record, checkpoint, note = open_run(run, world, resume, overwrite, given or {})
    if record is not None:
        model_config, train_config, runtime = configs_from_record(record)
        runtime = dataclasses.replace(runtime, **{k: v for k, v in (given or {}).items() if k in RESUME_MAY_CHANGE})
        preset = record.get("preset", preset)
    model_config.validate()
    train_config.validate()
    runtime.validate()
    configure(runtime, threads or runtime.threads or world.threads_per_process())
    device = select_device(runtime.device)
    if device.type == "mps" and world.world_size > 1:
        raise VitscopeError("training on several processes needs CPUs (gloo) or CUDA GPUs (NCCL), not MPS")
    if device.type == "cuda" and world.local_world_size > torch.cuda.device_count():
        raise VitscopeError(f"{world.local_world_size} training processes on this machine but "
                            f"{torch.cuda.device_count()} GPUs: start one per GPU (--nproc_per_node)")
    precision = select_precision(runtime.precision, device)

    if dataset is None:
        if not world.local_rank == 0:  # one process per machine fetches and caches the data first, then the others
            world.barrier()
        dataset = load_dataset(train_config.dataset, train_config.data_dir, train_config.max_train_samples)
        if world.local_rank == 0:
            world.barrier()
    # Image size and class count come from the data (an IDX set may be 32x32 with 26 classes).
    model_config = dataclasses.replace(model_config, image_size=dataset.image_size, num_classes=dataset.num_classes)
    log(f"data: {dataset.name} from {dataset.source}: {len(dataset.train_labels)} train, "
        f"{len(dataset.test_labels)} test images of {dataset.image_size}x{dataset.image_size}, "
        f"{dataset.num_classes} classes")

    n_train = len(dataset.train_labels)
    batch_size = min(train_config.batch_size, n_train)  # the global batch, over all processes
    if batch_size % world.world_size:
        raise VitscopeError(f"batch size {batch_size} is not divisible by the {world.world_size} processes: each "
                            "takes an equal share of every batch; choose a multiple of the process count")
    share_size = batch_size // world.world_size
    share = (BatchShare(world.rank * share_size, (world.rank + 1) * share_size, batch_size)
             if world.world_size > 1 else None)
    steps_per_epoch = n_train // batch_size  # the last partial batch is dropped: every step has one shape
    epochs = train_config.epochs
    total_steps = steps_per_epoch * epochs
    compile_setting = (recorded_compile(record) if record is not None else None) \
        or settle_compile(runtime, device, total_steps)
    # DDP averages gradients in autograd's backward pass; the whole compiled step takes its gradients with
    # torch.func inside one graph that also applies the update, leaving no point for the all-reduce: several
    # processes run the usual step.
    step_runtime = dataclasses.replace(runtime, compile=compile_setting,
                                       compile_whole_step=runtime.compile_whole_step and world.world_size == 1)

    torch.manual_seed(train_config.seed)
    model = build_model(model_config, runtime).to(device)
    if world.world_size > 1:
        torch.manual_seed(rank_seed(train_config.seed, world.rank))
    optimizer = make_optimizer(model, train_config, step_runtime)
    scheduler = make_scheduler(optimizer, train_config, steps_per_epoch)
    history: list[dict] = []
    done = 0  # optimizer steps taken, all epochs
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        restore_random_state(checkpoint, world, train_config.seed, device)
        history = checkpoint["history"]
        done = checkpoint.get("step", checkpoint["epoch"] * steps_per_epoch)
    last_saved = done if checkpoint is not None else None
    if note:
        log(f"{note}, after step {done} of {total_steps}" if checkpoint is not None else note)
        if record.get("distributed", {}).get("world_size", 1) != world.world_size:
            log(f"note: the run began with world size {record['distributed']['world_size']} and goes on with "
                f"{world.world_size}, with the same global batch: the same training up to the order of reductions")
    if record is None and world.is_main:
        run.write_config(run_record(preset, model_config, train_config, runtime, dataset, device, precision, model,
                                    compiled=compile_setting == "on", distributed=world.describe()))
    if world.is_main:
        run.write_metrics(history)
    processes = (f", {world.world_size} processes (DistributedDataParallel, {world.backend}; {share_size} images "
                 f"of each batch of {batch_size} per process)" if world.world_size > 1 else "")
    log(f"model: {model_config.architecture} ViT, {count_parameters(model):,} parameters, "
        f"{model_config.num_patches} patches of {model_config.patch_size}x{model_config.patch_size}; "
        f"device {device}, {precision}, {torch.get_num_threads()} threads{processes}, "
        f"{'compiled' if compile_setting == 'on' else 'eager'}")

    train_images = dataset.train_images.to(device)
    train_labels = dataset.train_labels.to(device)
    test_part = world.share(len(dataset.test_labels))  # every test image once, over all processes
    test_images, test_labels = dataset.test_images[test_part].to(device), dataset.test_labels[test_part]
    train_step = make_train_step(world.wrap(model), optimizer, scheduler, train_config, step_runtime, model_config,
                                 device, precision)

    def save(epoch: int, generator=None, tally=None) -> None:
        """A checkpoint of the run after `done` steps (collective; rank 0 writes it), unless the loss went bad."""
        nonlocal last_saved
        if not all(torch.isfinite(p).all() for p in model.parameters()):  # the same on every process
            stop_nonfinite(run, done, total_steps, steps_per_epoch, last_saved, "the weights")
        state = training_state(model, optimizer, scheduler, world, epoch, done, history, device, generator, tally)
        if world.is_main:
            run.save_checkpoint(state)
        last_saved = done

    def checked(tally: tuple[torch.Tensor, int], epoch: int) -> tuple[torch.Tensor, int]:
        """The epoch's tally, if every loss in it is finite."""
        bad = first_nonfinite(tally[0])
        if bad is not None:
            stop_nonfinite(run, epoch * steps_per_epoch + bad + 1, total_steps, steps_per_epoch, last_saved,
                           "the training loss")
        return tally

    first_epoch, first_step = divmod(done, steps_per_epoch)
    tensorboard = TensorBoard(run.path / "tensorboard" if runtime.tensorboard and world.is_main else None)
    last_checkpoint_time = time.monotonic()
    for epoch in range(first_epoch, epochs):
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
        model.train()
        generator = epoch_generator(train_config.seed, epoch)
        order = torch.randperm(n_train, generator=generator).to(device)
        resumed_here = checkpoint is not None and epoch == first_epoch and first_step > 0
        if resumed_here:
            generator.set_state(checkpoint["data_rng"])  # where the epoch's augmentation draws had got to
        tally = EpochTally(steps_per_epoch, device, checkpoint if resumed_here else None)
        begin = first_step if resumed_here else 0
        bar = tqdm(total=steps_per_epoch, initial=begin, desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                   leave=False, disable=not (progress and world.is_main), file=sys.stderr, dynamic_ncols=True)
        start, paused = time.perf_counter(), 0.0
        for step in range(begin, steps_per_epoch):
            first = step * batch_size + (share.start if share else 0)
            index = order[first:first + share_size]
            loss, hits = train_step(augment(train_images[index], train_config, generator, share), train_labels[index])
            tally.add(step, loss, hits)
            done += 1
            signals.stepped = True
            if progress and world.is_main and (step % 25 == 24 or step == steps_per_epoch - 1):
                seen = (step + 1 - begin) * batch_size
                running_loss, running_accuracy = tally.running(begin, step + 1, share_size)
                bar.set_postfix(loss=f"{running_loss:.4f}", acc=f"{running_accuracy:.2%}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}", refresh=False)
                bar.update(step + 1 - bar.n)
            due = (done % runtime.checkpoint_every == 0 if runtime.checkpoint_every
                   else time.monotonic() - last_checkpoint_time >= CHECKPOINT_SECONDS)
            stop, due = world.agree(signals.received or 0, int(due))
            if (stop or due) and step + 1 < steps_per_epoch:  # the epoch's end saves anyway
                saving = time.perf_counter()
                losses, correct = checked(tally.reduced(world), epoch)
                seconds = tally.carried_seconds + saving - start - paused
                save(epoch, generator, (losses, correct, seconds))
                last_checkpoint_time = time.monotonic()
                paused += time.perf_counter() - saving
            if stop:
                bar.close()
                raise interrupted(stop, world, run, done, total_steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = tally.carried_seconds + time.perf_counter() - start - paused
        bar.close()
        losses, correct = checked(tally.reduced(world), epoch)
        if epoch == first_epoch and train_step.compiled is not None:
            log(train_step.compiled.describe())  # why this process's first epoch took longer, or did not
            if getattr(train_step, "graph_note", None):
                log(train_step.graph_note)
            if getattr(train_step.compiled, "source", None) == "eager" and world.is_main:  # say what ran
                run.write_config({**run.read_config(), "compiled": False, "compile_failed": True})
        lr = optimizer.param_groups[0]["lr"]  # where the schedule stands at the end of the epoch
        # The last epoch is evaluated in fp32 whatever the training precision, so the final row of metrics.jsonl
        # and `vitscope eval` agree; the epochs before it in the training precision (bf16 halves the cost of
        # an evaluation on a CPU with native bf16, and the curve moves by ~0.01%).
        final = epoch + 1 == epochs
        logits = logits_of(model, test_images, model_config.pixel_mean, model_config.pixel_std,
                           runtime.eval_batch_size, device, "fp32" if final else precision)
        result = scores_from_sums(world.sum(score_sums(logits, test_labels)))  # each process scored its part
        seen = steps_per_epoch * batch_size
        row = {"epoch": epoch + 1, "train_loss": losses.sum().item() / steps_per_epoch, "train_acc": correct / seen,
               "test_loss": result["test_loss"], "test_acc": result["test_acc"], "lr": lr,
               "seconds": round(seconds, 3), "images_per_second": round(seen / seconds, 1)}
        history.append(row)
        save(epoch + 1)
        last_checkpoint_time = time.monotonic()
        if world.is_main:
            run.write_metrics(history)
            tensorboard.log(row)
        log(f"epoch {epoch + 1:>3}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%}  "
            f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.2%}  lr {lr:.2e}  "
            f"{seconds:.1f} s  {row['images_per_second']:.0f} img/s")
        if on_epoch is not None:
            on_epoch(row)
        stop = world.agree(signals.received or 0)[0]
        if stop and not final:
            raise interrupted(stop, world, run, done, total_steps)
    tensorboard.close()

    if len(history) == epochs and world.is_main:
        run.save_weights(model)
        plot_training_curves(history, run.plots, title=f"{preset} ({model_config.architecture})")
        log(f"done: test accuracy {history[-1]['test_acc']:.2%} after {epochs} epochs, "
            f"{sum(row['seconds'] for row in history):.0f} s of training")
    elif len(history) < epochs:
        log(f"stopped after epoch {len(history)} of {epochs}; continue with --resume --out {run.path}")
    log(f"run directory: {run.path}")
    return run


def interrupted(signum: int, world: Distributed, run: RunDir, done: int, total_steps: int) -> Interrupted:
    return Interrupted(signum, f"stopped by {signal.Signals(signum).name} after step {done} of {total_steps}: "
                               f"checkpoint saved; continue with --resume --out {run.path}" if world.is_main else "")


def stop_nonfinite(run: RunDir, step: int, total_steps: int, steps_per_epoch: int, last_saved: int | None,
                   what: str) -> None:
    kept = (f"the last good checkpoint (after step {last_saved}) is kept in {run.checkpoint_file.parent}"
            if last_saved is not None else "no checkpoint was written before it")
    raise VitscopeError(f"{what} became NaN or infinite at step {step} of {total_steps} (epoch "
                        f"{(step - 1) // steps_per_epoch + 1}): training stopped; {kept}; lower the learning rate "
                        "(--lr) or clip gradients (grad_clip), and start again (--overwrite)")
