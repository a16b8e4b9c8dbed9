"""vitscope's own CPU kernels (`kernels/*.cpp`: attention, GELU), built into one library on first use with the
machine's C++ compiler and called through ctypes. cpu_attention and cpu_gelu wrap them as custom ops.

Plain C++ with no torch headers, so the library compiles in a few seconds, -march=native for this CPU's
vectors, OpenMP from the runtime torch has already loaded. Without a compiler that builds it (no `c++`, or one
without OpenMP, as Apple's clang), `available()` is False and the model uses torch ops instead.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

from .data import cache_root
from .device import cpu_flags
from .files import atomic_path

log = logging.getLogger(__name__)

KERNELS = Path(__file__).parent / "kernels"
SOURCES = sorted(KERNELS.glob("*.cpp"))
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
DTYPES = (torch.float32, torch.bfloat16)  # what the kernels store: fp32, or bf16 as uint16_t

_i64, _ptr, _f32, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
SIGNATURES = {  # the library's functions and their arguments
    "vitscope_attention_forward": [_ptr, _ptr, _i64, _i64, _i64, _i64, _f32, _ptr, _ptr, _int],
    "vitscope_attention_backward": [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _f32, _ptr, _ptr, _int],
    "vitscope_gelu_forward": [_ptr, _i64, _i64, _ptr, _ptr, _int],
    "vitscope_gelu_backward": [_ptr, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _int],
}


def source_text() -> str:
    return "\0".join(path.read_text() for path in sorted(KERNELS.glob("*")) if path.suffix in (".cpp", ".h"))


# The custom ops' names carry a digest of the kernels and of their wrappers: torch.compile's caches key a graph
# by its ops' names, not by what the ops compute, so a changed op must never share a name with an older one.
VERSION = hashlib.sha256("\0".join([
    source_text(), *(Path(__file__).with_name(name).read_text() for name in ("cpu_attention.py", "cpu_gelu.py"))
]).encode()).hexdigest()[:12]


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def library_path(cxx: str) -> Path:
    """Where the built library is cached: in the user's vitscope cache (`data.cache_root()`: $VITSCOPE_CACHE,
    else $XDG_CACHE_HOME/vitscope, else ~/.cache/vitscope), never a folder of /tmp that another user could have
    made first; named by the sources, the compiler, its flags and this CPU's features (-march=native code may not
    run on another CPU that shares a home directory)."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = "\0".join([source_text(), cxx, version, " ".join(FLAGS), " ".join(sorted(cpu_flags()))])
    return cache_root() / "kernels" / f"kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def build(cxx: str, path: Path) -> None:
    """Compile into a temporary file beside `path` and rename it into place, so that processes building at
    once (parallel tests) never load a half-written library."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        subprocess.run([cxx, *FLAGS, *map(str, SOURCES), "-o", str(temporary)], check=True, capture_output=True,
                       text=True, timeout=300)


def torch_uses_libgomp() -> bool:
    """Whether this process has GNU OpenMP loaded (torch's pip builds for Linux bring it). The kernels link
    libgomp.so.1 and must share torch's OpenMP threads: a second OpenMP runtime's threads would spin against
    torch's on the same cores."""
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:  # no /proc: not Linux
        return False


@functools.lru_cache(maxsize=1)
def load() -> tuple[ctypes.CDLL | None, str]:
    """The kernels' library, built first where it is not in the cache; or None and why not."""
    cxx = compiler()
    if cxx is None:
        return None, "no C++ compiler: c++, or the one $CXX names"
    if not torch_uses_libgomp():
        return None, "this torch does not run on GNU OpenMP"
    try:
        path = library_path(cxx)
        if not path.exists():
            build(cxx, path)
        library = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as error:
        detail = (getattr(error, "stderr", "") or str(error)).strip()
        log.info("vitscope's CPU kernels did not build: the model uses torch ops instead")
        return None, f"{cxx} failed: {detail[-300:]}"
    for name, argtypes in SIGNATURES.items():
        getattr(library, name).argtypes = argtypes
    return library, ""


def library() -> ctypes.CDLL:
    return load()[0]


def unavailable_reason() -> str:
    return load()[1]


def available() -> bool:
    """Whether the library is built (building it on the first call: a few seconds, once per machine)."""
    return library() is not None


def fp32_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A layer's bias as the kernels read it: fp32 and contiguous (under bf16 autocast the parameter is fp32)."""
    return None if bias is None else bias.detach().float().contiguous()


def bias_gradient(bias: torch.Tensor | None, size: int, like: torch.Tensor) -> torch.Tensor:
    """Where a kernel's backward writes the bias's gradient: `size` fp32 values, or none where there is no bias (a
    custom op returns a tensor, not None)."""
    return like.new_empty(size if bias is not None else 0, dtype=torch.float32)


def pointer(t: torch.Tensor | None) -> int | None:
    """A tensor's address for ctypes; None (a null pointer) for no tensor."""
    return None if t is None else t.data_ptr()


def supports(x: torch.Tensor) -> bool:
    """Whether the kernels take this tensor: on a CPU, fp32 or bf16."""
    return x.device.type == "cpu" and x.dtype in DTYPES


def faster_here() -> bool:
    """Whether "auto" settings should pick the kernels on this CPU: where it has AVX-512, whose 16-wide vectors
    and register transposes they were measured with. Built for AVX2 alone the attention kernel made the
    compiled step slower, not faster (docs/performance.md#without-avx-512)."""
    return "avx512f" in cpu_flags()
