"""Typed configuration, split by meaning: the architecture (`ViTConfig`, what a checkpoint needs), the training
recipe (`TrainConfig`) and how a run computes (`RuntimeConfig`); and the presets, one of each.

Every speed or accuracy lever is a field, so an ablation is one flag or one line of a --config file.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import VitscopeError


@dataclass
class ViTConfig:
    """The architecture: everything a checkpoint needs to be read back, and nothing about how it was computed."""

    image_size: int = 28
    patch_size: int = 7
    in_channels: int = 1
    num_classes: int = 10
    dim: int = 32
    depth: int = 3
    heads: int = 4
    mlp_dim: int = 128
    dropout: float = 0.0
    architecture: str = "vit"  # "vit" (the paper's) or "blog" (the seed blog's, quirks kept)
    # Standard deviation of the position embeddings at initialisation. timm and the paper use 0.02; at 16
    # tokens a larger one lets the class token tell patches apart from the first step (fast preset: 1.0).
    pos_embed_std: float = 0.02
    # How pixels in [0, 1] are normalised before the model sees them (part of the model's contract,
    # recorded so predict, serve and export feed it the same way).
    pixel_mean: float = 0.1307
    pixel_std: float = 0.3081

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        if self.architecture not in ("vit", "blog"):
            raise VitscopeError(f"unknown architecture {self.architecture!r}: choose vit or blog")
        if self.image_size % self.patch_size:
            raise VitscopeError(f"patch_size {self.patch_size} does not divide image_size {self.image_size}")
        if self.dim % self.heads:
            raise VitscopeError(f"dim {self.dim} is not divisible by heads {self.heads}")


@dataclass
class TrainConfig:
    """The training recipe: what the model learns from, and how."""

    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "adamw"  # "adam", "adamw", or "muon" (Muon on the blocks' matrices, AdamW on the rest)
    lr: float = 3e-4
    muon_lr: float = 0.01  # the Muon groups' peak learning rate (RMS-matched to AdamW's), with optimizer "muon"
    weight_decay: float = 0.0
    beta2: float = 0.999
    schedule: str = "constant"  # "constant" or "cosine" (linear warmup, then cosine to zero)
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    softmax_before_loss: bool = False  # the blog's bug: CrossEntropyLoss applied to probabilities
    augment_shift: int = 0  # random translation by up to this many pixels, done in batches
    augment_rotate: float = 0.0  # random rotation by up to this many degrees (0 = off)
    augment_scale: float = 0.0  # random scaling by a factor in [1 - this, 1 + this] (0 = off)
    augment_stroke: float = 0.0  # strokes thinned (by <= 1 px) or thickened by up to this many px (0 = off)
    augment_close: int = 0  # random closing (dilate, then erode) by up to this many px: fills small holes
    grad_clip: float = 0.0  # 0 = off
    seed: int = 0
    dataset: str = "mnist"  # "mnist" or "idx"
    data_dir: str | None = None
    max_train_samples: int | None = None

    def validate(self) -> None:
        _check_choices(self, {"optimizer": ("adam", "adamw", "muon"), "schedule": ("constant", "cosine"),
                              "dataset": ("mnist", "idx")})
        if self.epochs < 1 or self.batch_size < 1:
            raise VitscopeError("epochs and batch_size must be at least 1")
        if self.dataset == "idx" and not self.data_dir:
            raise VitscopeError("--dataset idx needs --data-dir DIR holding the IDX files")


@dataclass
class RuntimeConfig:
    """How a run computes: where, in which precision, compiled or not, through which kernels. None of it changes
    what the model learns beyond rounding; every speed lever is a field, so an ablation is one flag."""

    device: str = "auto"  # auto, cpu, cuda, mps
    precision: str = "auto"  # auto (bf16 only where the device computes it natively), fp32, bf16
    threads: int | None = None  # torch intra-op threads; None = torch's default
    # torch.compile the training step: "on", "off", or "auto" = on for runs of at least COMPILE_MIN_STEPS steps
    # on a CPU or CUDA device, where compiling pays back (docs/performance.md#compiling). true / false: on / off.
    compile: str | bool = "auto"
    # With compile on: forward, backward, clipping and the optimizer's update as one graph (step.WholeStep).
    # False: forward and loss compiled, backward and the update eager.
    compile_whole_step: bool = True
    # With the whole step compiled: keep it on disk and load it in later processes instead of tracing it again
    # (compiled.precompiled).
    save_compiled_step: bool = True
    # With the whole step compiled, on a CUDA GPU: replay it as a CUDA graph (step.CapturedStep). Off until it
    # has been measured on a GPU (benchmarks/gpu_check.sh).
    cuda_graph: bool = False
    # One fused Adam(W) kernel for all parameters, where the optimizer's own step runs (eager runs, or
    # compile_whole_step = false; the whole compiled step fuses the update itself).
    fused_optimizer: bool = True
    # glibc's malloc keeps freed memory for the next step instead of returning it to the OS
    # (process.keep_freed_memory): no page faults per step.
    keep_freed_memory: bool = True
    eval_batch_size: int = 1000
    tensorboard: bool = False
    # A checkpoint every this many optimizer steps, and after every epoch; None: about every CHECKPOINT_SECONDS of
    # training, and after every epoch.
    checkpoint_every: int | None = None
    # The CPU fast paths of fastpath.py, each one switch. Attention: "auto" (what measured fastest on this
    # device), "fused" (F.scaled_dot_product_attention), "explicit" (softmax(QK^T * scale) V as three ops) or
    # "kernel" (vitscope's CPU kernel).
    attention: str = "auto"
    # The MLP's GELU in training: "auto", "aten" (F.gelu), "one-exp" (one exp for GELU and its slope), "kernel".
    gelu: str = "auto"
    # Where a kernel runs, the layer before it is a plain matmul and the kernel adds that layer's bias.
    bias_in_kernels: bool = True
    # The last block computes the class token's output alone: the head reads nothing else.
    last_block_class_token_only: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):  # config files and runs from before "auto" say true / false
            self.compile = "on" if self.compile else "off"

    def validate(self) -> None:
        _check_choices(self, {"device": ("auto", "cpu", "cuda", "mps"), "precision": ("auto", "fp32", "bf16"),
                              "compile": ("auto", "on", "off"), "attention": ("auto", "fused", "explicit", "kernel"),
                              "gelu": ("auto", "aten", "one-exp", "kernel")})
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise VitscopeError("--checkpoint-every must be at least 1 step")


def _check_choices(config, choices: dict[str, tuple[str, ...]]) -> None:
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise VitscopeError(f"{name} must be one of {', '.join(allowed)}, not {getattr(config, name)!r}")


@dataclass
class Preset:
    name: str
    description: str
    model: ViTConfig = field(default_factory=ViTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


FAST_RECIPE = TrainConfig(epochs=5, batch_size=256, optimizer="muon", lr=3e-3, muon_lr=8e-3, weight_decay=0.05,
                          schedule="cosine", warmup_epochs=0.1, label_smoothing=0.1, augment_shift=1,
                          augment_rotate=12.0, augment_scale=0.15)
# `seed` and `blog` pin fp32: at 32-wide matrices a step is bound by per-op overhead, and bf16 autocast only adds
# casts (docs/performance.md#precision).
PRESETS = {
    preset.name: preset for preset in [
        Preset(
            "seed",
            "the seed blog's size and budget (P7, D32, depth 3, 4 heads, MLP 128, batch 64, 20 epochs) "
            "as a faithful ViT, with AdamW, warmup + cosine decay, label smoothing and shift augmentation",
            ViTConfig(),
            TrainConfig(epochs=20, batch_size=64, optimizer="adamw", lr=2e-3, weight_decay=0.05,
                        schedule="cosine", warmup_epochs=1.0, label_smoothing=0.1, augment_shift=2),
            RuntimeConfig(precision="fp32"),
        ),
        Preset(
            "fast",
            "the time-to-99% recipe for a CPU: P7, D64, depth 4, 4 heads, MLP 256, position embeddings "
            "initialised at std 1, Muon + AdamW, batch 256, 5 epochs, short warmup + cosine, label smoothing, "
            "1-px shifts, rotations up to 12 degrees, scaling by up to 15%, bf16 autocast where the CPU has "
            "native bf16",
            ViTConfig(patch_size=7, dim=64, depth=4, heads=4, mlp_dim=256, pos_embed_std=1.0),
            FAST_RECIPE,
            RuntimeConfig(precision="auto"),
        ),
        Preset(
            "scope",
            "the tutorial's model, a plain ViT trained so that the paper's Fig. 7 can be read: P4 (a 7x7 grid of 49 "
            "patches), D64, depth 6, 4 heads, MLP 256, position embeddings initialised at std 0.02 (so that they "
            "learn rows and columns), the fast recipe with AdamW at lr 1e-2 (the position embeddings grow faster), "
            "7 epochs",
            ViTConfig(patch_size=4, dim=64, depth=6, heads=4, mlp_dim=256, pos_embed_std=0.02),
            dataclasses.replace(FAST_RECIPE, epochs=7, lr=1e-2),
            RuntimeConfig(precision="auto"),
        ),
        Preset(
            "blog",
            "the seed blog's model and recipe exactly, quirks kept (Adam 3e-4, batch 64, 20 epochs)",
            ViTConfig(architecture="blog", pixel_mean=0.5, pixel_std=0.5),
            TrainConfig(epochs=20, batch_size=64, optimizer="adam", lr=3e-4, schedule="constant",
                        softmax_before_loss=True),
            RuntimeConfig(precision="fp32"),
        ),
    ]
}
DEFAULT_PRESET = "fast"
COMPILE_MIN_STEPS = 500  # compile = "auto" compiles runs of at least this many steps
CHECKPOINT_SECONDS = 180  # with checkpoint_every None, a checkpoint after about this much training time
SECTIONS = {"model": ViTConfig, "train": TrainConfig, "runtime": RuntimeConfig}  # config.json's, in this order


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def read_config_file(path: str | Path) -> dict:
    """A JSON or TOML file of config fields, flat or in [model] / [train] / [runtime] tables."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise VitscopeError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise VitscopeError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise VitscopeError(f"config file {path} must hold a table of fields")
    flat = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def resolve_config(preset: str, overrides: dict) -> tuple[ViTConfig, TrainConfig, RuntimeConfig]:
    """Start from a preset, then apply overrides (from a config file, then flags) by field name."""
    if preset not in PRESETS:
        raise VitscopeError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    configs = {name: dataclasses.replace(getattr(PRESETS[preset], name)) for name in SECTIONS}
    owner = {key: name for name, cls in SECTIONS.items() for key in field_names(cls)}
    for key, value in overrides.items():
        if key not in owner:
            raise VitscopeError(f"unknown config field {key!r}")
        setattr(configs[owner[key]], key, _coerce(SECTIONS[owner[key]], key, value))
    model, train, runtime = (dataclasses.replace(config) for config in configs.values())  # re-runs __post_init__
    model.validate()
    train.validate()
    runtime.validate()
    return model, train, runtime


