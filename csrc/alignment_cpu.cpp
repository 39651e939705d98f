// CPU kernels of gradient alignment (docs/METHOD.md section 3): a per-group multi-tensor reduction
// (group_sums) and a multi-tensor combine (align_combine), the same two passes as the CUDA ops.
//
// Determinism: every tensor is cut into fixed-size chunks (independent of the thread count), each
// chunk's partial sums are computed in double by one thread, and the partials are added in chunk
// order by one pass. The result is bitwise identical across calls and thread counts; between a CPU
// with AVX2 and one without, group_sums may differ in the last bits (see chunk_sums_avx2).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "alignment.h"
#include "cpu_isa.h"
#include "elem_convert.h"

// No a*b+c -> fma contraction, whatever flags the build adds (-march=native): the combine then
// rounds the same way in every copy of its loop.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace genrep_fast {
namespace {

// 32K elements: large enough that the per-chunk bookkeeping is negligible, small enough that a
// 1M-element tensor still spreads over all cores.
constexpr int64_t kChunk = 1 << 15;
// Below 256K elements in all, a pass runs on the calling thread: waking the OpenMP team costs
// more than the work (measured here: a 0.1M-element list of 47 tensors took 0.05 ms on one thread
// and 12 ms with two on a busy 2-core machine).
constexpr int64_t kSerialElems = 1 << 18;

struct Partial {
  double dot = 0.0, pp = 0.0, gg = 0.0;
};

// Sums of one chunk in double: every product of two fp32 values is exact in double, so a chunk's
// partial carries no rounding beyond the additions. `a` or `b` may be null (a missing gradient).
template <typename scalar_t>
[[gnu::always_inline]] inline Partial chunk_sums_body(const scalar_t* a, const scalar_t* b,
                                                      int64_t n) {
  using convert::to_acc;
  double dot = 0.0, pp = 0.0, gg = 0.0;
  if (a != nullptr && b != nullptr) {
#pragma omp simd reduction(+ : dot, pp, gg)
    for (int64_t j = 0; j < n; ++j) {
      const double x = to_acc<double>(a[j]);
      const double y = to_acc<double>(b[j]);
      dot += x * y;
      pp += x * x;
      gg += y * y;
    }
  } else if (a != nullptr) {
#pragma omp simd reduction(+ : pp)
    for (int64_t j = 0; j < n; ++j) {
      const double x = to_acc<double>(a[j]);
      pp += x * x;
    }
  } else if (b != nullptr) {
#pragma omp simd reduction(+ : gg)
    for (int64_t j = 0; j < n; ++j) {
      const double y = to_acc<double>(b[j]);
      gg += y * y;
    }
  }
  return {dot, pp, gg};
}

// out = a * p + b * g over one chunk, in double (see align_coefficients for why). `out` may alias
// `p` or `g` element for element (in-place update of .grad), so no pointer is __restrict__.
template <typename scalar_t>
[[gnu::always_inline]] inline void chunk_combine_body(const scalar_t* p, const scalar_t* g,
                                                      scalar_t* out, double a, double b,
                                                      int64_t n) {
  using convert::from_double;
  using convert::to_acc;
  if (p != nullptr && g != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      out[j] = from_double<scalar_t>(a * to_acc<double>(p[j]) + b * to_acc<double>(g[j]));
    }
  } else if (p != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = from_double<scalar_t>(a * to_acc<double>(p[j]));
  } else if (g != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = from_double<scalar_t>(b * to_acc<double>(g[j]));
  } else {
    std::fill(out, out + n, from_double<scalar_t>(0.0));
  }
}

// Each chunk loop compiled twice: for the extension's baseline ISA, and (x86-64, GCC or Clang) for
// AVX2 with F16C, picked at run time when the CPU has both. Without FMA (and no contraction,
// below): every product and sum rounds as in the baseline loop, so given the same sums the
// combine's outputs are the same bits; group_sums adds its partial sums in another order (wider
// vectors), so its sums may differ in the last bits between CPUs.
// GENREP_FAST_CPU_ISA=baseline forces the baseline loops (read on every call: tests compare them).
#ifdef GENREP_FAST_X86_F16C
#define GENREP_FAST_AVX2_CLONES 1

