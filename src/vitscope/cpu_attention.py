"""Attention on a CPU as one kernel per direction: `kernels/attention.cpp`, built on first use with the
machine's C++ compiler, called through ctypes, and registered as the custom op `vitscope::attention_<version>` so
that torch.compile, torch.func and autograd treat it as one opaque op with a known output shape.

At the seed size (17 tokens, head size 8), ATen's batched matmuls, softmax and the q/k/v layout copies take
35-43% of a compiled training step (benchmarks/RESULTS.md). The kernel reads q, k and v where the qkv
projection wrote them and keeps each image's scores in the cache.

Without a compiler that builds it (no `c++`, or one without OpenMP, as Apple's clang), `available()` is
False and the model falls back to the explicit form: the same numbers to fp32 rounding.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .device import cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "attention.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
DTYPES = (torch.float32, torch.bfloat16)
LANES = 16  # images per vector in the kernel's lane form (its L)
ROW_FORM_MULTIPLE = 16  # head sizes that are multiples of this run in the kernel's row form


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def library_path(cxx: str) -> Path:
    """Where the built library is cached: beside torch.compile's own kernels ($TORCHINDUCTOR_CACHE_DIR, else
    /tmp/torchinductor_$USER), named by the source, the compiler, its flags and this CPU's features
    (-march=native code may not run on another CPU that shares the folder)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # an older torch: the system's temporary folder
        cache_dir = tempfile.gettempdir
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = "\0".join([SOURCE.read_text(), cxx, version, " ".join(FLAGS), " ".join(sorted(cpu_flags()))])
    return Path(cache_dir()) / "vitscope-kernels" / f"attention-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def build(cxx: str, path: Path) -> None:
    """Compile into a temporary file beside `path` and rename it into place, so that processes building at
    once (parallel tests) never load a half-written library."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=300)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def torch_uses_libgomp() -> bool:
    """Whether this process has GNU OpenMP loaded (torch's pip builds for Linux bring it). The kernel links
    libgomp.so.1 and must share torch's OpenMP threads: a second OpenMP runtime's threads would spin against
    torch's on the same cores."""
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:  # no /proc: not Linux
        return False


@functools.lru_cache(maxsize=1)
def load() -> tuple[ctypes.CDLL | None, str]:
    """The kernel's library, built first where it is not in the cache; or None and why not."""
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
        log.info("the attention kernel did not build: attention runs as three ops")
        return None, f"{cxx} failed: {detail[-300:]}"
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.vitscope_attention_forward.argtypes = [ptr, i64, i64, i64, i64, ctypes.c_float, ptr, ptr, ctypes.c_int]
    library.vitscope_attention_backward.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_float, ptr,
                                                    ctypes.c_int]
    return library, ""


def _library() -> ctypes.CDLL:
    return load()[0]


def unavailable_reason() -> str:
    return load()[1]


def available() -> bool:
    """Whether the kernel is built (building it on the first call: a few seconds, once per machine)."""
    return _library() is not None


def faster_here() -> bool:
    """Whether "auto" attention should pick the kernel on this CPU: where it has AVX-512, whose 16-wide
    vectors and register transposes it was measured with. Built for AVX2 alone (-march=x86-64-v3, run on
    the Zen 4 host), it made the compiled `seed` step slower, not faster (0.82x at batch 256, 0.94x at the
    preset's 64, fp32; benchmarks/RESULTS.md)."""
    return "avx512f" in cpu_flags()


def supports(qkv: torch.Tensor) -> bool:
    return qkv.device.type == "cpu" and qkv.dtype in DTYPES


# The ops' names carry a digest of this file and the kernel's source: torch.compile's caches key a graph by
# its ops' names, not by what the ops compute, so a changed op must never share a name with an older one.
VERSION = hashlib.sha256(Path(__file__).read_bytes() + SOURCE.read_bytes()).hexdigest()[:12]


@torch.library.custom_op(f"vitscope::attention_{VERSION}", mutates_args=())
def attention(qkv: torch.Tensor, heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, T, 3 * D) as the qkv projection writes it, (B, T, 3, H, d) -> the attention's output (B, T, D)
    with the heads side by side, and every head's attention probabilities in fp32 in the kernel's own layout
    (for the backward)."""
    qkv = qkv.contiguous()
    B, T, D3 = qkv.shape
    out = qkv.new_empty(B, T, D3 // 3)
    probs = qkv.new_empty(probs_shape(B, T, heads, D3 // 3 // heads), dtype=torch.float32)
    _library().vitscope_attention_forward(qkv.data_ptr(), B, T, heads, D3 // 3 // heads, scale, out.data_ptr(),
                                          probs.data_ptr(), int(qkv.dtype == torch.bfloat16))
    return out, probs


def probs_shape(batch: int, tokens: int, heads: int, head_dim: int) -> tuple:
    """The saved probabilities' shape. The kernel's row form (head sizes that are multiples of 16):
    (image and head, query, key padded to a multiple of 16). Its lane form: (group, query, key, lane), a group
    being 16 images of one head."""
    if head_dim % ROW_FORM_MULTIPLE == 0:
        return batch * heads, tokens, -(-tokens // 16) * 16
    return heads * -(-batch // LANES), tokens, tokens, LANES


@attention.register_fake
def _(qkv, heads, scale):
    B, T, D3 = qkv.shape
    return qkv.new_empty(B, T, D3 // 3), qkv.new_empty(probs_shape(B, T, heads, D3 // 3 // heads),
                                                       dtype=torch.float32)


@torch.library.custom_op(f"vitscope::attention_backward_{VERSION}", mutates_args=())
def attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, probs: torch.Tensor, heads: int,
                       scale: float) -> torch.Tensor:
    """The gradient of `attention`'s output with respect to qkv, in qkv's layout and dtype."""
    qkv, grad_out = qkv.contiguous(), grad_out.to(qkv.dtype).contiguous()
    B, T, D3 = qkv.shape
    grad_qkv = torch.empty_like(qkv)
    _library().vitscope_attention_backward(qkv.data_ptr(), grad_out.data_ptr(), probs.data_ptr(), B, T,
                                           heads, D3 // 3 // heads, scale, grad_qkv.data_ptr(),
                                           int(qkv.dtype == torch.bfloat16))
    return grad_qkv


@attention_backward.register_fake
def _(grad_out, qkv, probs, heads, scale):
    return torch.empty_like(qkv)


class _Attention(torch.autograd.Function):
    """The two ops joined for autograd. An autograd.Function with its own setup_context, because torch.func's
    grad (the compiled whole step's) does not differentiate through a custom op's registered autograd."""

    @staticmethod
    def forward(qkv, heads, scale):
        return attention(qkv, heads, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        qkv, heads, scale = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(qkv, output[1])
        ctx.heads, ctx.scale = heads, scale

    @staticmethod
    def backward(ctx, grad_out, grad_probs):
        qkv, probs = ctx.saved_tensors
        with torch.no_grad():  # no double backward; and the backward op itself has no autograd formula
            return attention_backward(grad_out, qkv, probs, ctx.heads, ctx.scale), None, None


def multi_head_attention(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """softmax(Q K^T * scale) V of every head, differentiable: qkv (B, T, 3 * D) -> (B, T, D)."""
    return _Attention.apply(qkv, heads, scale)[0]
