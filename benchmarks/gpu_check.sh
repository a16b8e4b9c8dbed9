#!/usr/bin/env bash
# The GPU checks, as one call on a lent GPU machine (torch installed there, no network):
#   .device/mnist/  MNIST's four IDX files (.gz), .device/wheels/  wheels of tqdm, matplotlib, pytest
# It runs the tests whose CLI runs take the CUDA path, times `vitscope train --preset seed` per epoch,
# and measures training throughput at batch 1024 (vitscope and Hugging Face, which that machine has).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/vitscope-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD/src
python3 -m pip install -q --no-index --find-links .device/wheels tqdm matplotlib pytest 2>&1 | tail -n 2
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -x -p no:cacheprovider tests/test_model.py tests/test_train.py tests/test_cli.py \
  tests/test_analysis.py 2>&1 | tail -n 4
python3 -m vitscope train --preset seed --epochs 3 --data-dir .device/mnist --no-progress --out "$out/seed" 2>&1 | tail -n 5
for size in seed mid; do
  for impl in vitscope hf; do
    python3 benchmarks/throughput.py --device cuda --size "$size" --batch 1024 --impl "$impl" --compile both \
      --windows 5 --json 2>/dev/null | tee -a "$out/throughput.jsonl" | cut -c1-230
  done
done