// fp16 chunks by hand, with F16C's conversions. Auto-vectorised, the exact fp16 conversions
// (written as bit operations so the baseline vectorises too: subnormal, normal and special paths
// blended) cost more than the arithmetic: the fp16 step ran at 2.5x the bf16 step's time. Here 8
// values at a time: loaded with vcvtph2ps (exact for every finite value, subnormals included) as
// two vectors of 4 doubles, and stored as the baseline stores them: double -> float rounded to
// nearest, then vcvtps2ph to nearest even, a NaN stored as c10 stores it. (bf16 gained nothing
// from the same hand loop: measured equal, its loads and stores are already a shift and a few
// integer operations; it stays auto-vectorised.)
__attribute__((target("avx2,f16c"))) inline void load8_as_double(const c10::Half* src, __m256d& lo,
                                                                  __m256d& hi) {
  const __m256 f = isa::load8_half(src);
  lo = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
  hi = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
}

__attribute__((target("avx2,f16c"))) inline void store8_from_double(c10::Half* dst, __m256d lo,
                                                                     __m256d hi) {
  __m256 f = _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
  // A NaN becomes the quiet NaN of its sign first: vcvtps2ph would keep a payload's top bits,
  // c10 stores 0x7E00 with the sign. Rounding from the immediate (nearest even), not MXCSR.
  const __m256 nan = _mm256_cmp_ps(f, f, _CMP_UNORD_Q);
  const __m256 sign = _mm256_and_ps(f, _mm256_castsi256_ps(_mm256_set1_epi32(INT32_MIN)));
  const __m256 quiet = _mm256_or_ps(sign, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)));
  f = _mm256_blendv_ps(f, quiet, nan);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
}

__attribute__((target("avx2,f16c"))) inline double sum_lanes(__m256d lo, __m256d hi) {
  alignas(32) double t[4];
  _mm256_store_pd(t, _mm256_add_pd(lo, hi));
  return (t[0] + t[1]) + (t[2] + t[3]);
}

template <bool kA, bool kB>
__attribute__((target("avx2,f16c"))) Partial chunk_sums_fp16(const c10::Half* a,
                                                              const c10::Half* b, int64_t n) {
  const __m256d zero = _mm256_setzero_pd();
  __m256d dot[2] = {zero, zero}, pp[2] = {zero, zero}, gg[2] = {zero, zero};
  __m256d x[2] = {zero, zero}, y[2] = {zero, zero};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    if constexpr (kA) load8_as_double(a + j, x[0], x[1]);
    if constexpr (kB) load8_as_double(b + j, y[0], y[1]);
    for (int h = 0; h < 2; ++h) {
      if constexpr (kA && kB) dot[h] = _mm256_add_pd(dot[h], _mm256_mul_pd(x[h], y[h]));
      if constexpr (kA) pp[h] = _mm256_add_pd(pp[h], _mm256_mul_pd(x[h], x[h]));
      if constexpr (kB) gg[h] = _mm256_add_pd(gg[h], _mm256_mul_pd(y[h], y[h]));
    }
  }
  const Partial tail = chunk_sums_body(kA ? a + j : nullptr, kB ? b + j : nullptr, n - j);
  return {sum_lanes(dot[0], dot[1]) + tail.dot, sum_lanes(pp[0], pp[1]) + tail.pp,
          sum_lanes(gg[0], gg[1]) + tail.gg};
}

template <bool kP, bool kG>
__attribute__((target("avx2,f16c"))) void chunk_combine_fp16(const c10::Half* p, const c10::Half* g,
                                                             c10::Half* out, double a, double b,
                                                             int64_t n) {
  const __m256d va = _mm256_set1_pd(a), vb = _mm256_set1_pd(b);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256d x[2], y[2], r[2];
    if constexpr (kP) load8_as_double(p + j, x[0], x[1]);
    if constexpr (kG) load8_as_double(g + j, y[0], y[1]);
    for (int h = 0; h < 2; ++h) {
      // As the baseline: a * p + b * g, each product rounded, then the sum (no FMA).
      if constexpr (kP && kG) {
        r[h] = _mm256_add_pd(_mm256_mul_pd(va, x[h]), _mm256_mul_pd(vb, y[h]));
      } else if constexpr (kP) {
        r[h] = _mm256_mul_pd(va, x[h]);
      } else {
        r[h] = _mm256_mul_pd(vb, y[h]);
      }
    }
    store8_from_double(out + j, r[0], r[1]);
  }
  chunk_combine_body(kP ? p + j : nullptr, kG ? g + j : nullptr, out + j, a, b, n - j);
}

