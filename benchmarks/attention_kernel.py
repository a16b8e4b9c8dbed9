"""Microseconds of one attention layer's core, softmax(Q K^T * scale) V, forward and forward + backward, in
its three CPU forms side by side: explicit (three ops, torch.compile'd), fused (F.scaled_dot_product_attention)
and vitscope's kernel (vitscope.cpu_attention). The input is the qkv projection's output (B, T, 3 * D); the
explicit and fused forms include the q/k/v layout they need, as in the model.

    python benchmarks/attention_kernel.py                                  # seed size, fast size, mid size
    python benchmarks/attention_kernel.py --shape 256,17,4,8 --dtype bf16 --json

Timed windows go round the forms in turn; medians of --windows windows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = ["256,17,4,8", "256,17,4,16", "256,50,4,32"]  # batch, tokens, heads, head size: seed, fast, mid


def explicit(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    B, T, D3 = qkv.shape
    q, k, v = qkv.reshape(B, T, 3, heads, D3 // 3 // heads).permute(2, 0, 3, 1, 4)
    out = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).softmax(-1) @ v
    return out.transpose(1, 2).reshape(B, T, D3 // 3)


def fused(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    B, T, D3 = qkv.shape
    q, k, v = qkv.reshape(B, T, 3, heads, D3 // 3 // heads).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D3 // 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", action="append", help="batch,tokens,heads,head size (repeatable)")
    ap.add_argument("--dtype", default="fp32,bf16")
    ap.add_argument("--windows", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20, help="calls per window")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from vitscope import cpu_attention
    from vitscope.device import cpu_name

    forms = {"explicit (compiled)": torch.compile(explicit), "fused": fused}
    if cpu_attention.available():
        forms["kernel"] = lambda qkv, heads: cpu_attention.multi_head_attention(qkv, heads,
                                                                                (qkv.shape[-1] // 3 // heads) ** -0.5)
    for shape in args.shape or SHAPES:
        B, T, H, d = map(int, shape.split(","))
        for dtype_name in args.dtype.split(","):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
            qkv = torch.randn(B, T, 3 * H * d).to(dtype).requires_grad_()
            grad = torch.randn(B, T, H * d).to(dtype)

            def forward(fn, qkv=qkv, H=H):
                with torch.no_grad():
                    fn(qkv, H)

            def both(fn, qkv=qkv, H=H, grad=grad):
                fn(qkv, H).backward(grad)

            timings = {(name, kind): [] for name in forms for kind in ("forward", "forward+backward")}
            for window in range(args.windows + 1):  # the first round warms up (and compiles)
                for (name, kind), values in timings.items():
                    run = forward if kind == "forward" else both
                    start = time.perf_counter()
                    for _ in range(args.calls if window else 2):
                        run(forms[name])
                    if window:
                        values.append((time.perf_counter() - start) / args.calls * 1e6)
            for (name, kind), values in timings.items():
                row = {"shape": [B, T, H, d], "dtype": dtype_name, "form": name, "pass": kind,
                       "us": round(statistics.median(values), 1), "cpu": cpu_name(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__}
                print(json.dumps(row) if args.json else
                      f"B={B} T={T} H={H} d={d} {dtype_name:4s} {name:20s} {kind:17s} {row['us']:9.1f} us")


if __name__ == "__main__":
    main()
