"""Paged decode attention for the CPU, in C++: one query token per sequence attends to its
keys and values where they lie in the block pool, with no gather into a copy. Prefill chunks
run the torch code (torch_backend.py).

Why a kernel: the torch path gathers every sequence's K and V blocks into new tensors, then runs
two batched matmuls and a dozen small ops per layer. With 16 sequences of ~300 tokens the gather
alone is as costly as the matmuls, and at batch 1 the small ops' dispatch overhead dominates.
Here one task per (sequence, KV head) reads each key and value row once, for all the query heads
that share it (GQA), with float32 accumulation.

Built at first use with torch.utils.cpp_extension (g++ and ninja; ~1 minute once, then cached
in torch's extension directory). Where it cannot be built, `kernel()` returns None and the
model gets the torch backend instead (attention/backend.py, which logs the choice).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from typing import Callable

import torch

from tokenmill.model.attention.torch_backend import TorchAttention, TorchStep

log = logging.getLogger("tokenmill")

DTYPES = (torch.float32, torch.bfloat16)  # what the kernel is compiled for

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <vector>

template <typename T>
static inline float dot(const T* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<float>(a[i]) * b[i];
  return s;
}

template <typename T>
static void decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                   const torch::Tensor& tables, const torch::Tensor& lens, double scale, torch::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(1), block = k_cache.size(2);
  const int64_t group = heads / kv_heads;
  const int64_t sq0 = q.stride(0), sq1 = q.stride(1), so0 = out.stride(0), so1 = out.stride(1);
  const int64_t sb = k_cache.stride(0), sh = k_cache.stride(1), st = k_cache.stride(2);
  const int64_t table_stride = tables.stride(0), max_ctx = tables.size(1) * block;
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();

  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), acc(group * dim), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, g = task % kv_heads, ctx = lp[b];
      TORCH_CHECK(ctx >= 0 && ctx <= max_ctx, "a context is longer than its block table");
      const int64_t* table = tp + b * table_stride;
      for (int64_t j = 0; j < group; ++j)
        for (int64_t d = 0; d < dim; ++d)
          qf[j * dim + d] = static_cast<float>(qp[b * sq0 + (g * group + j) * sq1 + d]) * static_cast<float>(scale);
      scores.assign(group * ctx, 0.f);
      std::vector<float> mx(group, -std::numeric_limits<float>::infinity());
      for (int64_t t = 0; t < ctx; ++t) {
        const T* krow = kp + table[t / block] * sb + g * sh + (t % block) * st;
        for (int64_t j = 0; j < group; ++j) {
          const float s = dot(krow, qf.data() + j * dim, dim);
          scores[j * ctx + t] = s;
          if (s > mx[j]) mx[j] = s;
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::vector<float> total(group, 0.f);
      for (int64_t j = 0; j < group; ++j)
        for (int64_t t = 0; t < ctx; ++t) {
          const float p = std::exp(scores[j * ctx + t] - mx[j]);
          scores[j * ctx + t] = p;
          total[j] += p;
        }
      for (int64_t t = 0; t < ctx; ++t) {
        const T* vrow = vp + table[t / block] * sb + g * sh + (t % block) * st;
        for (int64_t j = 0; j < group; ++j) {
          const float p = scores[j * ctx + t];
          float* a = acc.data() + j * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) a[d] += p * static_cast<float>(vrow[d]);
        }
      }
      for (int64_t j = 0; j < group; ++j) {
        const float inv = total[j] > 0.f ? 1.f / total[j] : 0.f;  // ctx 0: output 0
        T* o = op + b * so0 + (g * group + j) * so1;
        for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(acc[j * dim + d] * inv);
      }
    }
  });
}

void paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor tables,
                  torch::Tensor lens, double scale, torch::Tensor out) {
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "rows must be contiguous");
  TORCH_CHECK(k_cache.strides() == v_cache.strides() && k_cache.stride(3) == 1, "K and V pools share one layout");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "int64 tables and lengths");
  TORCH_CHECK(tables.stride(1) == 1 && lens.is_contiguous(), "contiguous tables and lengths");
  TORCH_CHECK(tables.size(0) == q.size(0) && lens.size(0) == q.size(0) && out.sizes() == q.sizes(), "one row per query");

  if (q.scalar_type() == at::kFloat) {
    decode<float>(q, k_cache, v_cache, tables, lens, scale, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    decode<at::BFloat16>(q, k_cache, v_cache, tables, lens, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode: float32 or bfloat16 only");
  }
}
"""


class CpuAttention(TorchAttention):
    """The torch backend with its decode rows run by the C++ kernel."""

    name = "C++ CPU decode kernel"

    def __init__(self, paged_decode: Callable[..., None]):
        self.paged_decode = paged_decode  # kernel()'s

    def decode(self, q, k_cache, v_cache, step: TorchStep, scale: float, out: torch.Tensor) -> None:
        meta = step.meta
        nd = meta.num_decodes
        self.paged_decode(q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale, out[:nd])


@functools.cache
def kernel():
    """The compiled `paged_decode(q, k_cache, v_cache, tables, lens, scale, out)`, or None."""
    try:
        from torch.utils.cpp_extension import _get_build_directory, load_inline

        # -march=native: the binary is for this CPU only, so the cache entry is keyed by the CPU's
        # flags (a shared home directory or image must not hand an AVX-512 build to another CPU),
        # and by the source.
        name = f"tokenmill_cpu_attention_{_digest(_SOURCE + _cpu_flags())}"
        lock = os.path.join(_get_build_directory(name, False), "lock")
        if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > 600:
            os.remove(lock)  # left by a build that was killed: torch would wait on it forever
        module = load_inline(
            name=name,
            cpp_sources=_SOURCE,
            functions=["paged_decode"],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as e:  # no compiler, no ninja, no headers: the torch path still works
        log.warning("CPU attention kernel unavailable, using the torch path: %s", str(e).splitlines()[0] if str(e) else e)
        return None
    return module.paged_decode


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]
