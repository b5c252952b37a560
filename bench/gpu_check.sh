#!/usr/bin/env bash
# Prepared GPU check (see bench/gpu_check.py): run from the repository root on a machine with one large GPU.
# Installs the package if needed, then scores a Mistral-7B-shaped bf16 model and the released-code baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import layerif" 2>/dev/null; then
  python -m pip install --quiet -e . || { echo "cannot install layerif" >&2; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 540 python bench/gpu_check.py "$@"
