"""The run directory: everything a run leaves behind, and the one loader every consumer uses.

    RUN/config.json          model, training and runtime config, seed, versions, hardware, dataset and location
    RUN/model.safetensors    final weights
    RUN/metrics.jsonl        one JSON object per epoch
    RUN/checkpoint/state.pt  latest resumable state (tensors only; loaded with weights_only=True), with the
                             SHA-256 of its contents inside, checked on load
    RUN/plots/               figures
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import RuntimeConfig, TrainConfig, ViTConfig, configs_from_record
from .data import load_dataset
from .errors import VitscopeError
from .files import atomic_path, atomic_write
from .huggingface import is_hf_directory, load_hf_directory
from .model import build_model


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    config_file = property(lambda self: self.path / "config.json")
    weights_file = property(lambda self: self.path / "model.safetensors")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    checkpoint_file = property(lambda self: self.path / "checkpoint" / "state.pt")
    plots = property(lambda self: self.path / "plots")

    # What a run writes: everything `--overwrite` removes (analyze's files too: they describe the old model).
    OWN_ENTRIES = ("config.json", "model.safetensors", "metrics.jsonl", "checkpoint", "plots", "tensorboard",
                   "analysis.json", "report.html")

    def exists(self) -> bool:
        return self.config_file.is_file()

    def is_empty(self) -> bool:
        """Whether there is nothing here: no folder, or an empty one."""
        return not self.path.is_dir() or not any(self.path.iterdir())

    def clear(self) -> None:
        """Remove what a run wrote here, and nothing else."""
        for name in self.OWN_ENTRIES:
            entry = self.path / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)

    def require(self) -> "RunDir":
        if not self.path.is_dir():
            raise VitscopeError(f"no run directory at {self.path}")
        if not self.exists():
            raise VitscopeError(f"{self.path} is not a vitscope run directory (no config.json)")
        return self

    # -- config --
    def write_config(self, record: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.config_file, json.dumps(record, indent=2) + "\n")

    def read_config(self) -> dict:
        self.require()
        try:
            return json.loads(self.config_file.read_text())
        except (OSError, ValueError) as e:
            raise VitscopeError(f"cannot read {self.config_file}: {e}") from None

    def configs(self) -> tuple[ViTConfig, TrainConfig, RuntimeConfig]:
        """The run's architecture, recipe and runtime settings (config.json of any vitscope version)."""
        return configs_from_record(self.read_config())

    def model_config(self) -> ViTConfig:
        return self.configs()[0]

    def train_config(self) -> TrainConfig:
        return self.configs()[1]

    def runtime_config(self) -> RuntimeConfig:
        return self.configs()[2]

    def dataset(self, data_dir: str | None = None):
        """The run's dataset, found again from config.json: MNIST from `data_dir`, else where the run read it
        (while it is still there and whole), else its usual sources; an IDX set where it was read."""
        record = self.read_config()
        if "dataset" not in record:
            raise VitscopeError(f"{self.path} records no dataset (an exported model, not a training run): "
                                "evaluate the run it came from")
        info = record["dataset"]
        if info["name"] == "idx":
            return load_dataset("idx", info["location"])
        return load_dataset(info["name"], data_dir, known=info.get("location"))

    # -- weights --
    def save_weights(self, model: torch.nn.Module) -> None:
        with atomic_path(self.weights_file, durable=True) as temporary:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(temporary))

    # -- metrics --
    def write_metrics(self, history: list[dict]) -> None:
        atomic_write(self.metrics_file, "".join(json.dumps(row) + "\n" for row in history))

    def read_metrics(self) -> list[dict]:
        if not self.metrics_file.is_file():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    # -- checkpoint --
    def save_checkpoint(self, state: dict) -> None:
        """Atomic and durable, with a checksum: written to a temporary file, flushed to the disk and renamed over
        the previous checkpoint, so a kill, a power cut or a full disk at any moment leaves either the previous
        checkpoint whole or the new one. A failed write is a VitscopeError that says the previous one is kept."""
        self.checkpoint_file.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.checkpoint_file.parent.glob(f".{self.checkpoint_file.name}.*.tmp"):
            stale.unlink(missing_ok=True)  # what a process killed while writing left (one run writes here at a time)
        try:
            with atomic_path(self.checkpoint_file, durable=True) as temporary, open(temporary, "wb") as file:
                # to a file object, not a path: torch's own writer reports a full disk as "unexpected pos"
                torch.save({**state, "sha256": state_digest(state)}, file)
        except OSError as e:
            kept = ("the previous checkpoint there is intact" if self.checkpoint_file.is_file()
                    else "there is no earlier checkpoint")
            raise VitscopeError(f"cannot write checkpoint {self.checkpoint_file}: {e.strerror or e}; {kept}; "
                                "make room and continue with --resume") from None

    def read_checkpoint(self) -> bytes | None:
        """The checkpoint file's bytes, None where there is none yet (`parse_checkpoint` reads them)."""
        try:
            return self.checkpoint_file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise VitscopeError(f"cannot read checkpoint {self.checkpoint_file}: {e.strerror}") from None

    def load_checkpoint(self) -> dict:
        data = self.read_checkpoint()
        if data is None:
            raise VitscopeError(f"nothing to resume: {self.path} has no checkpoint/state.pt")
        return parse_checkpoint(data, self.checkpoint_file)


