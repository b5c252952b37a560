#!/usr/bin/env bash
# Prepared GPU check (see bench/gpu_check.py): run from anywhere on a machine with one large GPU and a Python
# that has torch (CUDA build), transformers and scipy. Uses this checkout's src/ (no install, no network), scores
# a Mistral-7B-shaped bf16 model against a plain forward+backward and the released-code baseline, and writes
# bench/results/gpu.md and gpu.json (pass --out FILE.md to write elsewhere). Stops after 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 480 "$PYTHON" bench/gpu_check.py "$@"
