"""Milliseconds of the MLP's GELU, forward and backward, in its CPU forms side by side: the one-exp GELU as
torch ops compiled by inductor (fastpath.OneExpGELU's formula) and vitscope's kernel (vitscope.cpu_gelu).

    python benchmarks/gelu_kernel.py                        # the mid size's MLP input (12,800 x 512), bf16 and fp32
    python benchmarks/gelu_kernel.py --shape 4352,256 --json   # fast's (256 images x 17 tokens, MLP 256)

Timed windows alternate the two forms and their order; medians of --windows windows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="12800,512", help="rows,columns of GELU's input")
    ap.add_argument("--dtype", default="bf16,fp32")
    ap.add_argument("--windows", type=int, default=11)
    ap.add_argument("--calls", type=int, default=10, help="calls per window")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from vitscope import cpu_gelu, cpu_kernels
    from vitscope.device import cpu_name
    from vitscope.fastpath import _INV_SQRT_2PI, _normal_cdf_and_exp

    if not cpu_kernels.available():
        raise SystemExit(f"no CPU kernels here: {cpu_kernels.unavailable_reason()}")

    def torch_forward(x):
        x32 = x.float()
        return (x32 * _normal_cdf_and_exp(x32)[0]).to(x.dtype)

    def torch_backward(x, grad):
        x32 = x.float()
        cdf, e = _normal_cdf_and_exp(x32)
        return (grad.float() * (cdf + x32 * e * _INV_SQRT_2PI)).to(grad.dtype)

    forms = {
        "forward": {"compiled torch ops": torch.compile(torch_forward), "kernel": cpu_gelu.gelu},
        "backward": {"compiled torch ops": torch.compile(torch_backward),
                     "kernel": lambda x, grad: cpu_gelu.gelu_backward(grad, x)[0]},
    }
    rows, columns = map(int, args.shape.split(","))
    for dtype_name in args.dtype.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        x = (3 * torch.randn(rows, columns)).to(dtype)
        grad = torch.randn(rows, columns).to(dtype)
        for direction, pair in forms.items():
            inputs = (x,) if direction == "forward" else (x, grad)
            names = list(pair)
            for name in names:
                pair[name](*inputs)  # compiles
            timings = {name: [] for name in names}
            for window in range(args.windows):
                for name in names if window % 2 else names[::-1]:
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        pair[name](*inputs)
                    timings[name].append((time.perf_counter() - start) / args.calls * 1e3)
            for name in names:
                row = {"shape": [rows, columns], "dtype": dtype_name, "pass": direction, "form": name,
                       "ms": round(statistics.median(timings[name]), 3), "cpu": cpu_name(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__}
                print(json.dumps(row) if args.json else
                      f"{rows}x{columns} {dtype_name:4s} {direction:8s} {name:20s} {row['ms']:8.2f} ms")


if __name__ == "__main__":
    main()
