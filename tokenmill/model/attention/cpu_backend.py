"""Paged attention for the CPU, in C++: every query row (a decode token, a verified draft, a
prompt token of a prefill chunk) attends to its keys and values where they lie in the block
pool, with no gather into a copy.

One kernel for every kind of row, so that a token's arithmetic does not depend on how it was
computed: greedy text is then the same with speculation on or off (a draft verified in a chunk
equals the token decoded alone) and with the prefix cache on or off (a prompt's KV prefilled in
one chunk, in several, or decoded earlier and cached). Each row runs the same operations in the
same order (scores, max, exp and sum, value sum, all in key order, float32 accumulation)
whatever the rows beside it; tests check its bits alone and in a batch.

Why C++: the torch path gathers every sequence's K and V blocks into new tensors, then runs
two batched matmuls and a dozen small ops per layer; at batch 1 the small ops' dispatch overhead
dominates, and SDPA's tiling (split sizes chosen from the query and key lengths) makes a row's
result depend on its chunk. Here one task per (tile of up to 16 rows of one sequence, KV head)
reads each key and value row once, for all the rows and the query heads that share it (GQA).

The pool may be float32, bfloat16, float16 or int8 whatever the query's dtype (kv_dtype.py):
each key and value row is converted to float32 as it is read (an int8 row times its scale), so
a 16-bit or int8 pool halves or quarters the bytes attention reads at long context, with the
arithmetic above unchanged.

Built by model/cpp_build.py (g++ and ninja; minutes on a small machine) at install time
(scripts/install.sh runs `python -m tokenmill.model.cpp_build`) or else at first use, then
imported from the kernel cache on every later start; the instruction sets named from
/proc/cpuinfo, never -march=native. Where it cannot be built, `kernel()` returns None and the
model gets the torch backend instead (attention/backend.py, which logs the choice).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from tokenmill.model.attention.metadata import AttentionMetadata
from tokenmill.model.cpp_build import build
from tokenmill.model.attention.torch_backend import TorchAttention, TorchStep

log = logging.getLogger("tokenmill")

DTYPES = (torch.float32, torch.bfloat16)  # the query and output dtypes the kernel is compiled for
KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)  # and the pool's (kv_dtype.py)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

// v[i] = exp(v[i] - sub) for i < n. With AVX2, 8 at a time by Cephes' expf (range reduction by
// ln 2 in two parts, a degree-6 polynomial, the power of two put in the exponent bits; inputs
// clamped to [-87.3, 88.4], so an underflow gives about 1.2e-38 instead of 0): glibc's scalar exp
// was called 5.4M times in a 200-token prefill's softmaxes, and 88K times per decoded token at
// 330 tokens of context. The tail runs the same vector code on a padded copy, so every element
// gets the same function whatever n. A NaN stays NaN.
#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 exp8(__m256 x) {
  // max/min return their second operand where one is NaN: x second keeps a NaN a NaN
  x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), _mm256_max_ps(_mm256_set1_ps(-87.3365447505531f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif
static inline void exp_minus(float* v, int64_t n, float sub) {
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 s = _mm256_set1_ps(sub);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, exp8(_mm256_sub_ps(_mm256_loadu_ps(v + i), s)));
  if (i < n) {
    float pad[8] = {};
    std::memcpy(pad, v + i, (n - i) * sizeof(float));
    _mm256_storeu_ps(pad, exp8(_mm256_sub_ps(_mm256_loadu_ps(pad), s)));
    std::memcpy(v + i, pad, (n - i) * sizeof(float));
  }
#else
  for (int64_t i = 0; i < n; ++i) v[i] = std::exp(v[i] - sub);
#endif
}

// Scores of key rows against one query vector. Vector lanes hold partial sums over d = l mod
// width, folded to 4 and then summed by two horizontal adds: (q0 + q1) + (q2 + q3). dot4 does
// the same for 4 keys at once, its last two steps shared by the 4 (one hadd tree gives the 4
// scores in one register), and gives each key the bits dot gives it, so a key's score does not
// depend on which keys are computed beside it, nor on the tile or the batch. (The compiler's
// `omp simd` reduction had summed 16 lanes one after another: about a quarter of the kernel's
// samples in a decode step at a few hundred tokens of context.)
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define TM_VDOT 1
static inline bool vdot_fits(int64_t n) {
#if defined(__AVX512F__)
  return n % 16 == 0 && n > 0;
#else
  return n % 8 == 0 && n > 0;
#endif
}
static inline __m128 fold_lanes(__m256 h) {  // 8 partial sums to 4
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#if defined(__AVX512F__)
static inline __m128 fold_lanes(__m512 acc) {  // 16 partial sums to 8, then to 4
  return fold_lanes(_mm256_add_ps(_mm512_castps512_ps256(acc), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1))));
}
#endif
static inline __m128 dot_lanes(const float* a, const float* b, int64_t n) {  // 4 partial sums
#if defined(__AVX512F__)
  __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
  for (int64_t i = 16; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
#else
  __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
  for (int64_t i = 8; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
#endif
  return fold_lanes(acc);
}
// A score from its 4 partial sums, (l0 + l1) + (l2 + l3); score4 does it for 4 keys in one tree.
static inline float score1(__m128 l) { return _mm_cvtss_f32(_mm_hadd_ps(_mm_hadd_ps(l, l), l)); }
static inline __m128 score4(__m128 l0, __m128 l1, __m128 l2, __m128 l3) {
  return _mm_hadd_ps(_mm_hadd_ps(l0, l1), _mm_hadd_ps(l2, l3));
}
static inline void dot4(const float* const* k, const float* q, int64_t n, float* out) {
  _mm_storeu_ps(out, score4(dot_lanes(k[0], q, n), dot_lanes(k[1], q, n), dot_lanes(k[2], q, n), dot_lanes(k[3], q, n)));
}
#endif
static inline float dot(const float* a, const float* b, int64_t n) {
#ifdef TM_VDOT
  if (vdot_fits(n)) return score1(dot_lanes(a, b, n));
#endif
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// A pool row as float32: the row itself where the pool is float32, else converted once into
// buf (exact for every pool dtype) instead of once per query vector that reads it.
template <typename K>
static inline const float* as_float(const K* row, int64_t dim, float* buf) {
  for (int64_t d = 0; d < dim; ++d) buf[d] = static_cast<float>(row[d]);
  return buf;
}
template <>
inline const float* as_float<float>(const float* row, int64_t, float*) { return row; }
#ifdef __AVX512F__
// 16 pool values as float32 in a register, exact for every pool dtype.
template <typename K> static inline __m512 load16(const K* p);
template <> inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <> inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p) {
  const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}
template <> inline __m512 load16<c10::Half>(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <> inline __m512 load16<int8_t>(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif
#if defined(__AVX2__) && defined(__FMA__)
// The 16-bit pools 8 values at a time (the compiler leaves c10's element conversions scalar).
template <>
inline const float* as_float<c10::BFloat16>(const c10::BFloat16* row, int64_t dim, float* buf) {
  int64_t d = 0;
#ifdef __AVX512F__
  for (; d + 16 <= dim; d += 16) _mm512_storeu_ps(buf + d, load16(row + d));
#endif
  for (; d + 8 <= dim; d += 8) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d)));
    _mm256_storeu_ps(buf + d, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));  // bfloat16: the high half
  }
  for (; d < dim; ++d) buf[d] = static_cast<float>(row[d]);
  return buf;
}
#ifdef __F16C__
template <>
inline const float* as_float<c10::Half>(const c10::Half* row, int64_t dim, float* buf) {
  int64_t d = 0;
#ifdef __AVX512F__
  for (; d + 16 <= dim; d += 16) _mm512_storeu_ps(buf + d, load16(row + d));
#endif
  for (; d + 8 <= dim; d += 8)
    _mm256_storeu_ps(buf + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d))));
  for (; d < dim; ++d) buf[d] = static_cast<float>(row[d]);
  return buf;
}
#endif
#endif

// A pool row's scale: 1 for float rows (a multiply by 1 is exact, so float pools keep their
// bits), for int8 rows the float32 stored after the row's `dim` values (kv_dtype.py).
template <typename K>
static inline float row_scale(const K*, int64_t) { return 1.f; }
template <>
inline float row_scale<int8_t>(const int8_t* row, int64_t dim) {
  float s;
  std::memcpy(&s, row + dim, sizeof s);
  return s;
}

// The value sum of one query vector over `keys` value rows: a[d] = fma(p[k], v[k][d], a[d]) for
// k in key order, one rounding per key (the compiler contracted `a[d] += p * v[d]` so before). A
// chunk of 64 columns keeps its accumulator in registers over all the keys; stored and reloaded
// every 4 keys, it was the kernel's hottest line in a decode step.
#if defined(__AVX512F__)
#define TM_VSUM 1
using VecF = __m512;
static constexpr int64_t kLanes = 16;
static inline VecF vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, VecF v) { _mm512_storeu_ps(p, v); }
static inline VecF vfma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
static inline VecF vset(float x) { return _mm512_set1_ps(x); }
#elif defined(__AVX2__) && defined(__FMA__)
#define TM_VSUM 1
using VecF = __m256;
static constexpr int64_t kLanes = 8;
static inline VecF vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, VecF v) { _mm256_storeu_ps(p, v); }
static inline VecF vfma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
static inline VecF vset(float x) { return _mm256_set1_ps(x); }
#endif
#ifdef TM_VSUM
template <int U>  // U vectors of columns from d0
static inline void value_chunk(float* a, const float* const* v, const float* p, int64_t keys, int64_t d0) {
  VecF acc[U];
  for (int u = 0; u < U; ++u) acc[u] = vload(a + d0 + u * kLanes);
  for (int64_t k = 0; k < keys; ++k) {
    const VecF pk = vset(p[k]);
    for (int u = 0; u < U; ++u) acc[u] = vfma(pk, vload(v[k] + d0 + u * kLanes), acc[u]);
  }
  for (int u = 0; u < U; ++u) vstore(a + d0 + u * kLanes, acc[u]);
}
#endif
static inline void value_sum(float* a, const float* const* v, const float* p, int64_t keys, int64_t dim) {
  int64_t d = 0;
#ifdef TM_VSUM
  constexpr int kChunk = 64 / kLanes;
  for (; d + kChunk * kLanes <= dim; d += kChunk * kLanes) value_chunk<kChunk>(a, v, p, keys, d);
  for (; d + kLanes <= dim; d += kLanes) value_chunk<1>(a, v, p, keys, d);
#endif
  for (; d < dim; ++d)  // contracted to an fma where the CPU has one, as the vectors' arithmetic
    for (int64_t k = 0; k < keys; ++k) a[d] += p[k] * v[k][d];
}

// The largest of v[0 .. n) that `if (v[i] > m) m = v[i]` in order gives from m = -inf: a NaN
// never wins. Lanes can keep a different zero where +0 and -0 tie, and the softmax subtracts
// the maximum, so either gives the same bits. (The scalar compare after each score was a tenth
// of a decode step's attention.)
static inline float max_of(const float* v, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#ifdef TM_VSUM
  if (n >= kLanes) {
    VecF acc = vset(m);
    for (; i + kLanes <= n; i += kLanes)
#if defined(__AVX512F__)
      acc = _mm512_max_ps(vload(v + i), acc);  // a NaN in the first operand gives the second
#else
      acc = _mm256_max_ps(vload(v + i), acc);
#endif
    alignas(64) float lanes[kLanes];
    vstore(lanes, acc);
    for (float l : lanes)
      if (l > m) m = l;
  }
#endif
  for (; i < n; ++i)
    if (v[i] > m) m = v[i];
  return m;
}

// The softmax's denominator: 8 lane sums over i = l mod 8, a fixed tree over the lanes, then the
// tail in order (a scalar running sum was 4 cycles per key, one after another).
static inline float sum(const float* v, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  if (n >= 8) {
    __m256 acc = _mm256_loadu_ps(v);
    for (i = 8; i + 8 <= n; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(v + i));
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 p = _mm_add_ps(q, _mm_movehl_ps(q, q));
    s = _mm_cvtss_f32(_mm_add_ss(p, _mm_movehdup_ps(p)));
  }
#endif
  for (; i < n; ++i) s += v[i];
  return s;
}

// Rows kPrefetchKeys keys ahead are asked of memory while this one is used: a decode step at
// a few hundred tokens of context reads K and V rows from DRAM (16 sequences: ~50 MB), 16
// rows of a block in a row and then a jump, and waiting on those loads was about 40% of the
// kernel's time. 16 keys ahead rather than 8: 1.08-1.09x on 16 decode rows x 260 keys over 30
// layers' scattered blocks, 1.04x at 1,024 keys (paired runs of both builds in one process).
static constexpr int64_t kPrefetchKeys = 16;
template <typename K>
static inline void prefetch_row(const K* row, int64_t dim) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < dim * static_cast<int64_t>(sizeof(K)); b += 64) __builtin_prefetch(p + b);
}

// Pool rows t .. t + nk - 1 (offsets `off`) as float32 (into buf where converted) and their
// scales, asking memory for the rows kPrefetchKeys further on.
template <typename K>
static inline void read_rows(const K* pool, const int64_t* off, int64_t t, int64_t nk, int64_t span, int64_t dim,
                             float* buf, float* scale, const float** rows) {
  for (int64_t k = 0; k < nk; ++k) {
    const K* row = pool + off[t + k];
    if (t + k + kPrefetchKeys < span) prefetch_row(pool + off[t + k + kPrefetchKeys], dim);
    scale[k] = row_scale(row, dim);
    rows[k] = as_float(row, dim, buf + k * dim);
  }
}

#ifdef __AVX512F__
// A decode row (a tile of one) against one KV head: its `M` query vectors (the heads that share
// the KV head) and each key or value row are held in registers, where the general loop below
// loads both from L1 for every product, and those loads set its pace. The operations are
// dot_lanes', dot4's, dot's and value_sum's in the same order, so the bits are the same.
template <int D, typename K>
static inline void load_row(const K* row, __m512* out) {  // a pool row of 16 * D values
  for (int d = 0; d < D; ++d) out[d] = load16(row + 16 * d);
}
template <int D>
static inline __m128 dot_lanes_reg(const __m512* k, const __m512* q) {  // dot_lanes, both in registers
  __m512 acc = _mm512_mul_ps(k[0], q[0]);
  for (int d = 1; d < D; ++d) acc = _mm512_fmadd_ps(k[d], q[d], acc);
  return fold_lanes(acc);
}
// scores [M, ctx] of the query vectors qf [M, 16 * D] against keys 0 .. ctx - 1.
template <int M, int D, typename K>
static void decode_scores(const float* qf, const K* pool, const K* vpool, const int64_t* off, int64_t ctx, float* scores) {
  constexpr int64_t dim = 16 * D;
  __m512 q[M][D];
  for (int v = 0; v < M; ++v)
    for (int d = 0; d < D; ++d) q[v][d] = _mm512_loadu_ps(qf + v * dim + 16 * d);
  int64_t t = 0;
  for (; t + 4 <= ctx; t += 4) {
    __m128 l[M][4];
    alignas(16) float ks[4];
    for (int k = 0; k < 4; ++k) {
      const K* row = pool + off[t + k];
      if (t + k + kPrefetchKeys < ctx) {
        prefetch_row(pool + off[t + k + kPrefetchKeys], dim);
        prefetch_row(vpool + off[t + k + kPrefetchKeys], dim);
      }
      ks[k] = row_scale(row, dim);
      __m512 kr[D];
      load_row<D>(row, kr);
      for (int v = 0; v < M; ++v) l[v][k] = dot_lanes_reg<D>(kr, q[v]);
    }
    const __m128 scale4 = _mm_load_ps(ks);
    for (int v = 0; v < M; ++v) {  // dot4's tree, then the scale, as the scalar `d[k] * kscale[k]`
      _mm_storeu_ps(scores + v * ctx + t, _mm_mul_ps(score4(l[v][0], l[v][1], l[v][2], l[v][3]), scale4));
    }
  }
  for (; t < ctx; ++t) {
    const K* row = pool + off[t];
    const float ks = row_scale(row, dim);
    __m512 kr[D];
    load_row<D>(row, kr);
    for (int v = 0; v < M; ++v) scores[v * ctx + t] = score1(dot_lanes_reg<D>(kr, q[v])) * ks;
  }
}
// acc [M, 16 * D] = the value sums of the softmaxed scores [M, ctx] (value_sum's fmas, key order).
template <int M, int D, typename K>
static void decode_values(const float* scores, const K* pool, const int64_t* off, int64_t ctx, float* acc) {
  constexpr int64_t dim = 16 * D;
  __m512 a[M][D];
  for (int v = 0; v < M; ++v)
    for (int d = 0; d < D; ++d) a[v][d] = _mm512_setzero_ps();
  for (int64_t t = 0; t < ctx; ++t) {
    const K* row = pool + off[t];
    if (t + kPrefetchKeys < ctx) prefetch_row(pool + off[t + kPrefetchKeys], dim);
    const float vs = row_scale(row, dim);
    __m512 vr[D];
    load_row<D>(row, vr);
    for (int v = 0; v < M; ++v) {
      const __m512 p = _mm512_set1_ps(scores[v * ctx + t] * vs);
      for (int d = 0; d < D; ++d) a[v][d] = _mm512_fmadd_ps(p, vr[d], a[v][d]);
    }
  }
  for (int v = 0; v < M; ++v)
    for (int d = 0; d < D; ++d) _mm512_storeu_ps(acc + v * dim + 16 * d, a[v][d]);
}
// A tile of rows (a prefill chunk's): the scores [m, span] (stride span) of its m query vectors,
// the 4 key rows of a step held in registers for all of them; vector v keeps the keys before
// its row's context, ctx[v / group]. dot4's and dot's operations, so the same bits.
template <int D, typename K>
static void tile_scores(const float* qf, int64_t m, int64_t group, const int64_t* ctx, const K* pool,
                        const int64_t* off, int64_t span, float* scores) {
  constexpr int64_t dim = 16 * D;
  const auto load_q = [&](int64_t v, __m512* q) {
    for (int d = 0; d < D; ++d) q[d] = _mm512_loadu_ps(qf + v * dim + 16 * d);
  };
  int64_t t = 0;
  for (; t + 4 <= span; t += 4) {
    __m512 kr[4][D];
    alignas(16) float ks[4];
    for (int k = 0; k < 4; ++k) {
      const K* row = pool + off[t + k];
      if (t + k + kPrefetchKeys < span) prefetch_row(pool + off[t + k + kPrefetchKeys], dim);
      ks[k] = row_scale(row, dim);
      load_row<D>(row, kr[k]);
    }
    const __m128 scale4 = _mm_load_ps(ks);
    for (int64_t v = 0; v < m; ++v) {
      const int64_t keys = std::min<int64_t>(4, std::max<int64_t>(0, ctx[v / group] - t));
      if (keys == 0) continue;
      __m512 q[D];
      load_q(v, q);
      const __m128 s = score4(dot_lanes_reg<D>(kr[0], q), dot_lanes_reg<D>(kr[1], q), dot_lanes_reg<D>(kr[2], q),
                              dot_lanes_reg<D>(kr[3], q));
      alignas(16) float out[4];
      _mm_store_ps(out, _mm_mul_ps(s, scale4));
      for (int64_t k = 0; k < keys; ++k) scores[v * span + t + k] = out[k];
    }
  }
  for (; t < span; ++t) {
    const K* row = pool + off[t];
    const float ks = row_scale(row, dim);
    __m512 kr[D];
    load_row<D>(row, kr);
    for (int64_t v = 0; v < m; ++v) {
      if (t >= ctx[v / group]) continue;
      __m512 q[D];
      load_q(v, q);
      scores[v * span + t] = score1(dot_lanes_reg<D>(kr, q)) * ks;
    }
  }
}
// The value sums of one row's G query vectors, acc [G, 16 * D], over `keys` converted value rows
// vf with weights p [G][kValueKeys]: value_sum's fmas in key order, the G accumulators in
// registers so that each value row is loaded once for the G of them.
template <int G, int D>
static void group_values(float* acc, const float* const* vf, const float* p, int64_t keys) {
  constexpr int64_t dim = 16 * D, stride = 16;  // p's stride: kValueKeys (checked where it is declared)
  __m512 a[G][D];
  for (int g = 0; g < G; ++g)
    for (int d = 0; d < D; ++d) a[g][d] = _mm512_loadu_ps(acc + g * dim + 16 * d);
  for (int64_t k = 0; k < keys; ++k) {
    __m512 vr[D];
    for (int d = 0; d < D; ++d) vr[d] = _mm512_loadu_ps(vf[k] + 16 * d);
    for (int g = 0; g < G; ++g) {
      const __m512 pk = _mm512_set1_ps(p[g * stride + k]);
      for (int d = 0; d < D; ++d) a[g][d] = _mm512_fmadd_ps(pk, vr[d], a[g][d]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int d = 0; d < D; ++d) _mm512_storeu_ps(acc + g * dim + 16 * d, a[g][d]);
}
#endif

static constexpr int64_t kScoreKeys = 4;  // the score pass (dot4) is written out for 4 keys
static constexpr int64_t kValueKeys = 16;  // V rows converted per pass of the value sum
static constexpr int64_t kMaxGroup = 4;  // the most heads per KV head with register paths

template <typename K>
struct RegisterPaths {  // the register versions for this shape (nulls where none is compiled)
  void (*decode_scores)(const float*, const K*, const K*, const int64_t*, int64_t, float*) = nullptr;
  void (*decode_values)(const float*, const K*, const int64_t*, int64_t, float*) = nullptr;
  void (*group_values)(float*, const float* const*, const float*, int64_t) = nullptr;
  // head_dim 64 only: at 128 a step's 4 key rows would fill every register
  void (*tile_scores)(const float*, int64_t, int64_t, const int64_t*, const K*, const int64_t*, int64_t, float*) = nullptr;
};
template <typename K>
static RegisterPaths<K> register_paths(int64_t group, int64_t dim) {
#ifdef __AVX512F__
  static_assert(kValueKeys == 16, "group_values reads p at a stride of 16");
  const auto tile64 = tile_scores<4, K>;
#define TM_REGISTER_PATHS(M, D, TILE) \
  if (group == M && dim == 16 * D) return {decode_scores<M, D, K>, decode_values<M, D, K>, group_values<M, D>, TILE};
  // head_dim 64 (SmolLM2, TinyLlama-style) with up to 4 heads per KV head; 128 with up to 2
  TM_REGISTER_PATHS(1, 4, tile64) TM_REGISTER_PATHS(2, 4, tile64) TM_REGISTER_PATHS(3, 4, tile64)
  TM_REGISTER_PATHS(4, 4, tile64) TM_REGISTER_PATHS(1, 8, nullptr) TM_REGISTER_PATHS(2, 8, nullptr)
#undef TM_REGISTER_PATHS
#endif
  return {};
}

// Rows are grouped in tiles of consecutive rows of one sequence (a prefill chunk's rows; a
// decode row is a tile of one). A task is (tile, KV head): each key and value row is read once
// for the whole tile. Every row's arithmetic is the same sequence of operations whatever its
// tile: scores in key order, the max, exp and sum in key order, the value sum in key order.
// So a token gets the same bits whether it is decoded, verified or prefilled, in any batch.
static constexpr int64_t kTileRows = 16;

template <typename T, typename K>  // T: queries and output, K: the pool's elements
static void attend(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                   const torch::Tensor& tables, const torch::Tensor& row_seq, const torch::Tensor& row_ctx,
                   double scale, torch::Tensor& out) {
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(1), block = k_cache.size(2);
  const int64_t group = heads / kv_heads;
  const int64_t sq0 = q.stride(0), sq1 = q.stride(1), so0 = out.stride(0), so1 = out.stride(1);
  const int64_t sb = k_cache.stride(0), sh = k_cache.stride(1), st = k_cache.stride(2);
  const int64_t table_stride = tables.stride(0), max_ctx = tables.size(1) * block;
  const T* qp = q.data_ptr<T>();
  const K* kp = k_cache.data_ptr<K>();
  const K* vp = v_cache.data_ptr<K>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* seqp = row_seq.data_ptr<int64_t>();
  const int64_t* ctxp = row_ctx.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();

  std::vector<int64_t> tiles;  // first row of each tile, then `rows`
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(ctxp[r] >= 0 && ctxp[r] <= max_ctx, "a context is longer than its block table");
    TORCH_CHECK(seqp[r] >= 0 && seqp[r] < tables.size(0), "a row's sequence has no block table");
    if (tiles.empty() || seqp[r] != seqp[r - 1] || r - tiles.back() == kTileRows) tiles.push_back(r);
  }
  tiles.push_back(rows);
  const int64_t num_tiles = static_cast<int64_t>(tiles.size()) - 1;
  std::vector<int64_t> spans(num_tiles), order(num_tiles);  // keys each tile reads: its longest context
  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    order[tile] = tile;
    for (int64_t r = tiles[tile]; r < tiles[tile + 1]; ++r) spans[tile] = std::max(spans[tile], ctxp[r]);
  }
  // The longest tiles first, and each thread takes the next task when it finishes one: with
  // fixed halves one thread waited on the other, 14% of a decode step's attention samples on
  // 2 threads, even with equal tasks.
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return spans[a] > spans[b]; });
  const int64_t num_tasks = num_tiles * kv_heads;
  const RegisterPaths<K> fast = register_paths<K>(group, dim);
  const bool grouped = fast.group_values && group <= kMaxGroup;  // a row's value sums in one call
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), num_tasks), 1, [&](int64_t, int64_t) {
    std::vector<float> qf, acc, scores, mx, total, rowbuf(kValueKeys * dim);
    std::vector<int64_t> row_off;
    for (int64_t slot = next++; slot < num_tasks; slot = next++) {
      const int64_t tile = order[slot / kv_heads], g = slot % kv_heads;
      const int64_t r0 = tiles[tile], n = tiles[tile + 1] - r0, span = spans[tile];
      const int64_t* table = tp + seqp[r0] * table_stride;
      // Each key's row offset in the pool (K and V alike), found once without a division per
      // key (it took two 64-bit divisions per row read and per prefetch).
      row_off.resize(span);
      for (int64_t t0 = 0, b = 0; t0 < span; t0 += block, ++b) {
        const int64_t base = table[b] * sb + g * sh;
        for (int64_t o = 0; o < block && t0 + o < span; ++o) row_off[t0 + o] = base + o * st;
      }
      const int64_t m = n * group;  // query vectors in the task: row i, head j -> i * group + j
      qf.assign(m * dim, 0.f);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < group; ++j)
          for (int64_t d = 0; d < dim; ++d)
            qf[(i * group + j) * dim + d] =
                static_cast<float>(qp[(r0 + i) * sq0 + (g * group + j) * sq1 + d]) * static_cast<float>(scale);
      scores.assign(m * span, 0.f);
      const bool one_row = n == 1 && fast.decode_scores;
      if (one_row) {
        fast.decode_scores(qf.data(), kp, vp, row_off.data(), span, scores.data());
      } else if (fast.tile_scores) {
        fast.tile_scores(qf.data(), m, group, ctxp + r0, kp, row_off.data(), span, scores.data());
      }
      // Scores, kScoreKeys keys at a time (dot4 where it fits), in key order per query vector.
      for (int64_t t = 0; t < span && !one_row && !fast.tile_scores; t += kScoreKeys) {
        const int64_t nk = std::min<int64_t>(kScoreKeys, span - t);
        float kscale[kScoreKeys];
        const float* kf[kScoreKeys];
        read_rows(kp, row_off.data(), t, nk, span, dim, rowbuf.data(), kscale, kf);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t keys = std::min<int64_t>(nk, std::max<int64_t>(0, ctxp[r0 + i] - t));
          if (keys == 0) continue;
          for (int64_t j = 0; j < group; ++j) {
            const int64_t v = i * group + j;
            const float* qv = qf.data() + v * dim;
            float d[kScoreKeys];
#ifdef TM_VDOT
            if (nk == 4 && vdot_fits(dim)) {
              dot4(kf, qv, dim, d);
            } else
#endif
              for (int64_t k = 0; k < keys; ++k) d[k] = dot(kf[k], qv, dim);
            for (int64_t k = 0; k < keys; ++k) scores[v * span + t + k] = d[k] * kscale[k];
          }
        }
      }
      total.resize(m);
      mx.resize(m);
      for (int64_t v = 0; v < m; ++v) {
        const int64_t ctx = ctxp[r0 + v / group];
        float* sv = scores.data() + v * span;
        mx[v] = max_of(sv, ctx);
        exp_minus(sv, ctx, mx[v]);
        total[v] = sum(sv, ctx);
      }
      // The value sum, kValueKeys keys per pass over the query vectors (value_sum).
      acc.assign(m * dim, 0.f);
      if (one_row) fast.decode_values(scores.data(), vp, row_off.data(), span, acc.data());
      for (int64_t t = 0; t < span && !one_row; t += kValueKeys) {
        const int64_t nk = std::min<int64_t>(kValueKeys, span - t);
        float vscale[kValueKeys];
        const float* vf[kValueKeys];
        read_rows(vp, row_off.data(), t, nk, span, dim, rowbuf.data(), vscale, vf);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t keys = std::min<int64_t>(nk, std::max<int64_t>(0, ctxp[r0 + i] - t));
          if (keys == 0) continue;
          float p[kMaxGroup * kValueKeys];  // p[j * kValueKeys + k]: head j's weight of key t + k
          for (int64_t j = 0; j < group; ++j) {
            const int64_t v = i * group + j;
            float* pj = grouped ? p + j * kValueKeys : p;
            for (int64_t k = 0; k < keys; ++k) pj[k] = scores[v * span + t + k] * vscale[k];
            if (!grouped) value_sum(acc.data() + v * dim, vf, p, keys, dim);
          }
          if (grouped) fast.group_values(acc.data() + i * group * dim, vf, p, keys);
        }
      }
      for (int64_t v = 0; v < m; ++v) {
        const float inv = total[v] > 0.f ? 1.f / total[v] : 0.f;  // context 0: output 0
        T* o = op + (r0 + v / group) * so0 + (g * group + v % group) * so1;
        for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(acc[v * dim + d] * inv);
      }
    }
  });
}

template <typename T>
static void attend_pool(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                        const torch::Tensor& tables, const torch::Tensor& row_seq, const torch::Tensor& row_ctx,
                        double scale, torch::Tensor& out) {
  switch (k_cache.scalar_type()) {
    case at::kFloat: return attend<T, float>(q, k_cache, v_cache, tables, row_seq, row_ctx, scale, out);
    case at::kBFloat16: return attend<T, at::BFloat16>(q, k_cache, v_cache, tables, row_seq, row_ctx, scale, out);
    case at::kHalf: return attend<T, at::Half>(q, k_cache, v_cache, tables, row_seq, row_ctx, scale, out);
    case at::kChar: return attend<T, int8_t>(q, k_cache, v_cache, tables, row_seq, row_ctx, scale, out);
    default: TORCH_CHECK(false, "paged_attention: a float32, bfloat16, float16 or int8 pool only");
  }
}

// The work without the GIL handling: cpu_decoder.py calls it with the GIL already released.
static void paged_attention_apply(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                  const torch::Tensor& tables, const torch::Tensor& row_seq, const torch::Tensor& row_ctx,
                                  double scale, torch::Tensor& out) {
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "rows must be contiguous");
  TORCH_CHECK(k_cache.strides() == v_cache.strides() && k_cache.stride(3) == 1, "K and V pools share one layout");
  TORCH_CHECK(tables.scalar_type() == at::kLong && row_seq.scalar_type() == at::kLong && row_ctx.scalar_type() == at::kLong,
              "int64 tables, sequences and lengths");
  TORCH_CHECK(tables.stride(1) == 1 && row_seq.is_contiguous() && row_ctx.is_contiguous(), "contiguous tables and rows");
  TORCH_CHECK(row_seq.size(0) == q.size(0) && row_ctx.size(0) == q.size(0) && out.sizes() == q.sizes(), "one entry per query row");

  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "K and V pools share one dtype");
  TORCH_CHECK(q.scalar_type() == out.scalar_type(), "the output is in the query's dtype");
  const int64_t width = k_cache.size(3), dim = q.size(2);
  TORCH_CHECK(width == (k_cache.scalar_type() == at::kChar ? dim + 4 : dim), "pool rows do not match head_dim");
  if (q.scalar_type() == at::kFloat) {
    attend_pool<float>(q, k_cache, v_cache, tables, row_seq, row_ctx, scale, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    attend_pool<at::BFloat16>(q, k_cache, v_cache, tables, row_seq, row_ctx, scale, out);
  } else {
    TORCH_CHECK(false, "paged_attention: float32 or bfloat16 queries only");
  }
}

void paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor tables,
                     torch::Tensor row_seq, torch::Tensor row_ctx, double scale, torch::Tensor out) {
  // No Python object is touched below: other Python threads (the server's HTTP loop) run
  // while the kernel does, instead of waiting for the GIL until it returns.
  pybind11::gil_scoped_release no_gil;
  paged_attention_apply(q, k_cache, v_cache, tables, row_seq, row_ctx, scale, out);
}
"""


