// The int4 kernel's inner loop (model/qkernels.py's block_dot and float step) on L1-resident
// data, by register blocking: R rows x C column groups of 8 per weight load and per broadcast
// of x. K = 576 (18 blocks of 32), both activation passes; "float=0" leaves out the per-block
// float step. GMAC/s per core counts both passes; compare with benchmarks/dpbusd_peak.cpp.
//
//   g++ -O3 -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512vnni -ffp-contract=off \
//       benchmarks/qkernel_blocking.cpp -o /tmp/qkb && /tmp/qkb
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <vector>
static inline __m256i bcast4(const int8_t* x) { int32_t v; std::memcpy(&v, x, 4); return _mm256_set1_epi32(v); }
struct Dots { __m256i a, b; };
// K = 576: 18 blocks; the weights are C groups x 18 blocks x 128 bytes
constexpr int NB = 18;
template <int R, int C, bool FLOAT>
__attribute__((noinline)) void kern(const uint8_t* w, const int8_t* const* q, const int8_t* const* q2, const float* d2, const float* sc, float* y) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r) for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  __m256i iacc[R][C];
  for (int r = 0; r < R; ++r) for (int c = 0; c < C; ++c) iacc[r][c] = _mm256_setzero_si256();
  const __m256i mask = _mm256_set1_epi8(0x0F);
  for (int b = 0; b < NB; ++b) {
    Dots o[R][C];
    for (int r = 0; r < R; ++r) for (int c = 0; c < C; ++c) o[r][c] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int t = 0; t < 4; ++t) {
      __m256i lo[C], hi[C];
      for (int c = 0; c < C; ++c) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(w + (c * NB + b) * 128 + t * 32));
        lo[c] = _mm256_and_si256(v, mask); hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
      }
      for (int r = 0; r < R; ++r) {
        const int8_t *x1 = q[r] + b * 32 + 8 * t, *x2 = q2[r] + b * 32 + 8 * t;
        const __m256i s1 = bcast4(x1), s1h = bcast4(x1 + 4), s2 = bcast4(x2), s2h = bcast4(x2 + 4);
        for (int c = 0; c < C; ++c) {
          o[r][c].a = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(o[r][c].a, lo[c], s1), hi[c], s1h);
          o[r][c].b = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(o[r][c].b, lo[c], s2), hi[c], s2h);
        }
      }
    }
    for (int c = 0; c < C; ++c) {
      const __m256 d = _mm256_loadu_ps(sc + (c * NB + b) * 8);
      for (int r = 0; r < R; ++r) {
        const __m256i both = _mm256_add_epi32(_mm256_slli_epi32(o[r][c].a, 8), o[r][c].b);
        if (FLOAT) acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(both), _mm256_mul_ps(d, _mm256_set1_ps(d2[r * NB + b])), acc[r][c]);
        else iacc[r][c] = _mm256_add_epi32(iacc[r][c], both);
      }
    }
  }
  for (int r = 0; r < R; ++r) for (int c = 0; c < C; ++c) {
    _mm256_storeu_ps(y + (r * C + c) * 8, FLOAT ? acc[r][c] : _mm256_castsi256_ps(iacc[r][c]));
  }
}
template <int R, int C, bool FLOAT>
void bench(const char* name) {
  std::vector<uint8_t> w(C * NB * 128, 0x35);
  std::vector<int8_t> xs(R * 2 * NB * 32, 3);
  std::vector<float> d2(R * NB, 0.5f), sc(C * NB * 8, 0.25f), y(R * C * 8);
  const int8_t* q[R]; const int8_t* q2[R];
  for (int r = 0; r < R; ++r) { q[r] = xs.data() + r * 2 * NB * 32; q2[r] = q[r] + NB * 32; }
  const long iters = 200000;
  auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < iters; ++i) { kern<R, C, FLOAT>(w.data(), q, q2, d2.data(), sc.data(), y.data()); asm volatile("" ::: "memory"); }
  auto t1 = std::chrono::steady_clock::now();
  double ns = std::chrono::duration<double, std::nano>(t1 - t0).count() / iters;
  double dps = double(R) * C * NB * 4 * 4;  // dpbusd per call
  std::printf("%s R=%d C=%d float=%d: %.1f ns/call, %.3f ns/dpbusd, %.0f GMAC/s (both passes)\n", name, R, C, FLOAT, ns, ns / dps, dps * 32 / ns);
}
int main() {
  for (int k = 0; k < 2; ++k) {  // twice: the box drifts
    bench<4, 1, true>("before (4 x 1)"); bench<4, 1, false>("");
    bench<4, 2, true>("now (4 x 2)"); bench<4, 2, false>("");
    bench<1, 1, true>("one row"); bench<2, 2, true>(""); bench<2, 4, true>(""); bench<1, 4, true>(""); bench<8, 1, true>("");
  }
}
