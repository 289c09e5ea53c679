#!/usr/bin/env bash
# One command set-up on a fresh machine: a .venv with torch, dopsd and its dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Install the torch/torchvision pair first when no torch is present: on these machines both lie on disk,
# while an unpinned torch pulls a multi-GB CUDA build and a mismatched torchvision fails at import.
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
echo "dopsd installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
