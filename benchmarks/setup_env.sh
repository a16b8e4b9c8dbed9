#!/usr/bin/env bash
# One benchmark environment for vitscope and its peers, so throughput ratios compare implementations,
# not torch builds: timm and vit-pytorch need torchvision, and PyPI's torchvision imports only beside
# its matching torch, so everyone runs on torch 2.14.1 + torchvision 0.29.1 here.
#   bash benchmarks/setup_env.sh [VENV]      (default benchmarks/.venv-peers)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-benchmarks/.venv-peers}
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
"$venv/bin/python" -m pip install --quiet timm vit-pytorch transformers "torch==2.14.1"
"$venv/bin/python" -m pip install --quiet -e . "torch==2.14.1"
"$venv/bin/python" - <<'PY'
import timm, torch, torchvision, transformers, vit_pytorch, vitscope
print("torch", torch.__version__, "torchvision", torchvision.__version__, "timm", timm.__version__,
      "transformers", transformers.__version__, "vitscope", vitscope.__version__)
PY
