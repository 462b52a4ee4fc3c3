"""tokenmill's own CPU kernels for weight-only quantized linears, y = x @ W.T, in C++: int4 with a
scale and a minimum per group of 32k inputs (GGUF Q4_0/Q4_1, int4 quantized on load, GPTQ/AWQ
group int4) and int8 with a scale per group (GGUF Q8_0, per-row int8).

Weights stay in a packed layout made once at load, the size of the GGUF data: int4 nibbles
[out, in/2] in GGUF's order (byte j of a 32-block holds input j in its low nibble and j+16 in
its high one), int8 values [out, in], and float16 scales and minimums [out, groups]. No float
copy of a weight exists outside a thread's cache-sized tile.

One arithmetic for every row count. From 4 rows, threads split the output columns into tiles
of 32; a tile is dequantized to float once into a thread-local buffer (w = q * scale + min, one
fused multiply-add per weight), then every row of x is multiplied against it from cache. Below
4 rows nothing would reuse a tile, so each 8 weights are dequantized in registers by the same
instruction and multiplied at once (no store and reload of a buffer), 8 columns at a time at
one row so that 8 independent accumulator chains keep the FMA units busy: the LM head's one
row went from 1.71 to 1.15 ms, a decode step's layers from 8.7 to 7.8 ms (AMD EPYC, AVX2 code).

Batch-invariant by construction: the arithmetic of y[r, n] is the same sequence of operations
whatever the row count and the thread split. Its products over k go into 8 lane accumulators in
k order (lane = k mod 8, fused multiply-add), the lanes are summed in one fixed order, then the
k tail (in % 8) is added in k order. The 4x3 register block and its 1-row and 1-column edges
all run that sequence; nothing depends on which tile or thread holds a column or how many rows
share the call. Built with -ffp-contract=off so the compiler does not fuse differently in
different copies of the loop.

Built with torch.utils.cpp_extension (g++ and ninja) at install time or else at first use, and
imported from cpp_build's kernel cache on later starts, under a name keyed by the source and
the CPU's flags. Instruction sets are named
explicitly from /proc/cpuinfo (AVX2+FMA+F16C, AVX-512 F/BW/VL/VNNI where listed), never
-march=native and never AMX, whose flags a VM may show without the OS enabling it. Where the
build fails `kernel()` returns None and the linears fall back to dequantizing in torch (quant.py).
"""

from __future__ import annotations

import functools
import logging

from tokenmill.model.cpp_build import build

log = logging.getLogger("tokenmill")

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TM_AVX2 1
#endif
#if defined(TM_AVX2) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define TM_VNNI 1
#endif

// Activation blocks of 32 inputs; output columns in groups of 8 (one float lane each).
static constexpr int64_t kBlock = 32, kCols = 8;
// From this many rows, a thread runs 4 column groups for every row before moving on, so a
// row's int8 activations are read from cache once per 32 columns instead of once per 8.
static constexpr int64_t kManyRows = 4, kRowPassGroups = 4;

static inline float half_to_float(at::Half h) {
#ifdef __F16C__
  return _cvtsh_ss(h.x);
#else
  return static_cast<float>(h);
#endif
}

