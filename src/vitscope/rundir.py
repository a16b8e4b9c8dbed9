"""The run directory: everything a run leaves behind, and the one loader every consumer uses.

    RUN/config.json          model, training and runtime config, seed, versions, hardware, dataset and location
    RUN/model.safetensors    final weights
    RUN/metrics.jsonl        one JSON object per epoch
    RUN/checkpoint/state.pt  latest resumable state (tensors only; loaded with weights_only=True)
    RUN/plots/               figures
"""
from __future__ import annotations

import dataclasses
import json
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

    def exists(self) -> bool:
        return self.config_file.is_file()

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
        """Atomic and durable: a kill or a power cut at any moment leaves either the previous checkpoint or
        the new one."""
        self.checkpoint_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.checkpoint_file, durable=True) as temporary:
            torch.save(state, temporary)

    def load_checkpoint(self) -> dict:
        if not self.checkpoint_file.is_file():
            raise VitscopeError(f"nothing to resume: {self.path} has no checkpoint/state.pt")
        try:
            return torch.load(self.checkpoint_file, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged or crafted file: refuse it, never unpickle freely
            raise VitscopeError(f"cannot load checkpoint {self.checkpoint_file}: {str(e).splitlines()[0]}") from None


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