template <typename scalar_t>
__attribute__((target("avx2,f16c"))) Partial chunk_sums_avx2(const scalar_t* a, const scalar_t* b,
                                                              int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (a != nullptr && b != nullptr) return chunk_sums_fp16<true, true>(a, b, n);
    if (a != nullptr) return chunk_sums_fp16<true, false>(a, b, n);
    if (b != nullptr) return chunk_sums_fp16<false, true>(a, b, n);
    return {};
  } else {
    return chunk_sums_body(a, b, n);
  }
}

template <typename scalar_t>
__attribute__((target("avx2,f16c"))) void chunk_combine_avx2(const scalar_t* p, const scalar_t* g,
                                                             scalar_t* out, double a, double b,
                                                             int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (p != nullptr && g != nullptr) return chunk_combine_fp16<true, true>(p, g, out, a, b, n);
    if (p != nullptr) return chunk_combine_fp16<true, false>(p, g, out, a, b, n);
    if (g != nullptr) return chunk_combine_fp16<false, true>(p, g, out, a, b, n);
  }
  chunk_combine_body(p, g, out, a, b, n);
}
#endif

bool use_avx2() {
#ifdef GENREP_FAST_AVX2_CLONES
  const char* forced = std::getenv("GENREP_FAST_CPU_ISA");
  return isa::has_avx2_f16c() && !(forced != nullptr && std::string(forced) == "baseline");
#else
  return false;
#endif
}

template <typename scalar_t>
Partial chunk_sums(const scalar_t* a, const scalar_t* b, int64_t n, bool avx2) {
#ifdef GENREP_FAST_AVX2_CLONES
  if (avx2) return chunk_sums_avx2(a, b, n);
#endif
  return chunk_sums_body(a, b, n);
}

template <typename scalar_t>
void chunk_combine(const scalar_t* p, const scalar_t* g, scalar_t* out, double a, double b,
                   int64_t n, bool avx2) {
#ifdef GENREP_FAST_AVX2_CLONES
  if (avx2) return chunk_combine_avx2(p, g, out, a, b, n);
#endif
  chunk_combine_body(p, g, out, a, b, n);
}

template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

struct Chunk {
  int64_t tensor, start;
};

// fn(begin, end) over the chunk range, in parallel when the list is large enough. The result does
// not depend on the split: every chunk is processed alone.
template <typename Fn>
void for_chunks(int64_t num_chunks, int64_t total_elems, const Fn& fn) {
  if (total_elems < kSerialElems) {
    fn(int64_t(0), num_chunks);
  } else {
    at::parallel_for(0, num_chunks, 1, fn);
  }
}

at::Tensor group_sums_cpu(const OptionalTensorList& p_list, const OptionalTensorList& g_list,
                          at::IntArrayRef group_ids, int64_t num_groups) {
  check_align_lists("group_sums", p_list, g_list, group_ids, num_groups, c10::DeviceType::CPU);
  const size_t n = p_list.size();
  std::vector<at::Tensor> pc(n), gc(n);
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor src = present_of(p_list, g_list, i);
    if (group_ids[i] < 0 || !src.defined() || src.numel() == 0) continue;
    pc[i] = contiguous_or_undefined(get_or_undefined(p_list, i));
    gc[i] = contiguous_or_undefined(get_or_undefined(g_list, i));
    for (int64_t s = 0; s < src.numel(); s += kChunk) chunks.push_back({int64_t(i), s});
    total += src.numel();
  }
  std::vector<Partial> partials(chunks.size());
  const bool avx2 = use_avx2();
  for_chunks(static_cast<int64_t>(chunks.size()), total, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk ch = chunks[c];
      const at::Tensor& ref = pc[ch.tensor].defined() ? pc[ch.tensor] : gc[ch.tensor];
      const int64_t len = std::min(kChunk, ref.numel() - ch.start);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ref.scalar_type(), "group_sums",
                                      [&] {
        const scalar_t* a = data_or_null<scalar_t>(pc[ch.tensor]);
        const scalar_t* b = data_or_null<scalar_t>(gc[ch.tensor]);
        partials[c] =
            chunk_sums(a ? a + ch.start : nullptr, b ? b + ch.start : nullptr, len, avx2);
      });
    }
  });
  // Cleanup pass: chunk order is fixed by the inputs alone, so the additions are too.
  auto out = at::zeros({num_groups, 3}, at::TensorOptions().dtype(at::kDouble));
  double* acc = out.data_ptr<double>();
  for (size_t c = 0; c < chunks.size(); ++c) {
    const int64_t grp = group_ids[chunks[c].tensor];
    acc[grp * 3 + 0] += partials[c].dot;
    acc[grp * 3 + 1] += partials[c].pp;
    acc[grp * 3 + 2] += partials[c].gg;
  }
  return out;
}

