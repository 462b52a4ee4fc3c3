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
#include <vector>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define TM_AVX2 1
#endif

// Output columns dequantized together: 32 where rows reuse the tile, 4 (an L1-sized buffer)
// for fewer than 4 rows. The tile only groups whole columns, so it changes no column's arithmetic.
static constexpr int64_t kTileCols = 32, kFewRowsTileCols = 4, kFewRows = 4;

static inline float half_to_float(at::Half h) {
#ifdef __F16C__
  return _cvtsh_ss(h.x);  // one instruction; c10's conversion is a dozen, per 32 weights
#else
  return static_cast<float>(h);
#endif
}

// --- 8-lane float vector: AVX2 or a plain array with the same lane semantics ---
#ifdef TM_AVX2
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

// y[r, n] for rows r0..r0+R and columns c0..c0+C of a tile: R x C output elements, each with
// its own lane accumulator; a wider block only shares the loads.
template <int R, int C>
static inline void block(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy) {
  V8 acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) acc[i][j] = v_zero();
  const int64_t k8 = K - K % 8;
  for (int64_t k = 0; k < k8; k += 8) {
    V8 wv[C];
    for (int j = 0; j < C; ++j) wv[j] = v_load(w + j * K + k);
    for (int i = 0; i < R; ++i) {
      V8 xv = v_load(x + i * ldx + k);
      for (int j = 0; j < C; ++j) acc[i][j] = v_fma(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) y[i * ldy + j] = finish(acc[i][j], x + i * ldx, w + j * K, k8, K);
}

// All rows of x against `cols` dequantized columns w[cols, K] (row-major), into y[:, c0:c0+cols].
// 4 rows x 3 columns: 12 accumulators and 3 weight vectors fit AVX2's 16 registers (x is a
// memory operand of the fused multiply-add); 4 x 4 would spill. Where AVX-512VL gives the same
// 8-lane instructions 32 registers, 8 rows x 3 columns (24 accumulators) load each weight
// vector for twice the rows. A block's shape only shares loads: no element's arithmetic changes.
static void tile_matmul(const float* x, int64_t rows, int64_t K, const float* w, int64_t cols, float* y, int64_t N) {
  int64_t r = 0;
#ifdef __AVX512VL__
  for (; r + 8 <= rows; r += 8) {
    int64_t c = 0;
    for (; c + 3 <= cols; c += 3) block<8, 3>(x + r * K, K, w + c * K, K, y + r * N + c, N);
    for (; c < cols; ++c) block<8, 1>(x + r * K, K, w + c * K, K, y + r * N + c, N);
  }
#endif
  for (; r + 4 <= rows; r += 4) {
    int64_t c = 0;
    for (; c + 3 <= cols; c += 3) block<4, 3>(x + r * K, K, w + c * K, K, y + r * N + c, N);
    for (; c < cols; ++c) block<4, 1>(x + r * K, K, w + c * K, K, y + r * N + c, N);
  }
  for (; r < rows; ++r) {
    int64_t c = 0;
    for (; c + 4 <= cols; c += 4) block<1, 4>(x + r * K, K, w + c * K, K, y + r * N + c, N);
    for (; c < cols; ++c) block<1, 1>(x + r * K, K, w + c * K, K, y + r * N + c, N);
  }
}

// --- dequantization of one output column (K inputs) into float ---

// int4: 32-blocks of 16 bytes, byte j = input j (low nibble) | input j+16 (high nibble);
// w = q * scale + min, scale and min per group of G inputs (G a multiple of 32); m == nullptr:
// GGUF Q4_0's symmetric form, min = -8 * scale (exact), so the file's 18 bytes per 32 suffice.
#ifdef TM_AVX2
// The 32 weights of one int4 block as 4 vectors of 8 in k order, w = q * d + mn (one fused
// multiply-add each). The tile path stores them, the few-rows path uses them in registers: one
// function, so both compute the very same values.
static inline void int4_block_avx2(const uint8_t* qb, float d, float mn, V8 w[4]) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(mn);
  w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), dv, mv);
  w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), dv, mv);
  w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), dv, mv);
  w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), dv, mv);
}

// 8 int8 weights, w = q * d (as the int4 block above, shared by both paths).
static inline V8 int8_8_avx2(const int8_t* q, __m256 dv) {
  const __m256i qi = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(qi), dv);
}
#endif