// --- 8-lane float vector (used by cpu_decoder.py's layer code): AVX2 or a plain array ---
#if defined(__AVX2__) && defined(__FMA__)
typedef __m256 V8;
static inline V8 v_zero() { return _mm256_setzero_ps(); }
static inline V8 v_load(const float* p) { return _mm256_loadu_ps(p); }
static inline V8 v_fma(V8 a, V8 b, V8 c) { return _mm256_fmadd_ps(a, b, c); }
static inline float v_sum(V8 v) {  // fixed order: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
struct V8 { float l[8]; };
static inline V8 v_zero() { V8 v; for (int i = 0; i < 8; ++i) v.l[i] = 0.f; return v; }
static inline V8 v_load(const float* p) { V8 v; for (int i = 0; i < 8; ++i) v.l[i] = p[i]; return v; }
static inline V8 v_fma(V8 a, V8 b, V8 c) { for (int i = 0; i < 8; ++i) c.l[i] = std::fma(a.l[i], b.l[i], c.l[i]); return c; }
static inline float v_sum(V8 v) {  // the AVX2 order above
  float a = v.l[0] + v.l[4], b = v.l[1] + v.l[5], c = v.l[2] + v.l[6], d = v.l[3] + v.l[7];
  return (a + c) + (b + d);
}
#endif

// The k tail (K % 8) after the lanes, in k order.
static inline float finish(V8 acc, const float* x, const float* w, int64_t k8, int64_t K) {
  float s = v_sum(acc);
  for (int64_t k = k8; k < K; ++k) s = std::fma(x[k], w[k], s);
  return s;
}

// --- activations: two int8 passes per block of 32 ---
// Each block of a row is rounded to int8, x ~ q * d with d = amax / 127 and q =
// round-half-even(x * (127 / amax)), as llama.cpp's Q8 activations; then what that leaves,
// x - q * d, is rounded the same way to q2 * d2. The kernel multiplies both by the weights (the
// weights are unpacked once for the two), so the activations it runs are q * d + q2 * d2, within
// about amax / 64516 of x instead of amax / 254: one pass moved SmolLM2's logits by up to 1.4 and
// changed its greedy answers.
// Past K the block is zero. A block holding inf or NaN gets q = 0 and d = NaN, so its row's
// outputs are NaN as a float matmul's would be. Only float multiplies and subtractions, exact
// conversions and integer sums: the AVX2 and scalar versions give the same bytes.
static int32_t round_block(const float* v, int64_t n, int8_t* q, float& d) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t k = 0; k < n; ++k) {
    const float a = std::fabs(v[k]);
    finite = finite && std::isfinite(a);
    amax = std::max(amax, a);
  }
  if (!finite) {
    std::memset(q, 0, kBlock);
    d = std::numeric_limits<float>::quiet_NaN();
    return 0;
  }
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  d = amax / 127.f;
  int32_t sum = 0;
#ifdef TM_AVX2
  if (n == kBlock) {
    const __m256 iv = _mm256_set1_ps(inv);
    __m256i w[4];
    for (int u = 0; u < 4; ++u) w[u] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * u), iv));
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(w[0], w[1]), _mm256_packs_epi32(w[2], w[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    for (int64_t k = 0; k < kBlock; ++k) sum += q[k];
    return sum;
  }
#endif
  for (int64_t k = 0; k < kBlock; ++k) {
    // nearbyint in the default rounding mode: half to even, as _mm256_cvtps_epi32
    q[k] = k < n ? static_cast<int8_t>(std::nearbyint(v[k] * inv)) : 0;
    sum += q[k];
  }
  return sum;
}

// A row's activations: per block b, q[32b..] * d[b] + q2[32b..] * d2[b]; qsum and qsum2 the
// blocks' integer sums, s[b] the sum of the values they stand for (the minimum's term).
struct QRow { const int8_t *q, *q2; const float *d, *d2, *s; const int32_t *qsum, *qsum2; };

static void quantize_row(const float* x, int64_t K, int8_t* q, int8_t* q2, float* d, float* d2, float* s,
                         int32_t* qsum, int32_t* qsum2) {
  const int64_t nb = (K + kBlock - 1) / kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k0 = b * kBlock, n = std::min(kBlock, K - k0);
    qsum[b] = round_block(x + k0, n, q + k0, d[b]);
    float r[kBlock] = {};
    if (!std::isnan(d[b]))
      for (int64_t k = 0; k < n; ++k) r[k] = x[k0 + k] - static_cast<float>(q[k0 + k]) * d[b];
    qsum2[b] = round_block(r, n, q2 + k0, d2[b]);
    s[b] = d[b] * static_cast<float>(qsum[b]) + d2[b] * static_cast<float>(qsum2[b]);
  }
}

