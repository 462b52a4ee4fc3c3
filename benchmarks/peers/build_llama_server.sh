#!/usr/bin/env bash
# Build llama.cpp's llama-server from the llama-cpp-python source distribution on PyPI.
#
# Why the sdist: only PyPI is reachable from the benchmark machines, and llama-cpp-python's
# sdist vendors a pinned llama.cpp (vendor/llama.cpp). The build is cached outside the repo
# so reruns are instant; pass LLAMA_CPP_PYTHON_VERSION to pin a different release.
#
#   benchmarks/peers/build_llama_server.sh          # prints the path of llama-server
set -euo pipefail

CACHE="${TOKENMILL_CACHE:-$HOME/.cache/tokenmill}/llama.cpp"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-}"
JOBS="${JOBS:-$(nproc)}"
BIN="$CACHE/build/bin/llama-server"

if [[ -x "$BIN" ]]; then
  echo "$BIN"
  exit 0
fi

mkdir -p "$CACHE/sdist"
if ! ls "$CACHE"/sdist/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
  spec="llama-cpp-python${VERSION:+==$VERSION}"
  python -m pip download --quiet --no-deps --no-binary :all: -d "$CACHE/sdist" "$spec" >&2
fi
tarball="$(ls "$CACHE"/sdist/llama_cpp_python-*.tar.gz | head -n1)"
if [[ ! -d "$CACHE/src" ]]; then
  rm -rf "$CACHE/src.tmp" && mkdir -p "$CACHE/src.tmp"
  tar -xzf "$tarball" -C "$CACHE/src.tmp" --strip-components=1
  mv "$CACHE/src.tmp" "$CACHE/src"
fi

# CPU only; native so the peer gets the same SIMD the host offers tokenmill's torch kernels.
cmake -S "$CACHE/src/vendor/llama.cpp" -B "$CACHE/build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$CACHE/build" --target llama-server -j "$JOBS" >&2
echo "$BIN"
