"""tokenmill's own CPU kernels for weight-only quantized linears, y = x @ W.T, in C++: int4 with a
scale and a minimum per group of 32k inputs (GGUF Q4_0/Q4_1, int4 quantized on load, GPTQ/AWQ
group int4) and int8 with a scale per group (GGUF Q8_0, per-row int8).

Integer arithmetic, as llama.cpp's: each row's activations are rounded per block of 32 inputs
to int8, twice (x ~ q * d + q2 * d2, the second pass rounding what the first left on the fixed
finer grid d2 = d / 256, so the activations the kernel runs are within about amax / 65024 of x:
SmolLM2's perplexity moves by thousandths of a percent, where one pass, llama.cpp's, moved it
+0.3-0.6% and flipped greedy answers). The weights' products with both passes are exact int32
sums (AVX-512 VNNI's dpbusd where the CPU lists it, AVX2's maddubs + madd else, plain loops
without AVX2: the same integers); as d2 is d / 256 they combine in integers, I = 256 * i + i2,
and per block y += float(I) * (scale * d2), and for int4 + min * (the block's sum of x). The
integer work is a quarter of the float work it replaced, which dequantized every weight to
float first: a decode step's four linears x 30 layers went from 10.4 to 3.5 ms and
the LM head's row from 2.4 to 0.66 ms (AMD EPYC, 2 threads, benchmarks/decode_parts.py).

Weights stay packed, made once at load, the size of the GGUF data, in column groups of 8 output
columns: 32 bytes hold 4 consecutive inputs of each of the 8 columns (lane j = column j), so one
load and one 4-byte broadcast of x give the 8 columns' products for those inputs, with no
horizontal sums (quant.py's int4_kernel_layout / int8_kernel_layout). Scales and minimums are
float16 in the same column groups. No float copy of a weight exists.

Batch-invariant by construction: a row's activations are rounded from that row alone, its
integer sums are exact, and the float steps of y[r, n] run in block order in column n's lane,
whatever the row count, the thread split or the column's group. Built with -ffp-contract=off
so the compiler does not fuse differently in different copies of the loop.

Built with torch.utils.cpp_extension (g++ and ninja) at install time or else at first use, and
imported from cpp_build's kernel cache on later starts, under a name keyed by the source and
the CPU's flags. Instruction sets are named
explicitly from /proc/cpuinfo (AVX2+FMA+F16C, AVX-512 F/BW/VL/VNNI where listed), never
-march=native: a VM may show AMX flags without the OS enabling it. AMX-INT8, where listed, is
compiled only into functions of their own target and run (from 9 rows) only where the OS grants
the process the tile state; its tile multiply gives the many-row path the same exact integer
sums, so the same bits (1.4-1.8x faster linears at 16-256 rows on an Intel Xeon). Where the
build fails `kernel()` returns None and the linears fall back to torch: the same activation
rounding, then a float matmul over the dequantized weights (quant.py).
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
#include <memory>
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
// TM_AMX_LISTED: the CPU lists AMX-INT8 (cpp_build). Its code is compiled in target-attributed
// functions only, and run only where the OS grants the tile state (amx_granted).
#if defined(TM_VNNI) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(TM_AMX_LISTED)
#define TM_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

// Activation blocks of 32 inputs; output columns in groups of 8 (one float lane each).
static constexpr int64_t kBlock = 32, kCols = 8;
// From this many rows, a thread runs 4 column groups over a chunk of 16 rows before moving on,
// so a row's int8 activations are read from cache once per 32 columns instead of once per 8.
static constexpr int64_t kManyRows = 4, kRowPassGroups = 4, kRowChunk = 16, kPrefetchRows = 32;

static inline float half_to_float(at::Half h) {
#ifdef __F16C__
  return _cvtsh_ss(h.x);
#else
  return static_cast<float>(h);
#endif
}

// --- activations: two int8 passes per block of 32 ---
// Each block of a row is rounded to int8, x ~ q * d with d = amax / 127 and q =
// round-half-even(x * (127 / amax)), as llama.cpp's Q8 activations; then what that leaves,
// r = x - q * d (|r| <= d / 2), is rounded to q2 * d2 on the fixed grid d2 = d / 256 (q2 =
// round-half-even(r * (256 / d)), clamped to +-127 for the rare r at d / 2). The kernel
// multiplies both by the weights (unpacked once for the two), so the activations it runs are
// q * d + q2 * d2, within about amax / 65024 of x instead of amax / 254: one pass moved
// SmolLM2's logits by up to 1.4 and changed its greedy answers. d2 being d / 256 exactly lets
// the two integer sums combine before the float step (rows_group).
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
  for (int64_t k = 0; k < kBlock; ++k) {
    // nearbyint in the default rounding mode: half to even, as _mm256_cvtps_epi32
    q[k] = k < n ? static_cast<int8_t>(std::nearbyint(v[k] * inv)) : 0;
    sum += q[k];
  }
  return sum;
}

// The second pass: q2 = round-half-even(r * (256 / d)) clamped to +-127 (so d2 = d / 256);
// returns the sum of q2. A non-finite block's d is NaN: inv is then 0 and q2 = 0.
static int32_t round_residual(const float* r, int64_t n, float d, int8_t* q2) {
  const float inv = d > 0.f ? 256.f / d : 0.f;
  int32_t sum = 0;
  for (int64_t k = 0; k < kBlock; ++k) {
    const float v = k < n ? std::nearbyint(r[k] * inv) : 0.f;
    q2[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
    sum += q2[k];
  }
  return sum;
}

// A row's activations: per block b, (256 * q[32b..] + q2[32b..]) * d2[b] (d2 = d / 256, the
// only scale rows_group needs); qsum and qsum2 the blocks' integer sums, s[b] the sum of the
// values they stand for (the minimum's term).
struct QRow { const int8_t *q, *q2; const float *d2, *s; const int32_t *qsum, *qsum2; };

// One block, any length up to 32: round_block, then the residual's pass. The path for a row's
// last, partial block, and for every block without AVX2.
static void quantize_block(const float* x, int64_t n, int8_t* q, int8_t* q2, float& d2, float& s, int32_t& qsum,
                           int32_t& qsum2) {
  float d;
  qsum = round_block(x, n, q, d);
  alignas(32) float r[kBlock] = {};
  if (!std::isnan(d))
    for (int64_t k = 0; k < n; ++k) r[k] = x[k] - static_cast<float>(q[k]) * d;
  qsum2 = round_residual(r, n, d, q2);  // a NaN d: r is zero and so is q2
  d2 = d * (1.f / 256.f);  // exact: a power of two
  s = d * static_cast<float>(qsum) + d2 * static_cast<float>(qsum2);
}

#ifdef TM_AVX2
// The 8 vectors' maxima as one vector, lane b the maximum of m[b] (a maximum is exact in any
// order). In registers: the 8 maxima stored one by one and loaded as a vector waited on the
// store queue, half of the rounding's time.
static inline __m256 max_lanes8(const __m256* m) {
  __m256 y[2];
  for (int h = 0; h < 2; ++h) {
    const __m256* v = m + 4 * h;
    const __m256 a = _mm256_max_ps(_mm256_unpacklo_ps(v[0], v[1]), _mm256_unpackhi_ps(v[0], v[1]));
    const __m256 b = _mm256_max_ps(_mm256_unpacklo_ps(v[2], v[3]), _mm256_unpackhi_ps(v[2], v[3]));
    y[h] = _mm256_max_ps(_mm256_shuffle_ps(a, b, 0x44), _mm256_shuffle_ps(a, b, 0xEE));  // per half: v[0..3]
  }
  return _mm256_max_ps(_mm256_permute2f128_ps(y[0], y[1], 0x20), _mm256_permute2f128_ps(y[0], y[1], 0x31));
}
static inline int32_t sum8(__m256i v) {  // integer sums are exact in any order
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
}
// 32 int32 values (each in int8's range) stored in order as int8; returns their sum.
static inline int32_t pack_block(const __m256i* w, int8_t* q) {
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(w[0], w[1]), _mm256_packs_epi32(w[2], w[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  return sum8(_mm256_add_epi32(_mm256_add_epi32(w[0], w[1]), _mm256_add_epi32(w[2], w[3])));
}

// Up to 8 full blocks with quantize_block's arithmetic, in passes over the blocks: one block at
// a time, each block's chain (its maximum, a division, the rounding, the residual's division
// and rounding, the sums moved to integer registers) ran end to end with little to overlap it,
// and the rounding was 8% of a 16-row decode step. Here the maxima come first, the divisions
// for all the blocks are one vector division (IEEE division: the scalar one's bits), and the
// blocks' roundings are independent of each other.
static void quantize_blocks8(const float* x, int64_t nblk, int8_t* q, int8_t* q2, float* d2, float* s, int32_t* qsum,
                             int32_t* qsum2) {
  const __m256 sign = _mm256_set1_ps(-0.f), inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  alignas(32) float inv[8], d[8], inv2[8];
  __m256 m[8];
  int bad = 0;  // blocks holding inf or NaN, one bit each
  for (int64_t b = 0; b < 8; ++b) {
    m[b] = _mm256_setzero_ps();
    if (b >= nblk) continue;
    __m256 nf = _mm256_setzero_ps();
    for (int u = 0; u < 4; ++u) {
      const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + b * kBlock + 8 * u));
      nf = _mm256_or_ps(nf, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));
      m[b] = _mm256_max_ps(m[b], a);
    }
    bad |= (_mm256_movemask_ps(nf) != 0) << b;
  }
  // round_block's inv = amax > 0 ? 127 / amax : 0 and d = amax / 127; round_residual's 256 / d.
  const __m256 zero = _mm256_setzero_ps(), a = max_lanes8(m);
  const __m256 dv = _mm256_div_ps(a, _mm256_set1_ps(127.f));
  _mm256_store_ps(inv, _mm256_and_ps(_mm256_cmp_ps(a, zero, _CMP_GT_OQ), _mm256_div_ps(_mm256_set1_ps(127.f), a)));
  _mm256_store_ps(d, dv);
  _mm256_store_ps(inv2, _mm256_and_ps(_mm256_cmp_ps(dv, zero, _CMP_GT_OQ), _mm256_div_ps(_mm256_set1_ps(256.f), dv)));
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  for (int64_t b = 0; b < nblk; ++b) {
    const float* v = x + b * kBlock;
    if (bad >> b & 1) {  // round_block's non-finite block: q = q2 = 0, d = NaN
      quantize_block(v, kBlock, q + b * kBlock, q2 + b * kBlock, d2[b], s[b], qsum[b], qsum2[b]);
      continue;
    }
    const __m256 iv = _mm256_set1_ps(inv[b]), db = _mm256_set1_ps(d[b]), iv2 = _mm256_set1_ps(inv2[b]);
    __m256i w[4], w2[4];
    for (int u = 0; u < 4; ++u) {
      const __m256 xv = _mm256_loadu_ps(v + 8 * u);
      w[u] = _mm256_cvtps_epi32(_mm256_mul_ps(xv, iv));
      // the residual from q as stored (|x * inv| <= 127: the packing saturates nothing)
      const __m256 r = _mm256_sub_ps(xv, _mm256_mul_ps(_mm256_cvtepi32_ps(w[u]), db));
      w2[u] = _mm256_min_epi32(hi, _mm256_max_epi32(lo, _mm256_cvtps_epi32(_mm256_mul_ps(r, iv2))));
    }
    qsum[b] = pack_block(w, q + b * kBlock);
    qsum2[b] = pack_block(w2, q2 + b * kBlock);
    d2[b] = d[b] * (1.f / 256.f);
    s[b] = d[b] * static_cast<float>(qsum[b]) + d2[b] * static_cast<float>(qsum2[b]);
  }
}
#endif

static void quantize_row(const float* x, int64_t K, int8_t* q, int8_t* q2, float* d2, float* s,
                         int32_t* qsum, int32_t* qsum2) {
  const int64_t nb = (K + kBlock - 1) / kBlock;
  int64_t b = 0;
#ifdef TM_AVX2
  for (const int64_t full = K / kBlock; b < full; b += 8) {
    const int64_t n = std::min<int64_t>(8, full - b);
    quantize_blocks8(x + b * kBlock, n, q + b * kBlock, q2 + b * kBlock, d2 + b, s + b, qsum + b, qsum2 + b);
  }
  b = K / kBlock;
#endif
  for (; b < nb; ++b) {
    const int64_t k0 = b * kBlock;
    quantize_block(x + k0, std::min(kBlock, K - k0), q + k0, q2 + k0, d2[b], s[b], qsum[b], qsum2[b]);
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
  static constexpr bool kHasMin = true, kUnsigned = true;  // kUnsigned: the weights' integers are 0..15
  static constexpr int64_t kBlockBytes = 4 * 32;  // a block of 32 inputs of a group's 8 columns
  inline const uint8_t* group(int64_t c) const { return q + c * (K / 8) * 32; }
  inline int32_t dot_scalar(int64_t c, int64_t j, int64_t b, const int8_t* x) const {
    const uint8_t* p = group(c) + b * kBlockBytes;
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
  static constexpr bool kHasMin = false, kUnsigned = false;
  static constexpr int64_t kBlockBytes = 8 * 32;
  inline int64_t padded_k() const { return (K + 31) / 32 * 32; }
  inline const int8_t* group(int64_t c) const { return q + c * padded_k() * 8; }
  inline int32_t dot_scalar(int64_t c, int64_t j, int64_t b, const int8_t* x) const {
    const int8_t* p = group(c) + b * kBlockBytes;
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
// The integer dot products of C column groups (from c0) with block b of R rows, lane j = column
// j of each group, for each row's two passes: each weight vector is loaded and unpacked once for
// all 2R of them, and each broadcast of x serves the C groups (a broadcast per dpbusd left the
// load ports, not the multiply-adds, setting the pace).
struct Dots { __m256i a, b; };
template <int R, int C>
static inline void block_dot(const Int4W& w, int64_t c0, int64_t b, const QRow* x, Dots (*out)[C]) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r][c] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
  for (int t = 0; t < 4; ++t) {
    __m256i lo[C], hi[C];
    for (int c = 0; c < C; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.group(c0 + c) + b * Int4W::kBlockBytes + t * 32));
      lo[c] = _mm256_and_si256(v, mask);
      hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    }
    for (int r = 0; r < R; ++r) {
      const int8_t *x1 = x[r].q + b * kBlock + 8 * t, *x2 = x[r].q2 + b * kBlock + 8 * t;
      const __m256i s1 = bcast4(x1), s1h = bcast4(x1 + 4), s2 = bcast4(x2), s2h = bcast4(x2 + 4);
      for (int c = 0; c < C; ++c) {
        out[r][c].a = dot_add(dot_add(out[r][c].a, lo[c], s1), hi[c], s1h);
        out[r][c].b = dot_add(dot_add(out[r][c].b, lo[c], s2), hi[c], s2h);
      }
    }
  }
}
template <int R, int C>
static inline void block_dot(const Int8W& w, int64_t c0, int64_t b, const QRow* x, Dots (*out)[C]) {
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r][c] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
#ifdef TM_VNNI
  // (w + 128) is unsigned: sum((w + 128) * x) - 128 * sum(x), one instruction per 4 inputs.
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  // Unrolled: rolled, GCC rotated the 16 accumulators through register moves each round, and
  // the LM head at 16-64 rows ran 1.3-1.4x slower.
#pragma GCC unroll 8
  for (int t = 0; t < 8; ++t) {
    __m256i u[C];
    for (int c = 0; c < C; ++c)
      u[c] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.group(c0 + c) + b * Int8W::kBlockBytes + t * 32)), flip);
    for (int r = 0; r < R; ++r) {
      const __m256i s1 = bcast4(x[r].q + b * kBlock + 4 * t), s2 = bcast4(x[r].q2 + b * kBlock + 4 * t);
      for (int c = 0; c < C; ++c) {
        out[r][c].a = _mm256_dpbusd_epi32(out[r][c].a, u[c], s1);
        out[r][c].b = _mm256_dpbusd_epi32(out[r][c].b, u[c], s2);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m256i f1 = _mm256_set1_epi32(128 * x[r].qsum[b]), f2 = _mm256_set1_epi32(128 * x[r].qsum2[b]);
    for (int c = 0; c < C; ++c) {
      out[r][c].a = _mm256_sub_epi32(out[r][c].a, f1);
      out[r][c].b = _mm256_sub_epi32(out[r][c].b, f2);
    }
  }
#else
  for (int t = 0; t < 8; ++t) {
    for (int c = 0; c < C; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.group(c0 + c) + b * Int8W::kBlockBytes + t * 32));
      const __m256i u = _mm256_abs_epi8(v);
      for (int r = 0; r < R; ++r) {
        out[r][c].a = dot_add(out[r][c].a, u, _mm256_sign_epi8(bcast4(x[r].q + b * kBlock + 4 * t), v));
        out[r][c].b = dot_add(out[r][c].b, u, _mm256_sign_epi8(bcast4(x[r].q2 + b * kBlock + 4 * t), v));
      }
    }
  }
#endif
}
#endif

// y[r][n] for the 8 columns of each of the C column groups from c0 (n = 8c + j; j >= `valid`
// are padding, not stored) of R rows. Per row and block b: the exact integer dot products i and
// i2 of each column's weights and the row's two int8 passes, combined as I = 256 * i + i2 (d2 =
// d / 256), then acc = fma(float(I), scale * d2_b, acc); for int4 also macc = fma(min, s_b, macc),
// in the same loop or a second one over the blocks (kMinInLoop); y = acc + macc. float(I) is exact for int4 weights (|I| <
// 2^24) and rounds once for int8 ones. Each column's arithmetic is this sequence whatever R, C,
// the rows beside it, the thread split or the column's group: the integers are exact and the
// float steps run per lane in block order. R and C only share loads between rows and groups.
// (One float step per block instead of two: the second conversion, multiply and fma competed
// with dpbusd for the vector pipes.)
#ifdef TM_AVX2
// The scale, and the minimum, of block b's group for the 8 columns of group gc (Q4_0's
// symmetric form: min = -8 * scale).
static inline __m256 half8(const at::Half* h) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h))); }
template <typename W>
static inline int64_t group_index(const W& w, int64_t gc, int64_t b) {
  return (gc * (w.K / w.G) + (b * kBlock) / w.G) * kCols;
}
template <typename W>
static inline __m256 group_scale(const W& w, int64_t gc, int64_t b) { return half8(w.scale + group_index(w, gc, b)); }
template <typename W>
static inline __m256 group_min(const W& w, int64_t gc, int64_t b) {
  return w.min ? half8(w.min + group_index(w, gc, b)) : _mm256_mul_ps(group_scale(w, gc, b), _mm256_set1_ps(-8.f));
}
#endif

// The one- to three-row path reads its weights once, from memory, a column group after the
// next: ask for them kStreamAhead bytes before the block being read, every line of the values,
// and the scales' and minimums' lines the same distance ahead in inputs. The hardware's own
// prefetch left the cores computing and waiting by turns (the decoder's linears at 55-85% of
// the rate a plain read of the same bytes gets); with this the one- and two-row decoder steps ran
// 1.07-1.08x faster, paired (benchmarks/kernel_ab.py decoder). 1 KB ahead gained nothing, 8 KB
// less than 2-4 KB, and the values' lines alone less than with the scales'. Past a thread's last
// group the lines are the next one's, or beyond the buffer: a prefetch never faults.
static constexpr int64_t kStreamAhead = 4096;
// scale_ahead: the bytes of scales (and of minimums) as far ahead as kStreamAhead is in values.
// always_inline: out of line, GCC saw a function of prefetches alone as one without effects and
// deleted its calls (the one-row loop had no prefetch left, and no gain).
template <typename W>
__attribute__((always_inline)) static inline void stream_ahead(const W& w, int64_t c, int64_t b, int64_t scale_ahead) {
  const char* v = reinterpret_cast<const char*>(w.group(c)) + b * W::kBlockBytes + kStreamAhead;
  __builtin_prefetch(v, 0, 2);
  __builtin_prefetch(v + 64, 0, 2);
  if constexpr (W::kBlockBytes == 256) {
    __builtin_prefetch(v + 128, 0, 2);
    __builtin_prefetch(v + 192, 0, 2);
  }
  if (b % 4 == 0) {  // 16 bytes a group of 32 inputs: a line every 4 blocks at G = 32
    const int64_t i = (c * (w.K / w.G) + (b * kBlock) / w.G) * kCols;
    __builtin_prefetch(reinterpret_cast<const char*>(w.scale + i) + scale_ahead, 0, 2);
    if constexpr (W::kHasMin)
      if (w.min) __builtin_prefetch(reinterpret_cast<const char*>(w.min + i) + scale_ahead, 0, 2);
  }
}

// kStream: the one- to three-row path's (stream_ahead).
template <int R, int C, typename W, bool kStream = false>
static inline void rows_group(const W& w, int64_t c0, int64_t N, const QRow* x, float* const* y, bool add) {
  const int64_t nb = (w.K + kBlock - 1) / kBlock, groups = w.K / w.G;
#ifdef TM_AVX2
  // The minimum's term rides in the block loop while its accumulators fit beside the integer
  // ones (a row or two: a second loop cost them 10-15%), and runs in its own loop after it else.
  constexpr bool kMinInLoop = W::kHasMin && R * C <= 2, kMinAfter = W::kHasMin && !kMinInLoop;
  __m256 acc[R][C], macc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = macc[r][c] = _mm256_setzero_ps();
  const int64_t scale_ahead = kStream ? kStreamAhead / W::kBlockBytes * 2 * kCols / std::max<int64_t>(1, w.G / kBlock) : 0;
  for (int64_t b = 0; b < nb; ++b) {
    if constexpr (kStream) stream_ahead(w, c0, b, scale_ahead);
    Dots i[R][C];
    block_dot<R, C>(w, c0, b, x, i);
    const int64_t g = (b * kBlock) / w.G;
    for (int c = 0; c < C; ++c) {
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.scale + ((c0 + c) * groups + g) * kCols)));
      for (int r = 0; r < R; ++r) {
        const __m256i both = _mm256_add_epi32(_mm256_slli_epi32(i[r][c].a, 8), i[r][c].b);  // 256 * i + i2
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(both), _mm256_mul_ps(d, _mm256_set1_ps(x[r].d2[b])), acc[r][c]);
      }
      if constexpr (kMinInLoop) {
        const __m256 m = group_min(w, c0 + c, b);
        for (int r = 0; r < R; ++r) macc[r][c] = _mm256_fmadd_ps(m, _mm256_set1_ps(x[r].s[b]), macc[r][c]);
      }
    }
  }
  if constexpr (kMinAfter)  // blocks outermost: R * C independent chains of fmas, not C of R
    for (int64_t b = 0; b < nb; ++b)
      for (int c = 0; c < C; ++c) {
        const __m256 m = group_min(w, c0 + c, b);
        for (int r = 0; r < R; ++r) macc[r][c] = _mm256_fmadd_ps(m, _mm256_set1_ps(x[r].s[b]), macc[r][c]);
      }
  for (int c = 0; c < C; ++c) {
    const int64_t gc = c0 + c, valid = std::min(kCols, N - gc * kCols);
    for (int r = 0; r < R; ++r) {
      const __m256 sum = _mm256_add_ps(acc[r][c], macc[r][c]);
      if (valid == kCols) {  // the 8 floats straight out (through a buffer, GCC called memmove for them)
        float* out = y[r] + gc * kCols;
        _mm256_storeu_ps(out, add ? _mm256_add_ps(_mm256_loadu_ps(out), sum) : sum);  // add: y + sum, as torch's add_
        continue;
      }
      alignas(32) float out[kCols];
      _mm256_store_ps(out, sum);
      for (int64_t j = 0; j < valid; ++j) y[r][gc * kCols + j] = add ? y[r][gc * kCols + j] + out[j] : out[j];
    }
  }
#else
  for (int c = 0; c < C; ++c) {
    const int64_t gc = c0 + c, valid = std::min(kCols, N - gc * kCols);
    const at::Half* sc = w.scale + gc * groups * kCols;
    const at::Half* mn = nullptr;
    if constexpr (W::kHasMin) mn = w.min ? w.min + gc * groups * kCols : nullptr;
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < valid; ++j) {
        float acc = 0.f, macc = 0.f;
        for (int64_t b = 0; b < nb; ++b) {
          const int32_t i = w.dot_scalar(gc, j, b, x[r].q + b * kBlock), i2 = w.dot_scalar(gc, j, b, x[r].q2 + b * kBlock);
          const int64_t g = (b * kBlock) / w.G;
          const float d = half_to_float(sc[g * kCols + j]);
          acc = std::fma(static_cast<float>(i * 256 + i2), d * x[r].d2[b], acc);
          if constexpr (W::kHasMin) macc = std::fma(mn ? half_to_float(mn[g * kCols + j]) : d * -8.f, x[r].s[b], macc);
        }
        y[r][gc * kCols + j] = add ? y[r][gc * kCols + j] + (acc + macc) : acc + macc;
      }
  }
#endif
}

// Rows sharing each weight load, and column groups sharing each broadcast of x: 4 rows and 2
// groups where AVX-512VL's 32 vector registers hold their 16 integer and 8 float accumulators,
// else 2 rows and 1 group (AVX2's 16 registers).
#ifdef __AVX512VL__
static constexpr int kRowBlock = 4, kColBlock = 2;
#else
static constexpr int kRowBlock = 2, kColBlock = 1;
#endif

// The next tile's weights asked of memory (towards L2, prefetcht1 on x86) a share before each
// row block of this tile. Asked all at once at the tile's start, the prefetches wait for the
// core's few miss buffers, and the tile's first row block with them.
struct Prefetch {
  const char* p = nullptr;
  const char* e = nullptr;
  int64_t lines = 0;  // per row block
  inline void some() {
    for (int64_t i = 0; i < lines && p < e; ++i, p += 64) __builtin_prefetch(p, 0, 2);
  }
  inline void rest() {
    for (; p < e; p += 64) __builtin_prefetch(p, 0, 2);
  }
};

// Rows [r0, r1) of column groups [c0, c1), kColBlock groups and kRowBlock rows at a time, then
// the rest one by one.
template <int C, bool kStream = false, typename W>
static inline void rows_span_c(const W& w, int64_t c0, int64_t N, const std::vector<QRow>& x, int64_t r0, int64_t r1,
                               float* yp, bool add, Prefetch* pf = nullptr) {
  int64_t r = r0;
  for (; r + kRowBlock <= r1; r += kRowBlock) {
    float* y[kRowBlock];
    for (int i = 0; i < kRowBlock; ++i) y[i] = yp + (r + i) * N;
    if (pf) pf->some();
    rows_group<kRowBlock, C, W, kStream>(w, c0, N, x.data() + r, y, add);
  }
  for (; r < r1; ++r) {
    float* y[1] = {yp + r * N};
    if (pf) pf->some();
    rows_group<1, C, W, kStream>(w, c0, N, x.data() + r, y, add);
  }
}
template <typename W>
static inline void rows_span(const W& w, int64_t c0, int64_t c1, int64_t N, const std::vector<QRow>& x, int64_t r0,
                             int64_t r1, float* yp, bool add, Prefetch* pf = nullptr) {
  int64_t c = c0;
  for (; c + kColBlock <= c1; c += kColBlock) rows_span_c<kColBlock>(w, c, N, x, r0, r1, yp, add, pf);
  for (; c < c1; ++c) rows_span_c<1>(w, c, N, x, r0, r1, yp, add, pf);
}

#ifdef TM_AMX
// --- many rows on AMX ---
// The integer sums of each block, exact int32 as dpbusd's, from AMX's tile multiply: one
// instruction takes 16 rows' activations (a tile of 16 x 32 int8) times 16 columns' weights
// (8 x 64 bytes: 4 inputs of each column a row, the column groups' own layout, int4's nibbles
// split), for the two passes in turn. The float steps after it are rows_group's, per lane in block order,
// on the same integers: the same bits as the VNNI path, so a row's outputs still do not depend
// on its batch or on which path ran it.

// Linux hands a process AMX's 8 KB of tile state only on request (ARCH_REQ_XCOMP_PERM for
// XTILEDATA); where the OS has not enabled AMX, though the CPU lists it, the request fails and
// the VNNI path runs. Asked once per process; the grant holds for every thread.
static bool amx_granted() {
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  static const bool ok = syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  return ok;
}

// A tile: 16 rows by 4 column groups, as two halves of 16 columns (2 groups) each. From
// kAmxMinRows rows: with fewer, the tiles' padding rows cost more than AMX saves (8 rows ran as
// fast as the VNNI path, 5 rows 0.7-0.8x, 12 rows 1.2-1.4x).
static constexpr int64_t kAmxRows = 16, kAmxGroups = 4, kAmxMinRows = 9;

// The tile shapes, palette 1: tmm0/1 the rows' two passes of a block (16 x 32 bytes), tmm2/3 the
// block's weights for each half (8 x 64), tmm4..7 the sums (16 x 16 int32): pass 1 and 2 of half
// 0, then of half 1.
struct alignas(64) AmxConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {32, 32, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 8, 8, 16, 16, 16, 16};
};

// Blocks [b0, b1) of column groups [c0, c0 + here) of W as B tiles: block b's tile for half h
// at out + (2 (b - b0) + h) * 512, its row k holding inputs 32b + 4k .. 32b + 4k + 3 of the
// half's 16 columns (4 bytes each, group 2h + g's columns at bytes 32g..). Groups past `here`
// are zeros.
static inline void amx_weights(const Int4W& w, int64_t c0, int64_t here, int64_t b0, int64_t b1, uint8_t* out) {
  const __m256i mask = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t g = 0; g < kAmxGroups; ++g)
      for (int t = 0; t < 4; ++t) {
        // quad t: the low nibbles are inputs 8t..8t+3 (row 2t), the high ones 8t+4..8t+7
        uint8_t* o = out + (2 * (b - b0) + g / 2) * 512 + 2 * t * 64 + 32 * (g % 2);
        const __m256i v = g < here ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.group(c0 + g) + b * Int4W::kBlockBytes + t * 32))
                                   : zero;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_and_si256(v, mask));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 64), _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
      }
}
static inline void amx_weights(const Int8W& w, int64_t c0, int64_t here, int64_t b0, int64_t b1, uint8_t* out) {
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t g = 0; g < kAmxGroups; ++g)
      for (int t = 0; t < 8; ++t) {
        uint8_t* o = out + (2 * (b - b0) + g / 2) * 512 + t * 64 + 32 * (g % 2);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o),
                            g < here ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.group(c0 + g) + b * Int8W::kBlockBytes + t * 32))
                                     : _mm256_setzero_si256());
      }
}

// group8(c) and group8(c + 1) (zeros where `second` is false: c + 1 is past the tile's groups)
// as one vector of 16 lanes, a half tile's columns.
template <typename F>
static inline __m512 pair16(F group8, int64_t c, bool second) {
  const __m256 lo = group8(c), hi = second ? group8(c + 1) : _mm256_setzero_ps();
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
}

// Block b's float step (rows_group's acc line) for the tile's `n` rows: sums holds the block's
// int32 sums, [pass 1 half 0, pass 2 half 0, pass 1 half 1, pass 2 half 1] of 16 x 16 each;
// acc [16 rows][32 columns] stays in L1 across the blocks.
template <typename W>
static inline void amx_block_step(const W& w, int64_t c0, int64_t here, int64_t b, const QRow* x, int64_t n,
                                  const int32_t* sums, float* acc) {
  const auto scale = [&](int64_t c) { return group_scale(w, c, b); };
  __m512 d[2];
  for (int h = 0; h < 2; ++h) d[h] = 2 * h < here ? pair16(scale, c0 + 2 * h, 2 * h + 1 < here) : _mm512_setzero_ps();
  for (int64_t r = 0; r < n; ++r) {
    const __m512 d2 = _mm512_set1_ps(x[r].d2[b]);
    for (int h = 0; h < 2; ++h) {
      const int32_t* s = sums + h * 512 + 16 * r;
      const __m512i both = _mm512_add_epi32(_mm512_slli_epi32(_mm512_loadu_si512(s), 8), _mm512_loadu_si512(s + 256));  // 256 * i + i2
      float* a = acc + r * 32 + 16 * h;
      _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_cvtepi32_ps(both), _mm512_mul_ps(d[h], d2), _mm512_loadu_ps(a)));
    }
  }
}

// The minimum's term of R rows (rows_group's macc, per lane in block order), added to their acc
// rows, then the sums out to y.
template <int R, typename W>
static inline void amx_rows_out(const W& w, int64_t c0, int64_t here, int64_t N, const QRow* x, const float* acc,
                                float* const* y, bool add) {
  const int64_t nb = (w.K + kBlock - 1) / kBlock;
  __m512 macc[R][2];
  for (int r = 0; r < R; ++r) macc[r][0] = macc[r][1] = _mm512_setzero_ps();
  if constexpr (W::kHasMin)
    for (int64_t b = 0; b < nb; ++b) {
      const auto minimum = [&](int64_t c) { return group_min(w, c, b); };
      for (int h = 0; h < 2; ++h) {
        if (2 * h >= here) continue;
        const __m512 m = pair16(minimum, c0 + 2 * h, 2 * h + 1 < here);
        for (int r = 0; r < R; ++r) macc[r][h] = _mm512_fmadd_ps(m, _mm512_set1_ps(x[r].s[b]), macc[r][h]);
      }
    }
  for (int r = 0; r < R; ++r) {
    alignas(64) float out[4 * kCols];
    for (int h = 0; h < 2; ++h) _mm512_store_ps(out + 16 * h, _mm512_add_ps(_mm512_loadu_ps(acc + r * 32 + 16 * h), macc[r][h]));
    for (int64_t g = 0; g < here; ++g) {
      const int64_t gc = c0 + g, valid = std::min(kCols, N - gc * kCols);
      float* o = y[r] + gc * kCols;
      if (valid == kCols) {
        const __m256 v = _mm256_load_ps(out + kCols * g);
        _mm256_storeu_ps(o, add ? _mm256_add_ps(_mm256_loadu_ps(o), v) : v);
        continue;
      }
      for (int64_t j = 0; j < valid; ++j) o[j] = add ? o[j] + out[kCols * g + j] : out[kCols * g + j];
    }
  }
}

// Tiles [t0, t1) (kAmxGroups column groups each) through every row, 16 rows at a time. Block b's
// tile multiplies go out before block b - 1's float step, which reads their sums from the other
// of two buffers: the float work then runs while the tile unit does, instead of waiting on it.
// The rows' int8 buffers hold whole tiles of 16 rows (run_into pads them; the padding rows'
// sums are never read).
template <typename W>
__attribute__((target("amx-tile,amx-int8"))) static void amx_span(const W& w, int64_t N, const std::vector<QRow>& x,
                                                                   int64_t rows, int64_t t0, int64_t t1, float* yp, bool add) {
  const int64_t nb = (w.K + kBlock - 1) / kBlock, col_groups = (N + kCols - 1) / kCols, stride = nb * kBlock;
  const AmxConfig cfg;
  _tile_loadconfig(&cfg);
  // One row chunk: each block's weights unpacked as it comes, into two slots, so the rows' int8
  // stay in L1 (the whole tile's, 18-48 KB, pushed them out: 1.03-1.21x at 9-16 rows); more
  // chunks: once for all of them (unpacked per chunk, 0.83-0.93x).
  const bool jit = rows <= kAmxRows;
  std::unique_ptr<uint8_t[]> wt(new uint8_t[(jit ? 2 : nb) * 1024]);
  alignas(64) int32_t sums[2][4 * 256];
  alignas(64) float acc[kAmxRows * 32];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c0 = t * kAmxGroups, here = std::min(kAmxGroups, col_groups - c0);
    if (!jit) amx_weights(w, c0, here, 0, nb, wt.get());
    // A few rows (as the VNNI path's Prefetch, to kPrefetchRows): the next tile's weights asked
    // of memory a share per block, while this tile's sums are made (decoder at 16 rows 1.04x,
    // the LM head 1.10x; many rows amortize the wait).
    Prefetch pf;
    if (t + 1 < t1 && rows <= kPrefetchRows) {
      pf.p = reinterpret_cast<const char*>(w.group(c0 + kAmxGroups));
      pf.e = reinterpret_cast<const char*>(w.group(std::min(col_groups, c0 + 2 * kAmxGroups)));
      pf.lines = ((pf.e - pf.p) / 64 + nb - 1) / nb;
    }
    for (int64_t r0 = 0; r0 < rows; r0 += kAmxRows) {
      const int64_t n = std::min(kAmxRows, rows - r0);
      const int8_t *q = x[r0].q, *q2 = x[r0].q2;
      std::memset(acc, 0, sizeof(acc));
      if (jit) amx_weights(w, c0, here, 0, 1, wt.get());
      for (int64_t b = 0; b <= nb; ++b) {
        if (b < nb) {
          int32_t* s = sums[b & 1];
          _tile_zero(4);
          _tile_zero(5);
          _tile_zero(6);
          _tile_zero(7);
          _tile_loadd(0, q + b * kBlock, stride);
          _tile_loadd(1, q2 + b * kBlock, stride);
          // jit: the next block's weights unpacked a block ahead, into the other slot: a tile
          // load right after the stores that wrote its bytes waited on them.
          if (jit && b + 1 < nb) amx_weights(w, c0, here, b + 1, b + 2, wt.get() + ((b + 1) & 1) * 1024);
          const uint8_t* wb = jit ? wt.get() + (b & 1) * 1024 : wt.get() + b * 1024;
          _tile_loadd(2, wb, 64);
          _tile_loadd(3, wb + 512, 64);
          if constexpr (W::kUnsigned) {
            _tile_dpbsud(4, 0, 2);
            _tile_dpbsud(5, 1, 2);
            _tile_dpbsud(6, 0, 3);
            _tile_dpbsud(7, 1, 3);
          } else {
            _tile_dpbssd(4, 0, 2);
            _tile_dpbssd(5, 1, 2);
            _tile_dpbssd(6, 0, 3);
            _tile_dpbssd(7, 1, 3);
          }
          _tile_stored(4, s, 64);
          _tile_stored(5, s + 256, 64);
          _tile_stored(6, s + 512, 64);
          _tile_stored(7, s + 768, 64);
          pf.some();
        }
        if (b > 0) amx_block_step(w, c0, here, b - 1, x.data() + r0, n, sums[(b - 1) & 1], acc);
      }
      int64_t r = 0;
      for (; r + 4 <= n; r += 4) {
        float* y[4];
        for (int i = 0; i < 4; ++i) y[i] = yp + (r0 + r + i) * N;
        amx_rows_out<4>(w, c0, here, N, x.data() + r0 + r, acc + r * 32, y, add);
      }
      for (; r < n; ++r) {
        float* y[1] = {yp + (r0 + r) * N};
        amx_rows_out<1>(w, c0, here, N, x.data() + r0 + r, acc + r * 32, y, add);
      }
    }
  }
  _tile_release();
}
#endif

// y [rows, N] = x [rows, K] @ W.T, or with add, y += x @ W.T: each element y + (the product's
// value), the bits of torch's y.add_(product), without the product's buffer or a pass over it.
template <typename W>
static void run_into(const float* xp, int64_t rows, int64_t N, const W& w, float* yp, bool add) {
  const int64_t K = w.K, nb = (K + kBlock - 1) / kBlock;
  if (rows == 0) return;
#ifdef TM_AMX
  const bool amx = rows >= kAmxMinRows && amx_granted();
  // AMX reads whole tiles of 16 rows: the padding rows are allocated, never written or used.
  const int64_t alloc_rows = amx ? (rows + kAmxRows - 1) / kAmxRows * kAmxRows : rows;
#else
  const int64_t alloc_rows = rows;
#endif
  // Left uninitialized (quantize_row writes every element): zeroing them was a serial memset
  // of about 1.2 MB per linear in an 800-row prefill, the other thread waiting.
  std::unique_ptr<int8_t[]> xq(new int8_t[alloc_rows * nb * kBlock]), xq2(new int8_t[alloc_rows * nb * kBlock]);
  std::unique_ptr<float[]> xd2(new float[rows * nb]), xs(new float[rows * nb]);
  std::unique_ptr<int32_t[]> xsum(new int32_t[rows * nb]), xsum2(new int32_t[rows * nb]);
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {  // 4: a 16-row step on both threads
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * nb;
      quantize_row(xp + r * K, K, xq.get() + o * kBlock, xq2.get() + o * kBlock, xd2.get() + o,
                   xs.get() + o, xsum.get() + o, xsum2.get() + o);
    }
  });
  std::vector<QRow> xr(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * nb;
    xr[r] = QRow{xq.get() + o * kBlock, xq2.get() + o * kBlock, xd2.get() + o, xs.get() + o,
                 xsum.get() + o, xsum2.get() + o};
  }
  const int64_t col_groups = (N + kCols - 1) / kCols;
  if (rows < kManyRows) {
    // One group at a time: a row or two read each weight once, at memory speed, and two groups
    // in step are two streams 4.6 KB apart, which halved the LM head's one-row speed.
    at::parallel_for(0, col_groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) rows_span_c<1, true>(w, c, N, xr, 0, rows, yp, add);
    });
    return;
  }
#ifdef TM_AMX
  if (amx) {
    at::parallel_for(0, (col_groups + kAmxGroups - 1) / kAmxGroups, 1, [&](int64_t begin, int64_t end) {
      amx_span(w, N, xr, rows, begin, end, yp, add);
    });
    return;
  }
#endif
  // Many rows: a thread takes kRowPassGroups column groups (their weights stay in L1) through
  // every row, a row block at a time.
  const int64_t tiles = (col_groups + kRowPassGroups - 1) / kRowPassGroups;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c1 = std::min(col_groups, (t + 1) * kRowPassGroups);
      // A few rows: the first row block waits on the tile's weights from memory (the LM head's
      // 28 MB at 16 rows), so ask for the next tile's while this one computes. Many rows
      // amortize that wait, and the prefetches only cost there.
      Prefetch pf;
      if (rows <= kPrefetchRows && t + 1 < end) {
        pf.p = reinterpret_cast<const char*>(w.group(c1));
        pf.e = reinterpret_cast<const char*>(w.group(std::min(col_groups, c1 + kRowPassGroups)));
        const int64_t blocks = (c1 - t * kRowPassGroups + kColBlock - 1) / kColBlock * ((rows + kRowBlock - 1) / kRowBlock);
        pf.lines = ((pf.e - pf.p) / 64 + blocks - 1) / blocks;
      }
      for (int64_t r = 0; r < rows; r += kRowChunk) {
        const int64_t r1 = std::min(rows, r + kRowChunk);
        rows_span(w, t * kRowPassGroups, c1, N, xr, r, r1, yp, add, pf.p ? &pf : nullptr);
      }
      pf.rest();
    }
  });
}

template <typename W>
static torch::Tensor run(const torch::Tensor& x, int64_t N, const W& w) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.K, "x must be [rows, in_features]");
  const torch::Tensor xf = x.to(torch::kFloat).contiguous();
  torch::Tensor y = torch::empty({xf.size(0), N}, xf.options());
  run_into(xf.data_ptr<float>(), xf.size(0), N, w, y.data_ptr<float>(), false);
  return y;
}

static void check_scales(const torch::Tensor& t, int64_t N, int64_t groups, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kHalf && t.is_contiguous() && t.dim() == 3 && t.size(0) == (N + kCols - 1) / kCols &&
                  t.size(1) == groups && t.size(2) == kCols,
              what, " must be contiguous float16 [ceil(out/8), in/group, 8]");
}

// q [ceil(N/8), K/8, 32] uint8; scale, min [ceil(N/8), K/G, 8] float16 (min empty: Q4_0's
// symmetric form), checked.
static Int4W int4_weights(const torch::Tensor& q, const torch::Tensor& scale, const torch::Tensor& min, int64_t G, int64_t N) {
  const int64_t K = q.dim() == 3 ? q.size(1) * 8 : 0;
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous() && q.dim() == 3 && q.size(0) == (N + kCols - 1) / kCols &&
                  q.size(2) == 32, "int4: q must be contiguous uint8 [ceil(out/8), in/8, 32]");
  TORCH_CHECK(G > 0 && G % kBlock == 0 && K % G == 0, "int4: the group size must be a multiple of 32 dividing in_features");
  check_scales(scale, N, K / G, "int4: scale");
  const bool symmetric = min.numel() == 0;
  if (!symmetric) check_scales(min, N, K / G, "int4: min");
  return Int4W{q.data_ptr<uint8_t>(), scale.data_ptr<at::Half>(), symmetric ? nullptr : min.data_ptr<at::Half>(), K, G};
}

// q [ceil(N/8), ceil(K/32) * 8, 32] int8; scale [ceil(N/8), K/G, 8] float16, checked.
static Int8W int8_weights(const torch::Tensor& q, const torch::Tensor& scale, int64_t G, int64_t N, int64_t K) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && q.dim() == 3 && q.size(0) == (N + kCols - 1) / kCols &&
                  q.size(1) == (K + kBlock - 1) / kBlock * 8 && q.size(2) == 32,
              "int8: q must be contiguous int8 [ceil(out/8), ceil(in/32) * 8, 32] for x's in_features");
  TORCH_CHECK(G > 0 && K % G == 0 && (G % kBlock == 0 || G == K),
              "int8: the group size must be a multiple of 32 dividing in_features, or in_features");
  check_scales(scale, N, K / G, "int8: scale");
  return Int8W{q.data_ptr<int8_t>(), scale.data_ptr<at::Half>(), K, G};
}

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor min, int64_t G, int64_t N) {
  // No Python object is touched below: other Python threads (the server's HTTP loop) run
  // while the kernel does, instead of waiting for the GIL until it returns.
  pybind11::gil_scoped_release no_gil;
  return run(x, N, int4_weights(q, scale, min, G, N));
}

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, int64_t G, int64_t N) {
  pybind11::gil_scoped_release no_gil;  // as int4_linear
  return run(x, N, int8_weights(q, scale, G, N, x.dim() == 2 ? x.size(1) : 0));
}

// Rows `ids` of int8 weights as float32, float(q) * float(scale) element by element:
// Int8Linear.dequantized_rows' operations, so the same bits. A tied embedding table's lookup in
// one call, where the torch version's dozen small ops took 77 us a decode step (210 us with the
// caches cold after a step's weights). Out-of-range ids raise IndexError.
torch::Tensor int8_rows(torch::Tensor ids, torch::Tensor q, torch::Tensor scale, int64_t G, int64_t N, int64_t K) {
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.is_contiguous(), "int8 rows: ids must be contiguous int64 [n]");
  const Int8W w = int8_weights(q, scale, G, N, K);
  const int64_t n = ids.size(0), groups = K / G;
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK_INDEX(id[r] >= 0 && id[r] < N, "token id ", id[r], " out of range for a table of ", N, " rows");
  torch::Tensor out = torch::empty({n, K}, torch::dtype(torch::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r) {
    const int8_t* col = w.group(id[r] / kCols) + 4 * (id[r] % kCols);
    const at::Half* sc = w.scale + (id[r] / kCols) * groups * kCols + id[r] % kCols;
    for (int64_t k = 0; k < K; ++k)
      o[r * K + k] = static_cast<float>(col[(k / 4) * 32 + k % 4]) * static_cast<float>(sc[(k / G) * kCols]);
  }
  return out;
}

// The greedy token of each row of logits: the index of the row's first maximum, a NaN counting
// as larger than any number (torch.argmax's rule, so the same index). torch's argmax walks a row
// one element at a time: 42 us for one row of the default model's 49,152 logits, 344 us for 16;
// here two vector passes over it, the second stopping at the first maximum.
static int64_t first_max(const float* x, int64_t n) {
  int64_t i = 0;
  float m = -std::numeric_limits<float>::infinity();
  bool nan = false;
#ifdef TM_AVX2
  __m256 mv[4], un = _mm256_setzero_ps();
  for (auto& v : mv) v = _mm256_set1_ps(m);
  for (; i + 32 <= n; i += 32)
    for (int u = 0; u < 4; ++u) {
      const __m256 v = _mm256_loadu_ps(x + i + 8 * u);
      un = _mm256_or_ps(un, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      mv[u] = _mm256_max_ps(mv[u], v);
    }
  nan = _mm256_movemask_ps(un) != 0;
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(_mm256_max_ps(mv[0], mv[1]), _mm256_max_ps(mv[2], mv[3])));
  for (float l : lanes) m = std::max(m, l);
#endif
  for (; i < n; ++i) {
    nan = nan || std::isnan(x[i]);
    m = std::max(m, x[i]);
  }
  // The first element equal to the maximum (-0 and +0 are equal, as torch's > keeps the first
  // of them), or with a NaN anywhere, the first NaN.
  int64_t j = 0;
#ifdef TM_AVX2
  const __m256 target = _mm256_set1_ps(m);
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    const int hit = _mm256_movemask_ps(nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q) : _mm256_cmp_ps(v, target, _CMP_EQ_OQ));
    if (hit) return j + __builtin_ctz(hit);
  }
#endif
  for (; j < n; ++j)
    if (nan ? std::isnan(x[j]) : x[j] == m) return j;
  return 0;  // n == 0 is refused before this
}

torch::Tensor greedy_tokens(torch::Tensor logits) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.is_contiguous() && logits.size(1) > 0,
              "greedy tokens: logits must be contiguous float32 [rows, vocab]");
  pybind11::gil_scoped_release no_gil;  // as int4_linear
  const int64_t rows = logits.size(0), n = logits.size(1);
  torch::Tensor out = torch::empty({rows}, torch::dtype(torch::kLong));
  const float* p = logits.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) o[r] = first_max(p + r * n, n);
  });
  return out;
}

// GGUF's blocks straight into the layouts above, one pass over the file's bytes: the same
// repacking in numpy and torch (quant.py's int4_kernel_layout_from_gguf, int8_kernel_layout,
// column_groups) took about 0.35 s of every start. `blocks`: any contiguous byte buffer (the
// file's read-only mapping) of N rows of K/32 blocks.
struct GgufBlocks {
  const uint8_t* p;
  int64_t N, K, nb, groups;
};

static GgufBlocks gguf_blocks(const pybind11::buffer& blocks, int64_t N, int64_t K, int64_t block_bytes) {
  const pybind11::buffer_info info = blocks.request();
  TORCH_CHECK(N > 0 && K > 0 && K % kBlock == 0, "gguf blocks: need out > 0 and in a multiple of 32");
  const int64_t size = N * (K / kBlock) * block_bytes;
  TORCH_CHECK(info.itemsize == 1 && info.size == size, "gguf blocks: expected ", size, " bytes");
  int64_t expect = 1;  // C-contiguous bytes
  for (int64_t d = info.ndim - 1; d >= 0; --d) {
    TORCH_CHECK(info.shape[d] == 1 || info.strides[d] == expect, "gguf blocks: the buffer must be contiguous");
    expect *= info.shape[d];
  }
  return GgufBlocks{static_cast<const uint8_t*>(info.ptr), N, K, K / kBlock, (N + kCols - 1) / kCols};
}

// Each column's fp16 at byte `at` of its blocks -> [ceil(N/8), K/32, 8] (column_groups).
static void gguf_scales(const GgufBlocks& b, int64_t block_bytes, int64_t at, uint16_t* out, int64_t g, int64_t n1) {
  for (int64_t n = g * kCols; n < n1; ++n)
    for (int64_t k = 0; k < b.nb; ++k)
      std::memcpy(out + (g * b.nb + k) * kCols + n % kCols, b.p + (n * b.nb + k) * block_bytes + at, 2);
}

static torch::Tensor layout_tensor(std::vector<int64_t> shape, at::ScalarType dtype, bool padded) {
  // Only the last group's missing columns need zeros; every other byte is written.
  return padded ? torch::zeros(shape, torch::dtype(dtype)) : torch::empty(shape, torch::dtype(dtype));
}

// Q4_1 (has_min: fp16 d, fp16 m, 16 bytes) or Q4_0 (fp16 d, 16 bytes) -> (q, scale, min) as
// int4_linear takes them; min is empty for Q4_0. A block's byte i holds input i (low nibble) and
// input 16 + i (high); the kernel's byte 4j + i of quad t holds inputs 8t' + i and 8t' + 4 + i.
std::vector<torch::Tensor> int4_from_gguf(pybind11::buffer blocks, int64_t N, int64_t K, bool has_min) {
  const int64_t bytes = has_min ? 20 : 18;
  const GgufBlocks b = gguf_blocks(blocks, N, K, bytes);
  pybind11::gil_scoped_release no_gil;  // a load thread's repacking lets the server's thread run
  const bool padded = N % kCols != 0;
  torch::Tensor q = layout_tensor({b.groups, K / 8, 32}, at::kByte, padded);
  torch::Tensor scale = layout_tensor({b.groups, b.nb, kCols}, at::kHalf, padded);
  torch::Tensor min = has_min ? layout_tensor({b.groups, b.nb, kCols}, at::kHalf, padded)
                              : torch::empty({0}, torch::dtype(at::kHalf));
  uint8_t* qp = q.data_ptr<uint8_t>();
  uint16_t* sp = reinterpret_cast<uint16_t*>(scale.data_ptr<at::Half>());
  uint16_t* mp = has_min ? reinterpret_cast<uint16_t*>(min.data_ptr<at::Half>()) : nullptr;
  at::parallel_for(0, b.groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n1 = std::min(N, (g + 1) * kCols);
      gguf_scales(b, bytes, 0, sp, g, n1);
      if (has_min) gguf_scales(b, bytes, 2, mp, g, n1);
      for (int64_t n = g * kCols; n < n1; ++n)
        for (int64_t k = 0; k < b.nb; ++k) {
          const uint8_t* s = b.p + (n * b.nb + k) * bytes + bytes - 16;
          uint8_t* d = qp + (g * (K / 8) + k * 4) * 32 + 4 * (n % kCols);
          for (int i = 0; i < 4; ++i) {
            const uint8_t x0 = s[i], x1 = s[4 + i], x2 = s[8 + i], x3 = s[12 + i];
            d[i] = uint8_t((x0 & 0x0F) | ((x1 & 0x0F) << 4));
            d[32 + i] = uint8_t((x2 & 0x0F) | ((x3 & 0x0F) << 4));
            d[64 + i] = uint8_t((x0 >> 4) | (x1 & 0xF0));
            d[96 + i] = uint8_t((x2 >> 4) | (x3 & 0xF0));
          }
        }
    }
  });
  return {q, scale, min};
}

// Q8_0 (fp16 d, 32 int8) -> (q, scale) as int8_linear takes them, group size 32.
std::vector<torch::Tensor> int8_from_gguf(pybind11::buffer blocks, int64_t N, int64_t K) {
  constexpr int64_t bytes = 34;
  const GgufBlocks b = gguf_blocks(blocks, N, K, bytes);
  pybind11::gil_scoped_release no_gil;
  const bool padded = N % kCols != 0;
  torch::Tensor q = layout_tensor({b.groups, K / 4, 32}, at::kChar, padded);
  torch::Tensor scale = layout_tensor({b.groups, b.nb, kCols}, at::kHalf, padded);
  int8_t* qp = q.data_ptr<int8_t>();
  uint16_t* sp = reinterpret_cast<uint16_t*>(scale.data_ptr<at::Half>());
  at::parallel_for(0, b.groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n1 = std::min(N, (g + 1) * kCols);
      gguf_scales(b, bytes, 0, sp, g, n1);
      for (int64_t n = g * kCols; n < n1; ++n)
        for (int64_t k = 0; k < b.nb; ++k) {
          const uint8_t* s = b.p + (n * b.nb + k) * bytes + 2;
          int8_t* d = qp + (g * (K / 4) + k * 8) * 32 + 4 * (n % kCols);
          for (int t = 0; t < 8; ++t) std::memcpy(d + 32 * t, s + 4 * t, 4);
        }
    }
  });
  return {q, scale};
}

std::string isa() {
#if defined(TM_AMX)
  return amx_granted() ? "avx2+fma+f16c+avx512vnni+amx" : "avx2+fma+f16c+avx512vnni (amx listed, not granted)";
#elif defined(TM_VNNI)
  return "avx2+fma+f16c+avx512vnni";
#elif defined(TM_AVX2)
  return "avx2+fma+f16c";
#else
  return "scalar";
#endif
}
"""


PREFIX, CFLAGS = "tokenmill_qlinear", ["-O3", "-fopenmp", "-ffp-contract=off"]
FUNCTIONS = ["int4_linear", "int8_linear", "int8_rows", "greedy_tokens", "int4_from_gguf", "int8_from_gguf", "isa"]


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