// --- weights ---
// Held in column groups of 8 output columns (quant.py lays them out at load): within a group,
// 32 bytes hold 4 consecutive inputs of each of the 8 columns, lane j (bytes 4j..4j+3) column
// j, so one 32-byte load and one 4-byte broadcast of x give the 8 columns' products for those
// inputs without any horizontal sum.
// int4: [ceil(N/8), K/8, 32] bytes, byte 4j+i = input 8t+i (low nibble) | input 8t+4+i (high
//       nibble) of column j; w = q * scale + min per group of G inputs (a multiple of 32); min ==
//       nullptr: GGUF Q4_0's symmetric form, min = -8 * scale (exact).
// int8: [ceil(N/8), Kp/4, 32] bytes (Kp: K rounded up to 32, zeros past K), byte 4j+i = input
//       4t+i of column j; w = q * scale per group of G (a multiple of 32, or G = K).
// Scales and minimums are float16 [ceil(N/8), K/G, 8]: a group's 8 columns in one 16-byte load.
struct Int4W {
  const uint8_t* q; const at::Half* scale; const at::Half* min; int64_t K, G;
  static constexpr bool kHasMin = true;
  inline const uint8_t* group(int64_t c) const { return q + c * (K / 8) * 32; }
  inline int32_t dot_scalar(int64_t c, int64_t j, int64_t b, const int8_t* x) const {
    const uint8_t* p = group(c) + b * 4 * 32;
    int32_t s = 0;
    for (int t = 0; t < 4; ++t)
      for (int i = 0; i < 4; ++i) {
        const uint8_t v = p[t * 32 + 4 * j + i];
        s += (v & 0x0F) * x[8 * t + i] + (v >> 4) * x[8 * t + 4 + i];
      }
    return s;
  }
};
struct Int8W {
  const int8_t* q; const at::Half* scale; int64_t K, G;
  static constexpr bool kHasMin = false;
  inline int64_t padded_k() const { return (K + 31) / 32 * 32; }
  inline const int8_t* group(int64_t c) const { return q + c * padded_k() * 8; }
  inline int32_t dot_scalar(int64_t c, int64_t j, int64_t b, const int8_t* x) const {
    const int8_t* p = group(c) + b * 8 * 32;
    int32_t s = 0;
    for (int t = 0; t < 8; ++t)
      for (int i = 0; i < 4; ++i) s += p[t * 32 + 4 * j + i] * x[4 * t + i];
    return s;
  }
};

#ifdef TM_AVX2
static inline __m256i bcast4(const int8_t* x) {  // x[0..3] into every 32-bit lane
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm256_set1_epi32(v);
}
// acc + the exact int32 sums of 4 adjacent products u[k] * s[k] per lane (u unsigned, s signed).
// Without VNNI, maddubs' int16 pair sums cannot saturate: u <= 15 (int4), or u = |w| <= 128
// with w's sign moved onto x (int8), and 128 * 127 * 2 < 32767.
static inline __m256i dot_add(__m256i acc, __m256i u, __m256i s) {
#ifdef TM_VNNI
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
// The 8 columns' integer dot products with the row's block b, lane j = column j, for the
// two passes: each weight vector is unpacked once and multiplied by both.
struct Dots { __m256i a, b; };
static inline Dots block_dot(const Int4W& w, int64_t c, int64_t b, const QRow& x) {
  const uint8_t* p = w.group(c) + b * 4 * 32;
  const int8_t *x1 = x.q + b * kBlock, *x2 = x.q2 + b * kBlock;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m256i a1 = _mm256_setzero_si256(), a2 = _mm256_setzero_si256();
  for (int t = 0; t < 4; ++t) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + t * 32));
    const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    a1 = dot_add(dot_add(a1, lo, bcast4(x1 + 8 * t)), hi, bcast4(x1 + 8 * t + 4));
    a2 = dot_add(dot_add(a2, lo, bcast4(x2 + 8 * t)), hi, bcast4(x2 + 8 * t + 4));
  }
  return {a1, a2};
}
static inline Dots block_dot(const Int8W& w, int64_t c, int64_t b, const QRow& x) {
  const int8_t* p = w.group(c) + b * 8 * 32;
  const int8_t *x1 = x.q + b * kBlock, *x2 = x.q2 + b * kBlock;
  __m256i a1 = _mm256_setzero_si256(), a2 = _mm256_setzero_si256();
#ifdef TM_VNNI
  // (w + 128) is unsigned: sum((w + 128) * x) - 128 * sum(x), one instruction per 4 inputs.
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int t = 0; t < 8; ++t) {
    const __m256i u = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + t * 32)), flip);
    a1 = _mm256_dpbusd_epi32(a1, u, bcast4(x1 + 4 * t));
    a2 = _mm256_dpbusd_epi32(a2, u, bcast4(x2 + 4 * t));
  }
  return {_mm256_sub_epi32(a1, _mm256_set1_epi32(128 * x.qsum[b])), _mm256_sub_epi32(a2, _mm256_set1_epi32(128 * x.qsum2[b]))};
#else
  for (int t = 0; t < 8; ++t) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + t * 32));
    const __m256i u = _mm256_abs_epi8(v);
    a1 = dot_add(a1, u, _mm256_sign_epi8(bcast4(x1 + 4 * t), v));
    a2 = dot_add(a2, u, _mm256_sign_epi8(bcast4(x2 + 4 * t), v));
  }
  return {a1, a2};
