// The peak rate of AVX-512 VNNI `dpbusd` on this CPU, 256-bit and 512-bit registers: 12
// independent accumulators, operands the compiler cannot fold. docs/benchmarks.md compares the
// integer kernels (model/qkernels.py) against it.
//
//   g++ -O2 -mavx2 -mavx512f -mavx512vl -mavx512vnni benchmarks/dpbusd_peak.cpp -o /tmp/dpbusd_peak && /tmp/dpbusd_peak
#include <immintrin.h>
#include <chrono>
#include <cstdio>

static inline __m256i dp(__m256i a, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(a, u, s); }
static inline __m512i dp(__m512i a, __m512i u, __m512i s) { return _mm512_dpbusd_epi32(a, u, s); }
static inline __m256i splat(__m256i, int v) { return _mm256_set1_epi32(v); }
static inline __m512i splat(__m512i, int v) { return _mm512_set1_epi32(v); }
static inline int low(__m256i v) { return _mm256_extract_epi32(v, 0); }
static inline int low(__m512i v) { return _mm512_cvtsi512_si32(v); }

// ns per dpbusd over `iters` rounds of 12 independent accumulators (distinct starting values
// from memory, so the compiler cannot merge them; the operands pass through an empty asm each
// round, so it cannot fold them either).
template <typename V>
static double ns_per_op(long iters) {
  volatile int init[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  V a[12];
  for (int k = 0; k < 12; ++k) a[k] = splat(V{}, init[k]);
  V u = splat(V{}, 0x03030303), s = splat(V{}, 0x05050505);
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < iters; ++i) {
    asm volatile("" : "+v"(u), "+v"(s));
#pragma GCC unroll 12
    for (int k = 0; k < 12; ++k) a[k] = dp(a[k], u, s);
  }
  const auto t1 = std::chrono::steady_clock::now();
  int sink = 0;
  for (int k = 0; k < 12; ++k) sink += low(a[k]);
  if (sink == 42) std::puts("");  // keeps the accumulators live
  return std::chrono::duration<double, std::nano>(t1 - t0).count() / (iters * 12.0);
}

int main() {
  const long iters = 40000000;
  const double y = ns_per_op<__m256i>(iters), z = ns_per_op<__m512i>(iters);
  std::printf("ymm dpbusd: %.3f ns each, %.1f GMAC/s; zmm dpbusd: %.3f ns each, %.1f GMAC/s\n", y, 32 / y, z, 64 / z);
}
