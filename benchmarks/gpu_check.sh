#!/usr/bin/env bash
# The GPU checks, as one call on a lent GPU machine (its own torch; no network), within $BUDGET seconds:
#   .device/mnist/  MNIST's four IDX files (.gz);  .device/peers/  the vit-pytorch wheel (timm and transformers
#   are on that machine already).
# In order of importance, each step cut short where the budget runs out, everything logged under $OUT:
# 1. the tests that need a GPU (the CUDA-graph step against the plain compiled one); 2. `vitscope train
# --preset fast`, seed 0 with an empty compile cache, then seeds 1-4 with the warm one, then seed 0 with
# `cuda_graph = true` (benchmarks/time_to_accuracy.py); 3. training throughput at batch 1024, bf16, seed then
# mid size, all four implementations (benchmarks/throughput.py).
# Results, and why torch 2.11 on CUDA compiled nothing there: docs/performance.md#gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/vitscope-gpu}
deadline=$(( $(date +%s) + ${BUDGET:-540} ))
mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/vitscope-inductor
rm -rf "$TORCHINDUCTOR_CACHE_DIR"
python3 -m pip install -q --no-index --no-deps --target /tmp/peers .device/peers/*.whl \
  && PYTHONPATH=$PYTHONPATH:/tmp/peers
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
nproc; grep -m1 'model name' /proc/cpuinfo

step() {  # step NAME SECONDS COMMAND...: at most SECONDS, and never past the deadline
  local name=$1 seconds=$2; shift 2
  local left=$(( deadline - $(date +%s) - 5 ))
  (( left < seconds )) && seconds=$left
  if (( seconds < 20 )); then echo "== $name: skipped, out of time"; return; fi
  echo "== $name (at most ${seconds} s)"
  local start=$(date +%s.%N)
  timeout "$seconds" "$@" 2>&1 | tee "$out/$name.log" | grep -v Warning | tail -n 12
  echo "== $name: rc ${PIPESTATUS[0]}, $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
}

data=(--data-dir .device/mnist)
printf 'cuda_graph = true\n' > /tmp/cuda-graph.toml
step tests 120 env TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-tests python3 -m pytest -q -p no:cacheprovider \
  tests/test_step.py tests/test_device.py -k "gpu or loop_reordering"  # a cache of their own: fast-cold stays cold
step fast-cold 150 python3 benchmarks/time_to_accuracy.py --seeds 0 --json --out "$out/runs" -- "${data[@]}"
step fast-warm 120 python3 benchmarks/time_to_accuracy.py --seeds 1 2 3 4 --json --out "$out/runs" -- "${data[@]}"
step fast-graph 45 python3 benchmarks/time_to_accuracy.py --seeds 0 --json --out "$out/runs" -- "${data[@]}" \
  --config /tmp/cuda-graph.toml
for size in seed mid; do
  step "throughput-$size" 120 python3 benchmarks/throughput.py --device cuda --size "$size" --batch 1024 \
    --dtype bf16 --attention fused --compile both --windows 5 --steps 100 --all --json
done
cat "$out"/runs/*/seed*.log > "$out/train-logs.txt" 2>/dev/null
rm -rf "$out/runs"  # the run directories stay behind: only logs come back
