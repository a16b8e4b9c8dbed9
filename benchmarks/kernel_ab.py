"""Microseconds of the attention kernel's forward and backward as this checkout builds it against another
commit's build, side by side in one process, and how far their outputs differ.

    python benchmarks/kernel_ab.py HEAD~1                               # the seed size, fp32 and bf16
    python benchmarks/kernel_ab.py 019a828 --shape 256,17,4,16 --shape 256,50,4,32 --dtype bf16

Each side's `kernels/attention.cpp` and `kernels/numerics.h` (the other commit's from `git show`) are built
with vitscope's own compiler flags into a library of their own and called through ctypes on the same
inputs: qkv (B, T, 3 * H * d) of N(0, 1) values, the qkv layer's bias, and a gradient for the output. Timed
windows alternate which side goes first; the medians and the median of the windows' paired ratios are
printed. A whole training step's gain is smaller than a kernel's: compare_commits.py measures that.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "src" / "vitscope" / "kernels"
FILES = ("attention.cpp", "numerics.h")


def build(folder: Path, out: Path) -> ctypes.CDLL:
    from vitscope import cpu_kernels
    subprocess.run([cpu_kernels.compiler() or "c++", *cpu_kernels.FLAGS, str(folder / "attention.cpp"), "-o",
                    str(out)], check=True)
    library = ctypes.CDLL(str(out))
    for name, argtypes in cpu_kernels.SIGNATURES.items():
        if name.startswith("vitscope_attention"):
            getattr(library, name).argtypes = argtypes
    return library


def export(rev: str, folder: Path) -> None:
    for name in FILES:
        text = subprocess.run(["git", "show", f"{rev}:src/vitscope/kernels/{name}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        (folder / name).write_text(text)


class Side:
    """One build and its own output buffers for one shape."""

    def __init__(self, library: ctypes.CDLL, qkv: torch.Tensor, heads: int):
        from vitscope.cpu_attention import probs_shape
        B, T, D3 = qkv.shape
        self.library, self.heads, self.d = library, heads, D3 // 3 // heads
        self.out = qkv.new_empty(B, T, D3 // 3)
        self.probs = torch.empty(probs_shape(B, T, heads, self.d))
        self.grad_qkv, self.grad_bias = torch.empty_like(qkv), torch.empty(D3)

    def forward(self, qkv, bias, grad):
        B, T, _ = qkv.shape
        self.library.vitscope_attention_forward(qkv.data_ptr(), bias.data_ptr(), B, T, self.heads, self.d,
                                                self.d ** -0.5, self.out.data_ptr(), self.probs.data_ptr(),
                                                int(qkv.dtype == torch.bfloat16))

    def backward(self, qkv, bias, grad):
        B, T, _ = qkv.shape
        self.library.vitscope_attention_backward(qkv.data_ptr(), bias.data_ptr(), grad.data_ptr(),
                                                 self.probs.data_ptr(), B, T, self.heads, self.d, self.d ** -0.5,
                                                 self.grad_qkv.data_ptr(), self.grad_bias.data_ptr(),
                                                 int(qkv.dtype == torch.bfloat16))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="the other commit (its kernels' sources are taken with git show)")
    ap.add_argument("--shape", action="append", help="batch,tokens,heads,head size (repeatable; default the "
                    "seed size's 256,17,4,8)")
    ap.add_argument("--dtype", default="fp32,bf16")
    ap.add_argument("--windows", type=int, default=21)
    ap.add_argument("--calls", type=int, default=30, help="calls per window")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from vitscope.device import cpu_name

    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "other"
        other.mkdir()
        export(args.rev, other)
        libraries = {"this checkout": build(KERNELS, Path(tmp) / "this.so"),
                     args.rev: build(other, Path(tmp) / "other.so")}
        for shape in args.shape or ["256,17,4,8"]:
            B, T, H, d = map(int, shape.split(","))
            for dtype_name in args.dtype.split(","):
                dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
                torch.manual_seed(0)
                qkv, bias = torch.randn(B, T, 3 * H * d).to(dtype), torch.randn(3 * H * d)
                grad = torch.randn(B, T, H * d).to(dtype)
                sides = {name: Side(library, qkv, H) for name, library in libraries.items()}
                for side in sides.values():
                    side.forward(qkv, bias, grad)
                    side.backward(qkv, bias, grad)
                this, that = sides.values()
                differ = {name: (getattr(this, name).float() - getattr(that, name).float()).abs().max().item()
                          for name in ("out", "grad_qkv", "grad_bias")}
                for kind in ("forward", "backward"):
                    times = {name: [] for name in sides}
                    for window in range(args.windows):
                        for name in (list(sides) if window % 2 else list(sides)[::-1]):
                            call = getattr(sides[name], kind)
                            start = time.perf_counter()
                            for _ in range(args.calls):
                                call(qkv, bias, grad)
                            times[name].append((time.perf_counter() - start) / args.calls * 1e6)
                    mine, theirs = times.values()
                    row = {"shape": [B, T, H, d], "dtype": dtype_name, "pass": kind, "against": args.rev,
                           "us": round(statistics.median(mine), 1), "us_against": round(statistics.median(theirs), 1),
                           "speedup": round(statistics.median(theirs) / statistics.median(mine), 3),
                           "paired_speedup": round(statistics.median(t / m for m, t in zip(mine, theirs)), 3),
                           "max_difference": differ, "cpu": cpu_name(), "threads": torch.get_num_threads()}
                    print(json.dumps(row) if args.json else
                          f"B={B} T={T} H={H} d={d} {dtype_name:4s} {kind:8s} this checkout {row['us']:8.1f} us, "
                          f"{args.rev} {row['us_against']:8.1f} us: x{row['speedup']:.2f} (paired x"
                          f"{row['paired_speedup']:.2f}); largest differences {differ}")


if __name__ == "__main__":
    main()