#endif
}
#endif

// y[n] for the 8 columns of column group c (n = 8c + j; j >= `valid` are padding, not stored)
// of one row. Per block b: the exact integer dot products i and i2 of each column's weights
// and the row's two int8 passes, then acc = fma(float(i), scale * d_b, acc),
// acc = fma(float(i2), scale * d2_b, acc) and, for int4, macc = fma(min, s_b, macc); y = acc + macc. Each column's arithmetic is this sequence
// whatever the rows, the thread split or the column's group: the integers are exact and the
// float steps run per lane in block order.
template <typename W>
static inline void row_group(const W& w, int64_t c, int64_t N, const QRow& x, float* y) {
  const int64_t nb = (w.K + kBlock - 1) / kBlock, groups = w.K / w.G;
  const int64_t valid = std::min(kCols, N - c * kCols);
  const at::Half* sc = w.scale + c * groups * kCols;
  const at::Half* mn = nullptr;
  if constexpr (W::kHasMin) mn = w.min ? w.min + c * groups * kCols : nullptr;
#ifdef TM_AVX2
  __m256 acc = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const Dots i = block_dot(w, c, b, x);
    const int64_t g = (b * kBlock) / w.G;
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + g * kCols)));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i.a), _mm256_mul_ps(d, _mm256_set1_ps(x.d[b])), acc);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i.b), _mm256_mul_ps(d, _mm256_set1_ps(x.d2[b])), acc);
    if constexpr (W::kHasMin) {
      const __m256 m = mn ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + g * kCols)))
                          : _mm256_mul_ps(d, _mm256_set1_ps(-8.f));
      macc = _mm256_fmadd_ps(m, _mm256_set1_ps(x.s[b]), macc);
    }
  }
  alignas(32) float out[kCols];
  _mm256_store_ps(out, _mm256_add_ps(acc, macc));
  for (int64_t j = 0; j < valid; ++j) y[c * kCols + j] = out[j];
#else
  for (int64_t j = 0; j < valid; ++j) {
    float acc = 0.f, macc = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const int32_t i = w.dot_scalar(c, j, b, x.q + b * kBlock), i2 = w.dot_scalar(c, j, b, x.q2 + b * kBlock);
      const int64_t g = (b * kBlock) / w.G;
      const float d = half_to_float(sc[g * kCols + j]);
      acc = std::fma(static_cast<float>(i), d * x.d[b], acc);
      acc = std::fma(static_cast<float>(i2), d * x.d2[b], acc);
      if constexpr (W::kHasMin) macc = std::fma(mn ? half_to_float(mn[g * kCols + j]) : d * -8.f, x.s[b], macc);
    }
    y[c * kCols + j] = acc + macc;
  }
#endif
}

template <typename W>
static torch::Tensor run(const torch::Tensor& x, int64_t N, const W& w) {
  const int64_t K = w.K;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [rows, in_features]");
  const torch::Tensor xf = x.to(torch::kFloat).contiguous();
  const int64_t rows = xf.size(0), nb = (K + kBlock - 1) / kBlock;
  torch::Tensor y = torch::empty({rows, N}, xf.options());
  if (rows == 0) return y;
  std::vector<int8_t> xq(rows * nb * kBlock), xq2(rows * nb * kBlock);
  std::vector<float> xd(rows * nb), xd2(rows * nb), xs(rows * nb);
  std::vector<int32_t> xsum(rows * nb), xsum2(rows * nb);
  const float* xp = xf.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * nb;
      quantize_row(xp + r * K, K, xq.data() + o * kBlock, xq2.data() + o * kBlock, xd.data() + o, xd2.data() + o,
                   xs.data() + o, xsum.data() + o, xsum2.data() + o);
    }
  });
  float* yp = y.data_ptr<float>();
  auto qrow = [&](int64_t r) {
    const int64_t o = r * nb;
    return QRow{xq.data() + o * kBlock, xq2.data() + o * kBlock, xd.data() + o, xd2.data() + o, xs.data() + o,
                xsum.data() + o, xsum2.data() + o};
  };
  const int64_t col_groups = (N + kCols - 1) / kCols;
  if (rows < kManyRows) {
    at::parallel_for(0, col_groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c)
        for (int64_t r = 0; r < rows; ++r) row_group(w, c, N, qrow(r), yp + r * N);
    });
    return y;
  }
  const int64_t tiles = (col_groups + kRowPassGroups - 1) / kRowPassGroups;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c1 = std::min(col_groups, (t + 1) * kRowPassGroups);
      for (int64_t r = 0; r < rows; ++r) {
        const QRow xr = qrow(r);
        for (int64_t c = t * kRowPassGroups; c < c1; ++c) row_group(w, c, N, xr, yp + r * N);
      }
    }
  });
  return y;
}

