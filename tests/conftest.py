import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Parallel or not, tests must not fight over the 2 cores: one thread each.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file written independently of vitscope.data: magic 0x0000 08 ndim, sizes, then bytes."""
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def synthetic_digits(n: int, size: int = 28, classes: int = 4, seed: int = 0):
    """Class k is a filled square of side 3 + 3k px at a random place over faint noise: easy to learn,
    and shifts keep the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.uint8)
    images = (rng.random((n, size, size)) * 30).astype(np.uint8)
    for i, k in enumerate(labels):
        side = 3 + 3 * int(k)
        top, left = rng.integers(0, size - side + 1, 2)
        images[i, top:top + side, left:left + side] = 255
    return images, labels


def write_idx_dataset(folder: Path, n_train=512, n_test=128, size=28, classes=4, compress=True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_digits(n, size, classes, seed)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte"
            data = idx_bytes(array)
            if compress:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def idx_dir(tmp_path):
    return write_idx_dataset(tmp_path / "idx")


def run_cli(*args, timeout=600, env=None):
    """`python -m vitscope ARGS` in a fresh process with one thread, as a user runs it."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "vitscope", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=full_env)
