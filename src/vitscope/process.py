"""Settings a run makes for its whole process: torch's threads and glibc's malloc."""
from __future__ import annotations

import ctypes
import os
import sys

import torch

from .config import RuntimeConfig


def configure(runtime: RuntimeConfig, threads: int | None = None) -> None:
    """Apply the process-wide settings of `runtime` (`threads`, where given, overrides its own)."""
    if threads or runtime.threads:
        torch.set_num_threads(threads or runtime.threads)
    if runtime.keep_freed_memory:
        keep_freed_memory()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves large blocks with fresh mappings and trims the top of its heap once enough of
    it is free, so a training step's tensors of a few MB come back, step after step, as new zeroed pages:
    thousands of page faults per step. With blocks up to 32 MiB served from the heap and trimming only past
    1 GiB free there are none (docs/performance.md#page-faults-and-malloc). Freed memory then stays
    with the process: its resident size stays at its peak. Linux with glibc only; a user's own MALLOC_*_
    settings win. Returns whether the settings were applied."""
    libc_version = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None  # "glibc 2.36"
    if sys.platform != "linux" or not (libc_version or "").startswith("glibc"):
        return False
    if any(name in os.environ for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False