void align_combine_cpu(const OptionalTensorList& p_list, const OptionalTensorList& g_list,
                       const at::Tensor& sums, at::IntArrayRef group_ids, double k, double w_p,
                       double w_g, c10::string_view mode, at::TensorList out) {
  const int64_t num_groups = sums.dim() == 2 ? sums.size(0) : 0;
  check_sums(sums, c10::DeviceType::CPU);
  check_align_lists("align_combine", p_list, g_list, group_ids, num_groups, c10::DeviceType::CPU);
  check_combine_args(p_list, g_list, sums, out, c10::DeviceType::CPU);
  TORCH_CHECK_VALUE(k >= 0.0, "align_combine: k must be >= 0, got ", k);
  const AlignParams prm{k, w_p, w_g, parse_align_mode(std::string(mode))};

  // Coefficients of every group, computed once: sums is a CPU tensor, so reading it is no sync.
  const at::Tensor sums_c = sums.contiguous();
  const double* s = sums_c.const_data_ptr<double>();
  std::vector<double> coef_a(num_groups + 1), coef_b(num_groups + 1);  // slot 0: group -1
  for (int64_t grp = -1; grp < num_groups; ++grp) {
    align_coefficients(s, grp, prm, &coef_a[grp + 1], &coef_b[grp + 1]);
  }

  const size_t n = p_list.size();
  std::vector<at::Tensor> pc(n), gc(n), oc(n);
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    if (out[i].numel() == 0) continue;
    pc[i] = contiguous_or_undefined(get_or_undefined(p_list, i));
    gc[i] = contiguous_or_undefined(get_or_undefined(g_list, i));
    // A strided output is computed into a contiguous buffer and copied back after the pass.
    oc[i] = out[i].is_contiguous() ? out[i] : at::empty_like(out[i], at::MemoryFormat::Contiguous);
    for (int64_t st = 0; st < out[i].numel(); st += kChunk) chunks.push_back({int64_t(i), st});
    total += out[i].numel();
  }
  const bool avx2 = use_avx2();
  for_chunks(static_cast<int64_t>(chunks.size()), total, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk ch = chunks[c];
      const at::Tensor& o = oc[ch.tensor];
      const int64_t len = std::min(kChunk, o.numel() - ch.start);
      const int64_t slot = group_ids[ch.tensor] + 1;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(), "align_combine",
                                      [&] {
        const scalar_t* pp = data_or_null<scalar_t>(pc[ch.tensor]);
        const scalar_t* gp = data_or_null<scalar_t>(gc[ch.tensor]);
        chunk_combine(pp ? pp + ch.start : nullptr, gp ? gp + ch.start : nullptr,
                      o.data_ptr<scalar_t>() + ch.start, coef_a[slot], coef_b[slot], len, avx2);
      });
    }
  });
  for (size_t i = 0; i < n; ++i) {
    if (oc[i].defined() && !oc[i].is_same(out[i])) out[i].copy_(oc[i]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(genrep_fast, CPU, m) {
  m.impl("group_sums", &group_sums_cpu);
  m.impl("align_combine", &align_combine_cpu);
}

}  // namespace genrep_fast