static void check_scales(const torch::Tensor& t, int64_t N, int64_t groups, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kHalf && t.is_contiguous() && t.dim() == 3 && t.size(0) == (N + kCols - 1) / kCols &&
                  t.size(1) == groups && t.size(2) == kCols,
              what, " must be contiguous float16 [ceil(out/8), in/group, 8]");
}

// x [rows, K] float-like; q [ceil(N/8), K/8, 32] uint8; scale, min [ceil(N/8), K/G, 8] float16
// (min empty: Q4_0's symmetric form) -> y [rows, N] float32.
// The work without the GIL handling: cpu_decoder.py calls it with the GIL already released.
static torch::Tensor int4_apply(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                                const torch::Tensor& min, int64_t G, int64_t N) {
  const int64_t K = q.dim() == 3 ? q.size(1) * 8 : 0;
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous() && q.dim() == 3 && q.size(0) == (N + kCols - 1) / kCols &&
                  q.size(2) == 32, "int4: q must be contiguous uint8 [ceil(out/8), in/8, 32]");
  TORCH_CHECK(G > 0 && G % kBlock == 0 && K % G == 0, "int4: the group size must be a multiple of 32 dividing in_features");
  check_scales(scale, N, K / G, "int4: scale");
  const bool symmetric = min.numel() == 0;
  if (!symmetric) check_scales(min, N, K / G, "int4: min");
  return run(x, N, Int4W{q.data_ptr<uint8_t>(), scale.data_ptr<at::Half>(), symmetric ? nullptr : min.data_ptr<at::Half>(), K, G});
}

// x [rows, K]; q [ceil(N/8), ceil(K/32) * 8, 32] int8; scale [ceil(N/8), K/G, 8] float16 -> y [rows, N] float32.
static torch::Tensor int8_apply(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale, int64_t G,
                                int64_t N) {
  const int64_t K = x.dim() == 2 ? x.size(1) : 0;
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && q.dim() == 3 && q.size(0) == (N + kCols - 1) / kCols &&
                  q.size(1) == (K + kBlock - 1) / kBlock * 8 && q.size(2) == 32,
              "int8: q must be contiguous int8 [ceil(out/8), ceil(in/32) * 8, 32] for x's in_features");
  TORCH_CHECK(G > 0 && K % G == 0 && (G % kBlock == 0 || G == K),
              "int8: the group size must be a multiple of 32 dividing in_features, or in_features");
  check_scales(scale, N, K / G, "int8: scale");
  return run(x, N, Int8W{q.data_ptr<int8_t>(), scale.data_ptr<at::Half>(), K, G});
}

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor min, int64_t G, int64_t N) {
  // No Python object is touched below: other Python threads (the server's HTTP loop) run
  // while the kernel does, instead of waiting for the GIL until it returns.
  pybind11::gil_scoped_release no_gil;
  return int4_apply(x, q, scale, min, G, N);
}

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, int64_t G, int64_t N) {
  pybind11::gil_scoped_release no_gil;  // as int4_linear
  return int8_apply(x, q, scale, G, N);
}

std::string isa() {
#if defined(TM_VNNI)
  return "avx2+fma+f16c+avx512vnni";
#elif defined(TM_AVX2)
  return "avx2+fma+f16c";
#else
  return "scalar";
#endif
}
"""


PREFIX, FUNCTIONS, CFLAGS = "tokenmill_qlinear", ["int4_linear", "int8_linear", "isa"], ["-O3", "-fopenmp", "-ffp-contract=off"]


@functools.cache
def kernel():
    """The compiled module (int4_linear, int8_linear, isa), or None where it cannot be built."""
    try:
        module = build(PREFIX, _SOURCE, FUNCTIONS, CFLAGS)
    except Exception as e:  # no compiler, no ninja, no headers: quant.py dequantizes in torch
        log.warning("quantized linear kernel unavailable, dequantizing in torch: %s",
                    str(e).splitlines()[0] if str(e) else e)
        return None
    log.info("quantized linear kernel: %s", module.isa())
    return module
