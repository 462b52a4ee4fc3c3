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

# CPU only, with every instruction set this CPU lists, named one by one: never GGML_NATIVE,
# since a VM may list AMX without the OS enabling it and a -march=native binary then dies with
# SIGILL at start. AMX stays off: built in where the OS does grant it (Intel Xeon, family 6
# model 167, Dec 2026), llama.cpp's AMX matmul (tinygemm_kernel_amx, Q4_1) died with SIGILL at
# its first tilezero on the first request.
flags=" $(grep -m1 -E '^(flags|Features)' /proc/cpuinfo || true) "
has() { [[ "$flags" == *" $1 "* ]]; }
onoff() { if has "$1"; then echo ON; else echo OFF; fi; }
isa=(
  -DGGML_AVX="$(onoff avx)" -DGGML_AVX2="$(onoff avx2)" -DGGML_FMA="$(onoff fma)" -DGGML_F16C="$(onoff f16c)"
  -DGGML_BMI2="$(onoff bmi2)" -DGGML_AVX_VNNI="$(onoff avx_vnni)" -DGGML_AVX512="$(onoff avx512f)"
  -DGGML_AVX512_VBMI="$(onoff avx512vbmi)" -DGGML_AVX512_VNNI="$(onoff avx512_vnni)"
  -DGGML_AVX512_BF16="$(onoff avx512_bf16)" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
)
echo "llama.cpp build: ${isa[*]}" >&2
cmake -S "$CACHE/src/vendor/llama.cpp" -B "$CACHE/build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF "${isa[@]}" -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$CACHE/build" --target llama-server -j "$JOBS" >&2
echo "$BIN"