static inline void dequant_int4_col(const uint8_t* q, const at::Half* s, const at::Half* m, int64_t K, int64_t G,
                                    float* w) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const int64_t g = (b * 32) / G;
    const float d = half_to_float(s[g]), mn = m ? half_to_float(m[g]) : -8.f * d;
    const uint8_t* qb = q + b * 16;
    float* wb = w + b * 32;
#ifdef TM_AVX2
    V8 v[4];
    int4_block_avx2(qb, d, mn, v);
    for (int u = 0; u < 4; ++u) _mm256_storeu_ps(wb + 8 * u, v[u]);
#else
    for (int j = 0; j < 16; ++j) {
      wb[j] = std::fma(static_cast<float>(qb[j] & 0x0F), d, mn);
      wb[j + 16] = std::fma(static_cast<float>(qb[j] >> 4), d, mn);
    }
#endif
  }
}

// int8: w = q * scale, scale per group of G inputs (any G dividing K).
static inline void dequant_int8_col(const int8_t* q, const at::Half* s, int64_t K, int64_t G, float* w) {
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    const float d = half_to_float(s[g0 / G]);
    int64_t k = g0;
#ifdef TM_AVX2
    const __m256 dv = _mm256_set1_ps(d);
    for (; k + 8 <= g0 + G; k += 8) _mm256_storeu_ps(w + k, int8_8_avx2(q + k, dv));
#endif
    for (; k < g0 + G; ++k) w[k] = static_cast<float>(q[k]) * d;
  }
}

template <typename Dequant>
static torch::Tensor run(const torch::Tensor& x, int64_t N, int64_t K, Dequant dequant) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [rows, in_features]");
  const torch::Tensor xf = x.to(torch::kFloat).contiguous();
  const int64_t rows = xf.size(0);
  torch::Tensor y = torch::empty({rows, N}, xf.options());
  if (rows == 0) return y;
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t tile_cols = rows < kFewRows ? kFewRowsTileCols : kTileCols;
  const int64_t tiles = (N + tile_cols - 1) / tile_cols;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(tile_cols * K);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = t * tile_cols, cols = std::min(tile_cols, N - c0);
      for (int64_t c = 0; c < cols; ++c) dequant(c0 + c, buf.data() + c * K);
      tile_matmul(xp, rows, K, buf.data(), cols, yp + c0, N);
    }
  });
  return y;
}

#ifdef TM_AVX2
// Fewer than kFewRows rows: nothing reuses a dequantized tile, so each 8 weights are dequantized
// in registers, by the function dequant_*_col uses, and multiplied at once: the same
// operations in the same order as tile_matmul over the tile, so the same bits, without the
// tile's store and reload. C columns at a time give R * C independent accumulator chains (a
// fused multiply-add waits on the one before it in its own chain only).
struct Int4Cols {
  const uint8_t* q; const at::Half* s; const at::Half* m; int64_t K, G;
  // The 32 weights of block b of column n, as 4 vectors of 8 in k order.
  inline void block(int64_t n, int64_t b, V8 w[4]) const {
    const int64_t groups = K / G, g = (b * 32) / G;
    const float d = half_to_float(s[n * groups + g]), mn = m ? half_to_float(m[n * groups + g]) : -8.f * d;
    int4_block_avx2(q + n * (K / 2) + b * 16, d, mn, w);
  }
};
struct Int8Cols {
  const int8_t* q; const at::Half* s; int64_t K, G;  // G a multiple of 32 here
  inline void block(int64_t n, int64_t b, V8 w[4]) const {
    const int64_t groups = K / G;
    const __m256 dv = _mm256_set1_ps(half_to_float(s[n * groups + (b * 32) / G]));
    for (int j = 0; j < 4; ++j) w[j] = int8_8_avx2(q + n * K + b * 32 + j * 8, dv);
  }
};

