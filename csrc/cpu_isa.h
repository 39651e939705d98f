// The x86-64 side of the CPU kernels' hand-written AVX2 + F16C copies (csrc/alignment_cpu.cpp's
// fp16 chunks, csrc/mixture_cpu.cpp's fp16 rows): GENREP_FAST_X86_F16C is defined where such
// copies can be compiled (x86-64, GCC or Clang), has_avx2_f16c() says whether this CPU runs
// them, load8_half loads fp16 values with the CPU's own conversion.
#pragma once

#include <c10/util/Half.h>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define GENREP_FAST_X86_F16C 1
#include <immintrin.h>
#endif

namespace genrep_fast {
namespace isa {

// Whether this CPU has AVX2 and F16C (asked once).
inline bool has_avx2_f16c() {
#ifdef GENREP_FAST_X86_F16C
  // __builtin_cpu_init: the CPU model may not be filled in yet when a static initialiser of a
  // shared object asks (GCC's documentation); calling it again is harmless.
  static const bool has = (__builtin_cpu_init(), __builtin_cpu_supports("avx2") &&
                                                     __builtin_cpu_supports("f16c"));
  return has;
#else
  return false;
#endif
}

#ifdef GENREP_FAST_X86_F16C
// 8 fp16 values as floats: vcvtph2ps, exact for every value (subnormals included), whatever
// MXCSR's denormal flags say.
__attribute__((target("avx2,f16c"))) inline __m256 load8_half(const c10::Half* src) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
}
#endif

}  // namespace isa
}  // namespace genrep_fast
