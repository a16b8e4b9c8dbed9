"""Milliseconds for the last block's class-token attention, forward and backward, compiled: the per-head
form against the heads-as-rows form (`fastpath.FastAttention._class_token_heads_as_rows`), side by side.

    python benchmarks/class_token_attention.py                       # head sizes 8 and 16, fp32 and bf16
    python benchmarks/class_token_attention.py --batch 64 --head-dims 8 --json

Each form gets the query (B, 1, D) and the keys and values (B, T, D) that the class-token-only block
computes (T = 17: 16 patches and the class token, 4 heads), runs torch.compile'd, and is timed over
round-robin windows of --steps calls, so the machine's drift reaches both alike; the median window is
reported. `vitscope` uses heads as rows below HEADS_AS_ROWS_BELOW and the per-head form from there on.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def per_head(attn, q, k, v):
    B, T, D = k.shape
    H, d = attn.heads, attn.head_dim
    heads = [t.reshape(B, -1, H, d).transpose(1, 2) for t in (q, k, v)]
    weights = ((heads[0] * attn.scale) @ heads[1].transpose(-2, -1)).softmax(dim=-1)
    return (weights @ heads[2]).transpose(1, 2).reshape(B, 1, D)


def heads_as_rows(attn, q, k, v):
    return attn._class_token_heads_as_rows(q, k, v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--head-dims", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--windows", type=int, default=7)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch._dynamo.config.recompile_limit = 64  # one compiled function per form, many shapes
    from vitscope import RuntimeConfig
    from vitscope.device import cpu_name
    from vitscope.fastpath import FastAttention
    from vitscope.model import Attention

    heads, tokens = 4, 17
    for head_dim in args.head_dims:
        for dtype_name in args.dtypes:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
            attn = Attention(heads * head_dim, heads)
            FastAttention.adopt(attn, RuntimeConfig(attention="explicit"))
            torch.manual_seed(0)
            q = torch.randn(args.batch, 1, heads * head_dim, dtype=dtype)
            k, v = (torch.randn(args.batch, tokens, heads * head_dim, dtype=dtype) for _ in range(2))
            grad = torch.randn_like(q)
            forms = {name: torch.compile(lambda *t, form=form, attn=attn: form(attn, *t))
                     for name, form in (("per head", per_head), ("heads as rows", heads_as_rows))}

            def call(form, q=q, k=k, v=v, grad=grad):
                inputs = [t.detach().requires_grad_() for t in (q, k, v)]
                form(*inputs).backward(grad)

            results = {name: form(q, k, v) for name, form in forms.items()}
            torch.testing.assert_close(results["per head"], results["heads as rows"],
                                       atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)
            for form in forms.values():
                for _ in range(3):
                    call(form)
            times = {name: [] for name in forms}
            for _ in range(args.windows):
                for name, form in forms.items():
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        call(form)
                    times[name].append((time.perf_counter() - start) / args.steps * 1e3)
            for name in forms:
                row = {"form": name, "head_dim": head_dim, "dtype": dtype_name, "batch": args.batch,
                       "ms": round(statistics.median(times[name]), 3), "cpu": cpu_name(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__}
                print(json.dumps(row) if args.json else
                      f"head size {head_dim:2d} {dtype_name} batch {args.batch}: {name:14s} {row['ms']:.3f} ms")


if __name__ == "__main__":
    main()
