"""`vitscope` as an AVX2-only CPU would run it (such as the Zen 3 host), on a CPU with AVX-512: a stand-in for
timing the Zen 3 host's goals where only an AVX-512 machine is at hand.

    python benchmarks/avx2_proxy.py train --preset fast --out runs/avx2-fast
    python benchmarks/time_to_accuracy.py --avx2-proxy --seeds 0 1 2 3 4     # each process through this script

What it holds back, before torch is imported: ATen's kernels to AVX2 (`ATEN_CPU_CAPABILITY=avx2`), MKL's
(`MKL_ENABLE_INSTRUCTIONS=AVX2`) and oneDNN's (`ONEDNN_MAX_CPU_ISA=AVX2`, which also leaves bf16 emulated:
hundreds of times slower, as on a Zen 3); inductor's generated code to 256-bit vectors (`cpp.simdlen`); and
vitscope's own view of the CPU's flags, without AVX-512 and AMX, so `--precision auto` picks fp32 and the
attention and GELU kernels stay off, as they would on an AVX2-only CPU. On the Intel host this measured torch.mm at
86-102 GFLOP/s in fp32 and 0.3-1.5 GFLOP/s in bf16 (`matmul_peak.py` under the same variables), against ~91 and
~0.3 measured on the Zen 3 host (docs/performance.md#avx2-stand-in). A stand-in, not the machine: the cores,
caches and clocks stay this CPU's. A user's own values of those variables are kept.
"""
from __future__ import annotations

import os
import sys

HELD_TO_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def main() -> None:
    for name, value in HELD_TO_AVX2.items():
        os.environ.setdefault(name, value)
    import torch._inductor.config as inductor_config

    inductor_config.cpp.simdlen = 256
    from vitscope import cpu_kernels, device

    flags = device.cpu_flags()
    avx2_flags = frozenset(flag for flag in flags if not flag.startswith(("avx512", "amx")))
    device.cpu_flags = cpu_kernels.cpu_flags = lambda: avx2_flags  # every reader of the flags in vitscope
    from vitscope.cli import main as vitscope_main

    sys.argv = ["vitscope", *sys.argv[1:]]
    vitscope_main()


if __name__ == "__main__":
    main()
