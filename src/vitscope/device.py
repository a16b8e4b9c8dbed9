"""Which device and precision to run on, chosen from what the machine really has."""
from __future__ import annotations

import functools
import platform
import sys
from pathlib import Path

import torch

from .errors import VitscopeError


def select_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if requested not in available:
        raise VitscopeError(f"unknown device {requested!r}: choose auto, cpu, cuda or mps")
    if not available[requested]:
        raise VitscopeError(f"--device {requested} was asked for, but this machine's torch has no {requested}")
    return torch.device(requested)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo), read once per process: every model build asks, once per block."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run ~2x faster than fp32. Without them (AVX2-only CPUs such
    as Zen 3) bf16 is emulated and hundreds of times slower, so it must never be picked there."""
    flags = cpu_flags()
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def select_precision(requested: str, device: torch.device) -> str:
    """'auto' is bf16 only where the device computes bf16 natively, else fp32."""
    if requested == "fp32":
        return "fp32"
    native = {"cuda": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
              "cpu": cpu_has_native_bf16(), "mps": False}.get(device.type, False)
    if requested == "bf16":
        if not native and device.type != "cpu":
            raise VitscopeError(f"--precision bf16: {device.type} here does not support bf16")
        return "bf16"  # on a CPU without native bf16 the user asked for it: slow, but their call
    return "bf16" if native else "fp32"


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_hardware(device: torch.device) -> dict:
    """What a run ran on, for config.json and benchmark rows."""
    info = {"device": str(device), "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_native_bf16": cpu_has_native_bf16(), "threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
