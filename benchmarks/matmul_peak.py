"""The CPU's measured matmul peak: GFLOP/s of torch.mm on n x n matrices, fp32 and bf16, the denominator of
every "% of peak" in docs/performance.md (#matmul-peak there has this script's figures).

    python benchmarks/matmul_peak.py [--sizes 256 1024 2048] [--threads 2] [--json]

Each figure is the median of --repeats timed batches of about 2 GFLOP each, after 3 untimed calls. bf16 is
measured even where the CPU lacks native bf16 (there it is emulated and hundreds of times slower: lower
--sizes to keep it short).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def gflops(n: int, dtype: torch.dtype, repeats: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    calls = max(1, int(2e9 / (2 * n**3)))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        seconds.append((time.perf_counter() - start) / calls)
    return 2 * n**3 / statistics.median(seconds) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from vitscope.device import cpu_name

    for dtype in (torch.float32, torch.bfloat16):
        for n in args.sizes:
            row = {"n": n, "dtype": str(dtype).removeprefix("torch."),
                   "gflops": round(gflops(n, dtype, args.repeats), 1),
                   "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}
            print(json.dumps(row) if args.json else f"{row['dtype']:8s} n={n:5d}  {row['gflops']:8.1f} GFLOP/s")


if __name__ == "__main__":
    main()
