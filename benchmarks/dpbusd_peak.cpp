// The peak rate of AVX-512 VNNI `dpbusd` on this CPU, 256-bit and 512-bit registers: 12
// independent accumulators, operands the compiler cannot fold. docs/benchmarks.md compares the
// integer kernels (model/qkernels.py) against it.
//
//   g++ -O2 -mavx2 -mavx512f -mavx512vl -mavx512vnni benchmarks/dpbusd_peak.cpp -o /tmp/dpbusd_peak && /tmp/dpbusd_peak
#include <immintrin.h>
#include <chrono>
#include <cstdio>
template <typename F> double ns_per(F f, long n) { auto t0 = std::chrono::steady_clock::now(); f(); auto t1 = std::chrono::steady_clock::now(); return std::chrono::duration<double, std::nano>(t1 - t0).count() / n; }
int main() {
  const long M = 40000000;
  volatile int iv[12]={1,2,3,4,5,6,7,8,9,10,11,12};
  __m256i a0=_mm256_set1_epi32(iv[0]),a1=_mm256_set1_epi32(iv[1]),a2=_mm256_set1_epi32(iv[2]),a3=_mm256_set1_epi32(iv[3]),a4=_mm256_set1_epi32(iv[4]),a5=_mm256_set1_epi32(iv[5]),a6=_mm256_set1_epi32(iv[6]),a7=_mm256_set1_epi32(iv[7]),a8=_mm256_set1_epi32(iv[8]),a9=_mm256_set1_epi32(iv[9]),a10=_mm256_set1_epi32(iv[10]),a11=_mm256_set1_epi32(iv[11]);
  __m256i u = _mm256_set1_epi8(3), s = _mm256_set1_epi8(5);
  double y = ns_per([&]{ for (long i = 0; i < M; ++i) { asm volatile("" : "+v"(u), "+v"(s));
    a0=_mm256_dpbusd_epi32(a0,u,s); a1=_mm256_dpbusd_epi32(a1,u,s); a2=_mm256_dpbusd_epi32(a2,u,s); a3=_mm256_dpbusd_epi32(a3,u,s);
    a4=_mm256_dpbusd_epi32(a4,u,s); a5=_mm256_dpbusd_epi32(a5,u,s); a6=_mm256_dpbusd_epi32(a6,u,s); a7=_mm256_dpbusd_epi32(a7,u,s);
    a8=_mm256_dpbusd_epi32(a8,u,s); a9=_mm256_dpbusd_epi32(a9,u,s); a10=_mm256_dpbusd_epi32(a10,u,s); a11=_mm256_dpbusd_epi32(a11,u,s);
  }}, M * 12);
  __m512i z0=_mm512_set1_epi32(iv[0]),z1=_mm512_set1_epi32(iv[1]),z2=_mm512_set1_epi32(iv[2]),z3=_mm512_set1_epi32(iv[3]),z4=_mm512_set1_epi32(iv[4]),z5=_mm512_set1_epi32(iv[5]),z6=_mm512_set1_epi32(iv[6]),z7=_mm512_set1_epi32(iv[7]),z8=_mm512_set1_epi32(iv[8]),z9=_mm512_set1_epi32(iv[9]),z10=_mm512_set1_epi32(iv[10]),z11=_mm512_set1_epi32(iv[11]);
  __m512i uz = _mm512_set1_epi8(3), sz = _mm512_set1_epi8(5);
  double z = ns_per([&]{ for (long i = 0; i < M; ++i) { asm volatile("" : "+v"(uz), "+v"(sz));
    z0=_mm512_dpbusd_epi32(z0,uz,sz); z1=_mm512_dpbusd_epi32(z1,uz,sz); z2=_mm512_dpbusd_epi32(z2,uz,sz); z3=_mm512_dpbusd_epi32(z3,uz,sz);
    z4=_mm512_dpbusd_epi32(z4,uz,sz); z5=_mm512_dpbusd_epi32(z5,uz,sz); z6=_mm512_dpbusd_epi32(z6,uz,sz); z7=_mm512_dpbusd_epi32(z7,uz,sz);
    z8=_mm512_dpbusd_epi32(z8,uz,sz); z9=_mm512_dpbusd_epi32(z9,uz,sz); z10=_mm512_dpbusd_epi32(z10,uz,sz); z11=_mm512_dpbusd_epi32(z11,uz,sz);
  }}, M * 12);
  __m256i r = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(a0,a1),_mm256_add_epi32(a2,a3)),_mm256_add_epi32(_mm256_add_epi32(a4,a5),_mm256_add_epi32(_mm256_add_epi32(a6,a7),_mm256_add_epi32(_mm256_add_epi32(a8,a9),_mm256_add_epi32(a10,a11)))));
  __m512i q = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(z0,z1),_mm512_add_epi32(z2,z3)),_mm512_add_epi32(_mm512_add_epi32(z4,z5),_mm512_add_epi32(_mm512_add_epi32(z6,z7),_mm512_add_epi32(_mm512_add_epi32(z8,z9),_mm512_add_epi32(z10,z11)))));
  printf("ymm dpbusd: %.3f ns each, %.1f GMAC/s; zmm dpbusd: %.3f ns each, %.1f GMAC/s (%d)\n", y, 32 / y, z, 64 / z, (_mm256_extract_epi32(r,0) + _mm512_cvtsi512_si32(q)) & 1);
}
