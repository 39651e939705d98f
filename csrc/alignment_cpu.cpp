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
#include <vector>

#include "alignment.h"
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
// AVX2, picked at run time when the CPU has it. Without FMA (and no contraction, below): every
// product and sum rounds as in the baseline loop, so given the same sums the combine's outputs are
// the same bits; group_sums adds its partial sums in another order (wider vectors), so its sums
// may differ in the last bits between CPUs.
// GENREP_FAST_CPU_ISA=baseline forces the baseline loops (read on every call: tests compare them).
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define GENREP_FAST_AVX2_CLONES 1
template <typename scalar_t>
__attribute__((target("avx2"))) Partial chunk_sums_avx2(const scalar_t* a, const scalar_t* b,
                                                          int64_t n) {
  return chunk_sums_body(a, b, n);
}

template <typename scalar_t>
__attribute__((target("avx2"))) void chunk_combine_avx2(const scalar_t* p, const scalar_t* g,
                                                         scalar_t* out, double a, double b,
                                                         int64_t n) {
  chunk_combine_body(p, g, out, a, b, n);
}
#endif

bool use_avx2() {
#ifdef GENREP_FAST_AVX2_CLONES
  // __builtin_cpu_init: the CPU model may not be filled in yet when a static initialiser of a
  // shared object asks (GCC's documentation); calling it again is harmless.
  static const bool has_avx2 = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
  const char* isa = std::getenv("GENREP_FAST_CPU_ISA");
  return has_avx2 && !(isa != nullptr && std::string(isa) == "baseline");
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