def parse_checkpoint(data: bytes, name: str | Path) -> dict:
    """A checkpoint's state from its file's bytes, its checksum verified: tensors and plain values only
    (weights_only: a crafted file cannot run code). A damaged file is refused, named. Checkpoints from before the
    checksum load unverified."""
    buffer = io.BytesIO(data)
    try:
        state = torch.load(buffer, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or crafted file: refuse it, never unpickle freely
        raise VitscopeError(f"cannot load checkpoint {name} ({type(e).__name__}): it is damaged, or not a vitscope "
                            "checkpoint; restore it, or start the run again with --overwrite") from None
    expected = state.pop("sha256", None) if isinstance(state, dict) else None
    if expected is not None and expected != state_digest(state):
        raise VitscopeError(f"checkpoint {name} is damaged: its contents do not match their SHA-256; restore it, "
                            "or start the run again with --overwrite")
    return state


def state_digest(state) -> str:
    """SHA-256 of a checkpoint's contents, as they load: every tensor's dtype, shape and bytes, every other value's
    repr, in order. A file damaged anywhere that matters either fails to load or changes this."""
    digest = hashlib.sha256()

    def add(value) -> None:
        if torch.is_tensor(value):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}:".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            digest.update(b"{")
            for key, item in value.items():
                add(key)
                add(item)
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[" if isinstance(value, list) else b"(")
            for item in value:
                add(item)
            digest.update(b"]")
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())

    add(state)
    return digest.hexdigest()


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def load_run(path: str | Path, device: str | torch.device = "cpu", runtime: RuntimeConfig | None = None):
    """(model in eval mode, ViTConfig) from a run directory's config.json and model.safetensors, or from a
    Hugging Face ViTForImageClassification directory (`vitscope export --format hf` writes one). The model is
    the plain one of model.py, or with `runtime` computed through the fast paths it asks for.
    Weights are read only from safetensors: a pickle someone sent could run code when loaded."""
    if Path(path).is_file():
        raise VitscopeError(f"{path} is a file; give the run directory or Hugging Face directory holding "
                            "model.safetensors (pickled .pt/.bin weights are never loaded)")
    run = RunDir(path).require()
    if is_hf_directory(run.path):
        model, config = load_hf_directory(run.path)
        if runtime is not None:
            from .fastpath import accelerate

            accelerate(model, runtime)
        return model.to(device).eval(), config
    config = run.model_config()
    if not run.weights_file.is_file():
        raise VitscopeError(f"{run.path} has no model.safetensors yet (is its training finished?)")
    model = build_model(config, runtime)
    try:
        model.load_state_dict(load_file(str(run.weights_file)))
    except Exception as e:
        raise VitscopeError(f"cannot load weights from {run.weights_file}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), config