def configs_from_record(record: dict) -> tuple[ViTConfig, TrainConfig, RuntimeConfig]:
    """The three configs of a run's config.json. Keys this version does not know are ignored (newer runs); a
    record from before the runtime section took its runtime fields from the model and train sections."""
    sections = {name: record.get(name) or {} for name in SECTIONS}
    if "runtime" not in record:
        sections["runtime"] = {**sections["train"], **sections["model"]}
    return tuple(from_dict(cls, sections[name]) for name, cls in SECTIONS.items())


# What a resumed run may set anew: how many threads it uses, how often it saves, what it logs. Nothing that changes
# what it computes.
RESUME_MAY_CHANGE = {"threads", "checkpoint_every", "tensorboard"}
FROM_DATA = {"image_size", "num_classes"}  # set from the dataset's files, whatever a preset or flag said


def contradictions(record: dict, given: dict) -> list[str]:
    """The fields of `given` (name -> value, as flags and config files set them; "preset" too) whose values differ
    from those of the run whose config.json is `record`, each as "lr 0.01 (the run has 0.003)". Paths are compared
    as the folders they name."""
    configs = configs_from_record(record)
    saved = {key: value for config in configs for key, value in dataclasses.asdict(config).items()}
    saved["preset"] = record.get("preset")
    owner = {key: cls for cls in SECTIONS.values() for key in field_names(cls)}
    found = []
    for key, value in given.items():
        if key in RESUME_MAY_CHANGE or key in FROM_DATA or key not in saved:
            continue
        if key in owner:
            value = _coerce(owner[key], key, value)
            if key == "compile":
                value = RuntimeConfig(compile=value).compile  # true / false: on / off
        same = value == saved[key]
        if key == "data_dir" and value is not None and saved[key] is not None:
            same = Path(value).resolve() == Path(saved[key]).resolve()
        if not same:
            found.append(f"{key} {value} (the run has {saved[key]})")
    return found


def from_dict(cls, values: dict):
    """A config dataclass from a dict, ignoring keys this version does not know."""
    known = field_names(cls)
    return cls(**{k: v for k, v in values.items() if k in known})


_TYPE_CHECKS = {
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
}


def _coerce(cls, key: str, value):
    """Check a config value against the field's declared type; ints are accepted for floats."""
    kind = str(next(f for f in dataclasses.fields(cls) if f.name == key).type)  # e.g. "int | None"
    if value is None and "None" in kind:
        return None
    base = next((t for t in (t.strip() for t in kind.split("|")) if t in _TYPE_CHECKS and _TYPE_CHECKS[t](value)),
                None)
    if base is None:
        raise VitscopeError(f"config field {key!r} must be {kind}, not {value!r}")
    return float(value) if base == "float" else value