template <int R, int C, typename Cols>
static inline void few_rows_block(const float* x, const Cols& cols, int64_t n0, float* y, int64_t N) {
  const int64_t K = cols.K;
  V8 acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) acc[i][j] = v_zero();
  for (int64_t b = 0; b < K / 32; ++b) {
    for (int j = 0; j < C; ++j) {
      V8 w[4];
      cols.block(n0 + j, b, w);
      for (int i = 0; i < R; ++i)
        for (int u = 0; u < 4; ++u) acc[i][j] = v_fma(v_load(x + i * K + b * 32 + u * 8), w[u], acc[i][j]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) y[i * N + n0 + j] = v_sum(acc[i][j]);  // K % 32 == 0: no k tail
}

template <int R, typename Cols>
static void few_rows_cols(const float* x, const Cols& cols, int64_t c0, int64_t c1, float* y, int64_t N) {
  constexpr int C = R == 1 ? 8 : (R == 2 ? 4 : 3);
  int64_t n = c0;
  for (; n + C <= c1; n += C) few_rows_block<R, C>(x, cols, n, y, N);
  for (; n < c1; ++n) few_rows_block<R, 1>(x, cols, n, y, N);
}

template <typename Cols>
static torch::Tensor run_few_rows(const torch::Tensor& x, int64_t N, const Cols& cols) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == cols.K, "x must be [rows, in_features]");
  const torch::Tensor xf = x.to(torch::kFloat).contiguous();
  const int64_t rows = xf.size(0);
  torch::Tensor y = torch::empty({rows, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Column ranges in multiples of 24 (divisible by every C above) so each thread runs whole blocks.
  const int64_t unit = 24, units = (N + unit - 1) / unit;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    const int64_t c0 = begin * unit, c1 = std::min(N, end * unit);
    if (rows == 1) few_rows_cols<1>(xp, cols, c0, c1, yp, N);
    else if (rows == 2) few_rows_cols<2>(xp, cols, c0, c1, yp, N);
    else few_rows_cols<3>(xp, cols, c0, c1, yp, N);
  });
  return y;
}
#endif

// x [rows, K] float-like; q [N, K/2] uint8; scale, min [N, K/G] float16 (min empty: Q4_0's
// symmetric form) -> y [rows, N] float32.
// The work without the GIL handling: cpu_decoder.py calls it with the GIL already released.
static torch::Tensor int4_apply(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                                const torch::Tensor& min, int64_t G) {
  const int64_t N = q.size(0), K = q.size(1) * 2;
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous(), "int4: q must be contiguous uint8 [out, in/2]");
  TORCH_CHECK(G > 0 && G % 32 == 0 && K % G == 0, "int4: the group size must be a multiple of 32 dividing in_features");
  const bool symmetric = min.numel() == 0;
  TORCH_CHECK(scale.scalar_type() == at::kHalf && min.scalar_type() == at::kHalf && scale.is_contiguous() &&
                  min.is_contiguous() && scale.size(0) == N && scale.size(1) == K / G &&
                  (symmetric || min.sizes() == scale.sizes()),
              "int4: scale and min must be contiguous float16 [out, in/group]");
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* mp = symmetric ? nullptr : min.data_ptr<at::Half>();
  const int64_t groups = K / G;
#ifdef TM_AVX2
  if (x.dim() == 2 && x.size(0) > 0 && x.size(0) < kFewRows) return run_few_rows(x, N, Int4Cols{qp, sp, mp, K, G});
#endif
  return run(x, N, K, [=](int64_t n, float* w) {
    dequant_int4_col(qp + n * (K / 2), sp + n * groups, mp ? mp + n * groups : nullptr, K, G, w);
  });
}

// x [rows, K]; q [N, K] int8; scale [N, K/G] float16 -> y [rows, N] float32.
static torch::Tensor int8_apply(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale, int64_t G) {
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous(), "int8: q must be contiguous int8 [out, in]");
  TORCH_CHECK(G > 0 && K % G == 0, "int8: the group size must divide in_features");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.size(0) == N && scale.size(1) == K / G,
              "int8: scale must be contiguous float16 [out, in/group]");
  const int8_t* qp = q.data_ptr<int8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const int64_t groups = K / G;
#ifdef TM_AVX2
  if (x.dim() == 2 && x.size(0) > 0 && x.size(0) < kFewRows && G % 32 == 0) return run_few_rows(x, N, Int8Cols{qp, sp, K, G});
#endif
  return run(x, N, K, [=](int64_t n, float* w) { dequant_int8_col(qp + n * K, sp + n * groups, K, G, w); });
}

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor min, int64_t G) {
  // No Python object is touched below: other Python threads (the server's HTTP loop) run
  // while the kernel does, instead of waiting for the GIL until it returns.
  pybind11::gil_scoped_release no_gil;
  return int4_apply(x, q, scale, min, G);
}

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, int64_t G) {
  pybind11::gil_scoped_release no_gil;  // as int4_linear
  return int8_apply(x, q, scale, G);
}

std::string isa() {
#ifdef TM_AVX2
  std::string s = "avx2+fma";
#else
  std::string s = "scalar";
#endif
#ifdef __F16C__
  s += "+f16c";
#endif
  return s;
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