@dataclass
class CpuStep(TorchStep):
    @cached_property
    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block tables [sequences, max blocks], each row's sequence, each row's context): the
        decode rows' sequences first, then one per prefill chunk, whose row i sees the keys up
        to its own position."""
        meta = self.meta
        decode, nd, chunks = meta.decode_block_tables, meta.num_decodes, meta.prefills
        widths = [len(chunk.block_table) for chunk in chunks] + ([] if decode is None else [decode.shape[1]])
        padded = torch.zeros(nd + len(chunks), max(widths), dtype=torch.long)
        if decode is not None:
            # One copy: the decode rows' tables come padded already. (Split into a tensor per row
            # and copied back one by one, they cost 60 us of a one-row step with cold caches.)
            padded[:nd, : decode.shape[1]] = decode
        seq = list(range(nd))
        ctx = [] if meta.decode_context_lens is None else [meta.decode_context_lens]
        for i, chunk in enumerate(chunks):
            padded[nd + i, : len(chunk.block_table)] = chunk.block_table
            seq += [nd + i] * chunk.num_tokens
            first = chunk.context_len - chunk.num_tokens + 1
            ctx.append(torch.arange(first, chunk.context_len + 1))
        return padded, torch.tensor(seq, dtype=torch.long), torch.cat(ctx).long()


class CpuAttention(TorchAttention):
    """Every row, decoded, verified or prefilled, through the C++ kernel: one arithmetic per
    token (module docstring). The KV write is the torch backend's."""

    name = "C++ CPU attention kernel"

    def __init__(self, paged_attention: Callable[..., None]):
        self.paged_attention = paged_attention  # kernel()'s

    def prepare(self, meta: AttentionMetadata, k_cache: torch.Tensor) -> CpuStep:
        return CpuStep(meta, k_cache.shape[2])

    def forward(self, q, k_cache, v_cache, step: CpuStep, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        self.paged_attention(q, k_cache, v_cache, *step.rows, scale, out)
        return out


@functools.cache
def kernel():
    """The compiled `paged_attention(q, k_cache, v_cache, tables, row_seq, row_ctx, scale, out)`,
    or None."""
    try:
        module = build("tokenmill_cpu_attention", _SOURCE, ["paged_attention"], ["-O3", "-fopenmp"])
    except Exception as e:  # no compiler, no ninja, no headers: the torch path still works
        log.warning("CPU attention kernel unavailable, using the torch path: %s", str(e).splitlines()[0] if str(e) else e)
        return None
    return module.paged_attention
