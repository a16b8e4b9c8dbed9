"""Milliseconds of a linear layer's pieces at the mid size's MLP shape (12,800 tokens, 128 -> 512, bf16): the
bias added by ATen's addmm against a plain matmul, with the GELU kernel after it (adding the bias itself, as
`RuntimeConfig.bias_in_kernels` runs it), and the weight's gradient dW = dY^T X with dY^T a transposed view (as
autograd computes it) against a contiguous copy (made beforehand, or in the timed call), against dW^T = X^T dY,
and the input's gradient dX = dY W beside it, with dY stored as usual and stored transposed (what a kernel that
wrote only dY^T would leave the layer's backward).

    python benchmarks/linear_bias.py
    python benchmarks/linear_bias.py --tokens 12800 --inputs 128 --outputs 384 --json

Timed windows go round the variants in turn; before each call a 32 MB buffer is written, so every variant reads
its operands from memory as in a training step, not from the cache. Medians of --windows windows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=12800)
    ap.add_argument("--inputs", type=int, default=128)
    ap.add_argument("--outputs", type=int, default=512)
    ap.add_argument("--windows", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from vitscope import cpu_gelu, cpu_kernels
    from vitscope.device import cpu_name
    from vitscope.process import keep_freed_memory

    keep_freed_memory()  # as `vitscope train` does
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.inputs, generator=generator).bfloat16()
    weight = (torch.randn(args.outputs, args.inputs, generator=generator) * 0.05).bfloat16()
    bias = torch.randn(args.outputs, generator=generator)
    grad = torch.randn(args.tokens, args.outputs, generator=generator).bfloat16()
    grad_t = grad.t().contiguous()
    variants = {
        "addmm (bias in the matmul)": lambda: F.linear(x, weight, bias.bfloat16()),
        "mm (no bias)": lambda: F.linear(x, weight),
        "dW, dY^T a view": lambda: grad.t() @ x,
        "dW, dY^T contiguous": lambda: grad_t @ x,
        "dW, dY^T copied to contiguous in the call": lambda: grad.t().contiguous() @ x,
        "dW^T = X^T dY, X^T a view": lambda: x.t() @ grad,
        "dX = dY W": lambda: grad @ weight,
        "dX = dY W, dY stored transposed": lambda: grad_t.t() @ weight,
    }
    if cpu_kernels.available():
        variants["addmm, then the GELU kernel"] = lambda: cpu_gelu.gelu(F.linear(x, weight, bias.bfloat16()))
        variants["mm, then the GELU kernel adding the bias"] = lambda: cpu_gelu.gelu(F.linear(x, weight), bias)
    flush = torch.empty(32 * 1024 * 1024 // 4)
    timings = {name: [] for name in variants}
    for window in range(args.windows + 1):  # the first round warms up
        for name, run in variants.items():
            flush.add_(1)
            start = time.perf_counter()
            run()
            if window:
                timings[name].append((time.perf_counter() - start) * 1e3)
    for name, values in timings.items():
        row = {"variant": name, "tokens": args.tokens, "inputs": args.inputs, "outputs": args.outputs,
               "dtype": "bf16", "ms": round(statistics.median(values), 3), "cpu": cpu_name(),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
        print(json.dumps(row) if args.json else f"{name:42s} {row['ms']:7.3f} ms")


if __name__ == "__main__":
    main()
