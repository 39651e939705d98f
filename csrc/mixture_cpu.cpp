// CPU kernels of the mixture log-likelihood in the exact difference form (docs/METHOD.md section 1) for
// the memory-bound layouts: the per-image bank mu [B, C, T, D] and candidate classes
// (class_index [B, K] into a shared bank [C, T, D] or into a per-image bank).
//
//   s_bkt = -0.5 * sum_d (x_bd - mu_d)^2 / sigma^2 + log-normaliser       (one bank row per t)
//   ll_bk = logsumexp_t s_bkt - log T
//
// Layout: one output row (b, k) per task of at::parallel_for; the row reads its T bank rows of D
// values once, keeps its T scores in a small buffer and reduces them with a max-shifted sum.
// Accumulation is float for bf16/fp16/fp32 inputs and double for double inputs. Every reduction
// has a fixed order (kLanes partial sums, then a fixed tree) that does not depend on the thread
// count, so the results are bitwise reproducible.
//
// Backward: the row recomputes its T scores with the very same function as the forward (so the
// max m and the normaliser l = sum_t exp(s_t - m) use the arithmetic of the weights
// w_t = exp(s_t - m) / l), then a second pass over the row's T x D block (from L2: 300 KB at
// T=75, D=1024 fp32) writes the gradients. Nothing of size [B, K, T] is stored.
// Rows that write the same bank block (candidate classes repeated across images or within a row)
// are grouped by block and one thread owns each block, adding its rows in ascending (b, k)
// order: no atomics, deterministic.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "elem_convert.h"

// The hot loops are compiled twice on x86-64 with GCC: for AVX2+FMA (x86-64-v3) and for the
// baseline (SSE2), picked once at load time (ifunc). The baseline alone reaches the copy bandwidth
// in the isotropic forward at fp32; the divisions of diagonal sigma, the bf16 conversions and the
// backward need the wider vectors. Results are identical run to run on one machine (one clone);
// across machines they may differ in the last bits (FMA contraction).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GENREP_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define GENREP_HOT
#endif
// No a*b+c -> fma contraction: the clones and the specialisations of one loop (gradients of x
// only, or of x and mu) then round identically, so results do not depend on which gradients were
// asked for nor on the machine's vector width. The loops are memory-bound: fma buys nothing.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace genrep_fast {
namespace {

// Independent partial sums in the inner D loop: enough to hide the add latency (4 cycles) with
// 4-wide SSE or 8-wide AVX vectors, so the loop runs at memory speed. The compiler vectorises the
// fixed-size j loop (-O3) without reassociating anything, so the order is fixed.
constexpr int kLanes = 16;
// Below about this many bank values per task, rows are grouped so that a task is worth a thread.
constexpr int64_t kGrainElems = 1 << 15;
constexpr double kLog2Pi = 1.8378770664093453;

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// (An alias of a member type: a non-deduced context, so nullptr passes for an acc_t* argument.)
template <typename T>
using AccOf = typename AccType<T>::type;

template <typename acc_t>
inline acc_t sum_lanes(acc_t* part) {
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) part[j] += part[j + w];
  return part[0];
}

// sum_d (x_d - mu_d)^2 with x already in the accumulation type. Always inlined, so it is compiled
// for its caller's clone (AVX2 or baseline): left to itself, GCC kept a separate baseline (SSE)
// copy for row_scores' fp16 path, half as fast.
template <typename scalar_t, typename acc_t>
[[gnu::always_inline]] inline acc_t squared_distance(const acc_t* __restrict__ x,
                                                     const scalar_t* __restrict__ mu, int64_t n) {
  acc_t part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t diff = x[d + j] - convert::to_acc<acc_t>(mu[d + j]);
      part[j] += diff * diff;
    }
  }
  for (int j = 0; d < n; ++d, ++j) {
    const acc_t diff = x[d] - convert::to_acc<acc_t>(mu[d]);
    part[j] += diff * diff;
  }
  return sum_lanes(part);
}

// sum_d ((x_d - mu_d) / sigma_d)^2 (diagonal sigma); always inlined, as above.
template <typename scalar_t, typename sigma_t, typename acc_t>
[[gnu::always_inline]] inline acc_t scaled_squared_distance(const acc_t* __restrict__ x,
                                                            const scalar_t* __restrict__ mu,
                                                            const sigma_t* __restrict__ sig,
                                                            int64_t n) {
  acc_t part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t z = (x[d + j] - convert::to_acc<acc_t>(mu[d + j])) /
                      convert::to_acc<acc_t>(sig[d + j]);
      part[j] += z * z;
    }
  }
  for (int j = 0; d < n; ++d, ++j) {
    const acc_t z = (x[d] - convert::to_acc<acc_t>(mu[d])) / convert::to_acc<acc_t>(sig[d]);
    part[j] += z * z;
  }
  return sum_lanes(part);
}

// sum_d log sigma_d. Non-double sigma: sigma = m * 2^e with m in [1, 2) split by bit
// manipulation; the exponents are summed as integers and the mantissas multiplied in double, 16 per
// lane and 16 lanes (a product of 256 mantissas is < 2^256, far inside double; its rounding is
// ~1e-14 relative), so there is one log per 256 values instead of one per value (measured: the
// per-value log took most of the diagonal forward's time). The split and the products are two
// loops over a block: GCC vectorises each (one loop doing both, with float, int and double lanes
// side by side, stayed scalar and took 60% of the diagonal fp32 forward); 16 lanes are four AVX2
// chains of multiplies (8 lanes were two, bound by the multiply's latency: bf16 2x slower).
// Valid for positive, normal, finite sigma (validated by the public API; a subnormal sigma has
// 1/sigma^2 = inf anyway). Double sigma: one log per value.
template <typename sigma_t>
GENREP_HOT double sum_log(const sigma_t* __restrict__ sig, int64_t n) {
  double total = 0.0;
  int64_t d = 0;
  if constexpr (!std::is_same_v<sigma_t, double>) {
    constexpr int kLog = 16, kBlock = 256;
    for (; d + kBlock <= n; d += kBlock) {
      float mant[kBlock];
      int32_t biased_exps = 0;
      for (int i = 0; i < kBlock; ++i) {
        const float v = convert::to_acc<float>(sig[d + i]);
        uint32_t bits;
        std::memcpy(&bits, &v, sizeof(bits));
        biased_exps += static_cast<int32_t>((bits >> 23) & 0xffu);
        bits = (bits & 0x007fffffu) | 0x3f800000u;
        std::memcpy(&mant[i], &bits, sizeof(bits));
      }
      double prod[kLog];
      for (int j = 0; j < kLog; ++j) prod[j] = 1.0;
      for (int i = 0; i < kBlock; i += kLog)
        for (int j = 0; j < kLog; ++j) prod[j] *= static_cast<double>(mant[i + j]);
      double p = 1.0;
      for (int j = 0; j < kLog; ++j) p *= prod[j];
      total += std::log(p) + static_cast<double>(biased_exps - 127 * kBlock) * 0.6931471805599453;
    }
  }
  for (; d < n; ++d) total += std::log(static_cast<double>(sig[d]));
  return total;
}

// Where a row's sigma lives. Isotropic: per-entry tables inv_var = 1/sigma^2 and
// log_norm = -D log sigma - D/2 log 2pi over the canonical [Bs, Cs, T] sigma (Bs in {1, B},
// Cs in {1, C}). Diagonal: sigma has the bank's shape; log_norm = -sum_d log sigma - D/2 log 2pi
// per bank row, precomputed once (a shared bank row is used by many (b, k)).
template <typename acc_t>
struct SigmaTables {
  // Isotropic: [Bs*Cs*T] each. Diagonal: log_norm [C*T] for a shared bank (its rows serve many
  // (b, k)), empty for a per-image bank (computed in the row pass).
  std::vector<acc_t> inv_var, log_norm, sig;
  int64_t bs = 1, cs = 1;
  double half_d_log2pi = 0.0;
};

// The inputs as typed pointers and the sigma tables, for one (mu dtype, sigma dtype) pair.
template <typename scalar_type, typename sigma_type>
struct TypedInputs {
  using scalar_t = scalar_type;
  using sigma_t = sigma_type;
  using acc_t = AccOf<scalar_t>;
  SigmaTables<acc_t> st;
  const scalar_t* x;
  const scalar_t* mu;
  const sigma_t* sig;  // diagonal sigma; null when isotropic (its values live in st)
};

// Accumulation (and output) dtype of the mixture: double for double x, float otherwise.
at::ScalarType acc_scalar_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

struct Geometry {
  int64_t B, C, T, D, K;
  bool per_image, diagonal, has_index;
  const int64_t* cls;  // [B, K] or null

  int64_t class_of(int64_t b, int64_t k) const { return has_index ? cls[b * K + k] : k; }
  // Bank block (C, T) or (B, C, T) of row (b, k): the first bank row of its T rows.
  int64_t block_of(int64_t b, int64_t c) const { return per_image ? b * C + c : c; }
  int64_t num_blocks() const { return per_image ? B * C : C; }
};

template <typename acc_t>
int64_t iso_entry(const SigmaTables<acc_t>& st, const Geometry& g, int64_t b, int64_t c) {
  return ((st.bs > 1 ? b : 0) * st.cs + (st.cs > 1 ? c : 0)) * g.T;
}

// Score of step t from its bank row m and its diagonal sigma row sg (unused when isotropic), rows
// of any element type: row_scores passes the bank's own rows or float copies of them. Always
// inlined, so it is compiled for row_scores' clone.
template <typename acc_t, typename mrow_t, typename srow_t>
[[gnu::always_inline]] inline void step_score(const Geometry& g, const SigmaTables<acc_t>& st,
                                              const acc_t* xa, int64_t blk, int64_t e, int64_t t,
                                              const mrow_t* m, const srow_t* sg, acc_t* s,
                                              acc_t* q) {
  if (g.diagonal) {
    const acc_t qt = scaled_squared_distance(xa, m, sg, g.D);
    if (q) q[t] = qt;
    // Per-image bank: the log-determinant here, while the sigma row is in L1 (a separate pass
    // would read diagonal sigma from memory twice); shared bank: from the table.
    const acc_t log_norm = st.log_norm.empty()
                               ? static_cast<acc_t>(-sum_log(sg, g.D) - st.half_d_log2pi)
                               : st.log_norm[blk * g.T + t];
    s[t] = acc_t(-0.5) * qt + log_norm;
  } else {
    const acc_t qt = squared_distance(xa, m, g.D);
    if (q) q[t] = qt;
    s[t] = acc_t(-0.5) * qt * st.inv_var[e + t] + st.log_norm[e + t];
  }
}

// fp16 rows through F16C (x86-64 with GCC or Clang, picked at run time). The exact conversion of
// csrc/elem_convert.h (bit operations with subnormal, normal and special paths blended, so that
// every clone vectorises) cost more than the distance itself: fp16 ran at half bf16's bandwidth
// with isotropic sigma. Where the CPU has AVX2 and F16C, row_scores converts each fp16 bank (and
// diagonal sigma) row to float into a buffer in L1 with vcvtph2ps (exact for every value,
// subnormals included, so the scores are the same bits) and scores the copies.
#ifdef GENREP_FAST_X86_F16C
__attribute__((target("avx2,f16c"))) void half_row_to_float(const c10::Half* src, float* dst,
                                                            int64_t n) {
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) _mm256_storeu_ps(dst + d, isa::load8_half(src + d));
  for (; d < n; ++d) dst[d] = convert::to_acc<float>(src[d]);
}
#endif

// The T scores of row (b, k) into s (and the quadratic terms into q if non-null). The forward
// and the backward both call this, so their scores are bitwise identical.
template <typename scalar_t, typename sigma_t>
GENREP_HOT void row_scores(const Geometry& g, const TypedInputs<scalar_t, sigma_t>& in,
                           const AccOf<scalar_t>* xa, int64_t b, int64_t c, AccOf<scalar_t>* s,
                           AccOf<scalar_t>* q) {
  const int64_t blk = g.block_of(b, c);
  const int64_t e = g.diagonal ? 0 : iso_entry(in.st, g, b, c);
  const scalar_t* mu_blk = in.mu + blk * g.T * g.D;
  const sigma_t* sig_blk = g.diagonal ? in.sig + blk * g.T * g.D : nullptr;
#ifdef GENREP_FAST_X86_F16C
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (isa::has_avx2_f16c()) {
      // One row of each, reused over the T steps. (A thread_local scratch instead measured
      // 10-20% slower here; likely its TLS lookups from a shared object.)
      constexpr bool kHalfSigma = std::is_same_v<sigma_t, c10::Half>;
      std::vector<float> mrow(g.D), srow(kHalfSigma && g.diagonal ? g.D : 0);
      float* const mr = mrow.data();
      float* const sr = srow.data();
      for (int64_t t = 0; t < g.T; ++t) {
        half_row_to_float(mu_blk + t * g.D, mr, g.D);
        const sigma_t* sig_row = g.diagonal ? sig_blk + t * g.D : nullptr;
        if constexpr (kHalfSigma) {
          if (g.diagonal) {
            half_row_to_float(sig_row, sr, g.D);
            step_score(g, in.st, xa, blk, e, t, mr, sr, s, q);
            continue;
          }
        }
        step_score(g, in.st, xa, blk, e, t, mr, sig_row, s, q);
      }
      return;
    }
  }
#endif
  for (int64_t t = 0; t < g.T; ++t) {
    step_score(g, in.st, xa, blk, e, t, mu_blk + t * g.D,
               g.diagonal ? sig_blk + t * g.D : nullptr, s, q);
  }
}

// Max and normaliser l = sum_t exp(s_t - m) of T scores. m = -inf (every density underflowed)
// or NaN is returned as is; the caller handles it.
template <typename acc_t>
void max_and_normaliser(const acc_t* s, int64_t T, acc_t& m, acc_t& l) {
  m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t t = 0; t < T; ++t) {
    if (std::isnan(s[t])) {
      m = s[t];
      l = s[t];
      return;
    }
    m = std::max(m, s[t]);
  }
  l = 0;
  if (m == -std::numeric_limits<acc_t>::infinity()) return;
  for (int64_t t = 0; t < T; ++t) l += std::exp(s[t] - m);
}

// Gradient contributions of one bank row (step t), isotropic sigma: v_d = coef * (x_d - mu_d)
// with coef = w / sigma^2 (ds/dmu = (x - mu) / sigma^2 = -ds/dx); gx -= v, gm = v or gm += v.
template <bool kX, bool kMu, bool kAdd, typename scalar_t, typename acc_t>
GENREP_HOT void iso_step_grad(const acc_t* __restrict__ xa, const scalar_t* __restrict__ mt,
                              acc_t coef, int64_t n, acc_t* __restrict__ gx,
                              acc_t* __restrict__ gm) {
  for (int64_t d = 0; d < n; ++d) {
    const acc_t v = coef * (xa[d] - convert::to_acc<acc_t>(mt[d]));
    if constexpr (kX) gx[d] -= v;
    if constexpr (kMu) gm[d] = kAdd ? gm[d] + v : v;
  }
}

// Diagonal sigma: z = (x - mu) / sigma, v = w z / sigma (ds/dmu), u = w (z^2 - 1) / sigma
// (ds/dsigma = (x - mu)^2 / sigma^3 - 1 / sigma).
template <bool kX, bool kMu, bool kSig, bool kAdd, typename scalar_t, typename sigma_t,
          typename acc_t>
GENREP_HOT void diag_step_grad(const acc_t* __restrict__ xa, const scalar_t* __restrict__ mt,
                               const sigma_t* __restrict__ sg, acc_t w, int64_t n,
                               acc_t* __restrict__ gx, acc_t* __restrict__ gm,
                               acc_t* __restrict__ gs) {
  for (int64_t d = 0; d < n; ++d) {
    const acc_t sd = convert::to_acc<acc_t>(sg[d]);
    const acc_t z = (xa[d] - convert::to_acc<acc_t>(mt[d])) / sd;
    const acc_t v = w * z / sd;
    if constexpr (kX) gx[d] -= v;
    if constexpr (kMu) gm[d] = kAdd ? gm[d] + v : v;
    if constexpr (kSig) {
      const acc_t u = w * (z * z - acc_t(1)) / sd;
      gs[d] = kAdd ? gs[d] + u : u;
    }
  }
}

// Runtime flags -> the template above (its loops then have no branches).
template <typename scalar_t, typename sigma_t, typename acc_t>
void step_grad(bool diagonal, const acc_t* xa, const scalar_t* mt, const sigma_t* sg, acc_t w,
               acc_t coef, int64_t n, acc_t* gx, acc_t* gm, acc_t* gs, bool add) {
  const int key = (gx ? 1 : 0) | (gm ? 2 : 0) | (gs ? 4 : 0) | (add ? 8 : 0);
  if (!diagonal) {
    switch (key & 11) {
      case 1: case 9: return iso_step_grad<true, false, false>(xa, mt, coef, n, gx, gm);
      case 2: return iso_step_grad<false, true, false>(xa, mt, coef, n, gx, gm);
      case 10: return iso_step_grad<false, true, true>(xa, mt, coef, n, gx, gm);
      case 3: return iso_step_grad<true, true, false>(xa, mt, coef, n, gx, gm);
      case 11: return iso_step_grad<true, true, true>(xa, mt, coef, n, gx, gm);
      default: return;
    }
  }
#define GENREP_DIAG(X, M, S)                                                              \
  return add ? diag_step_grad<X, M, S, true>(xa, mt, sg, w, n, gx, gm, gs)                \
             : diag_step_grad<X, M, S, false>(xa, mt, sg, w, n, gx, gm, gs)
  switch (key & 7) {
    case 1: GENREP_DIAG(true, false, false);
    case 2: GENREP_DIAG(false, true, false);
    case 3: GENREP_DIAG(true, true, false);
    case 4: GENREP_DIAG(false, false, true);
    case 5: GENREP_DIAG(true, false, true);
    case 6: GENREP_DIAG(false, true, true);
    case 7: GENREP_DIAG(true, true, true);
    default: return;
  }
#undef GENREP_DIAG
}

// src[0:n] into dst in the accumulation type (one image of x, converted once per row).
template <typename scalar_t, typename acc_t>
void copy_to_acc(const scalar_t* src, acc_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = convert::to_acc<acc_t>(src[i]);
}

template <typename sigma_t, typename acc_t>
SigmaTables<acc_t> make_tables(const Geometry& g, const at::Tensor& sigma) {
  SigmaTables<acc_t> st;
  const double half_d_log2pi = 0.5 * static_cast<double>(g.D) * kLog2Pi;
  st.half_d_log2pi = half_d_log2pi;
  if (g.diagonal && g.per_image) return st;
  if (g.diagonal) {
    const sigma_t* sig = sigma.data_ptr<sigma_t>();
    const int64_t rows = g.num_blocks() * g.T;
    st.log_norm.resize(rows);
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(g.D, 1));
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        st.log_norm[r] = static_cast<acc_t>(-sum_log(sig + r * g.D, g.D) - half_d_log2pi);
    });
    return st;
  }
  // Isotropic sigma arrives as [Bs, Cs, T] in the accumulation type (posterior_torch converts it).
  st.bs = sigma.size(0);
  st.cs = sigma.size(1);
  const int64_t n = sigma.numel();
  const acc_t* sig = sigma.data_ptr<acc_t>();
  st.inv_var.resize(n);
  st.log_norm.resize(n);
  st.sig.assign(sig, sig + n);
  for (int64_t i = 0; i < n; ++i) {
    st.inv_var[i] = acc_t(1) / (sig[i] * sig[i]);
    st.log_norm[i] = static_cast<acc_t>(-static_cast<double>(g.D) * std::log(double(sig[i])) -
                                        half_d_log2pi);
  }
  return st;
}

// Bad arguments raise ValueError (TORCH_CHECK_VALUE: shapes, ranges, devices) or TypeError
// (TORCH_CHECK_TYPE: dtypes), as the Python API does; these guard direct calls through
// torch.ops.genrep_fast.
Geometry check_inputs(const char* op, const at::Tensor& x, const at::Tensor& mu,
                      const at::Tensor& sigma, const std::optional<at::Tensor>& class_index) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be [B, D], got ", x.sizes());
  TORCH_CHECK_VALUE(mu.dim() == 3 || mu.dim() == 4, op,
                    ": mu must be [C, T, D] or [B, C, T, D], got ", mu.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(mu.scalar_type() == x.scalar_type(), op, ": mu dtype ", mu.scalar_type(),
                   " differs from x dtype ", x.scalar_type());
  Geometry g{};
  g.per_image = mu.dim() == 4;
  g.B = x.size(0);
  g.D = x.size(1);
  g.C = mu.size(g.per_image ? 1 : 0);
  g.T = mu.size(g.per_image ? 2 : 1);
  TORCH_CHECK_VALUE(mu.size(-1) == g.D && (!g.per_image || mu.size(0) == g.B), op,
                    ": mu ", mu.sizes(), " does not match x ", x.sizes());
  TORCH_CHECK_VALUE(g.T >= 1 && g.C >= 1, op, ": need C >= 1 and T >= 1, got mu ", mu.sizes());
  g.diagonal = sigma.dim() == mu.dim() && sigma.sizes() == mu.sizes();
  if (!g.diagonal) {
    const at::ScalarType acc = acc_scalar_type(x);
    TORCH_CHECK_VALUE(sigma.dim() == 3 && sigma.size(2) == g.T &&
                          (sigma.size(0) == 1 || (g.per_image && sigma.size(0) == g.B)) &&
                          (sigma.size(1) == 1 || sigma.size(1) == g.C),
                      op, ": isotropic sigma must be [Bs, Cs, T] with Bs in {1, B (per-image bank)}, "
                      "Cs in {1, C}; got ", sigma.sizes());
    TORCH_CHECK_TYPE(sigma.scalar_type() == acc, op, ": isotropic sigma must be ", acc, ", got ",
                     sigma.scalar_type());
  } else {
    const at::ScalarType acc = acc_scalar_type(x);
    TORCH_CHECK_TYPE(sigma.scalar_type() == x.scalar_type() || sigma.scalar_type() == acc, op,
                     ": diagonal sigma must have the dtype of mu or ", acc, ", got ",
                     sigma.scalar_type());
  }
  g.has_index = class_index.has_value() && class_index->defined();
  g.K = g.C;
  g.cls = nullptr;
  if (g.has_index) {
    const at::Tensor& ci = *class_index;
    TORCH_CHECK_TYPE(ci.scalar_type() == at::kLong, op, ": class_index must be int64, got ",
                     ci.scalar_type());
    TORCH_CHECK_VALUE(ci.dim() == 2 && ci.size(0) == g.B, op, ": class_index must be [B, K] = [",
                      g.B, ", K], got ", ci.sizes());
    g.K = ci.size(1);
  }
  for (const at::Tensor* t : {&x, &mu, &sigma})
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": expects CPU tensors, got one on ", t->device());
  return g;
}

// Copies of the inputs as contiguous tensors (no copy when already contiguous) and the indices.
struct Inputs {
  at::Tensor x, mu, sigma, cls;
};

// Also points g.cls at the validated indices.
Inputs contiguous_inputs(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& sigma,
                         const std::optional<at::Tensor>& class_index, Geometry& g) {
  Inputs in{x.contiguous(), mu.contiguous(), sigma.contiguous(), at::Tensor()};
  if (g.has_index) {
    in.cls = class_index->contiguous();
    const int64_t* p = in.cls.data_ptr<int64_t>();
    for (int64_t i = 0; i < in.cls.numel(); ++i)
      TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < g.C, "mixture_ll_diff: class_index value ", p[i],
                        " outside [0, ", g.C, ")");
    g.cls = p;
  }
  return in;
}

template <typename scalar_t, typename sigma_t>
TypedInputs<scalar_t, sigma_t> typed_inputs(const Geometry& g, const Inputs& in) {
  using acc_t = typename AccType<scalar_t>::type;
  return {make_tables<sigma_t, acc_t>(g, in.sigma), in.x.data_ptr<scalar_t>(),
          in.mu.data_ptr<scalar_t>(), g.diagonal ? in.sigma.data_ptr<sigma_t>() : nullptr};
}

// Calls f(TypedInputs<scalar_t, sigma_t>) for the dtype of mu and of (diagonal) sigma (a generic
// lambda: C++17, no template lambdas).
template <typename F>
void dispatch_types(const Geometry& g, const Inputs& in, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.mu.scalar_type(),
                                  "mixture_ll_diff", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    if (!g.diagonal || in.sigma.scalar_type() == in.mu.scalar_type()) {
      f(typed_inputs<scalar_t, scalar_t>(g, in));
    } else {
      f(typed_inputs<scalar_t, acc_t>(g, in));
    }
  });
}

at::Tensor mixture_ll_diff_cpu(const at::Tensor& x_in, const at::Tensor& mu_in,
                               const at::Tensor& sigma_in,
                               const std::optional<at::Tensor>& class_index) {
  Geometry g = check_inputs("mixture_ll_diff", x_in, mu_in, sigma_in, class_index);
  Inputs in = contiguous_inputs(x_in, mu_in, sigma_in, class_index, g);
  const at::ScalarType acc_type = acc_scalar_type(x_in);
  at::Tensor out = at::empty({g.B, g.K}, x_in.options().dtype(acc_type));
  if (out.numel() == 0) return out;
  dispatch_types(g, in, [&](const auto& typed) {
    using acc_t = typename std::decay_t<decltype(typed)>::acc_t;
    acc_t* o = out.data_ptr<acc_t>();
    const acc_t log_t = static_cast<acc_t>(std::log(static_cast<double>(g.T)));
    const int64_t rows = g.B * g.K;
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(g.T * g.D, 1));
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> xa(g.D), s(g.T);
      int64_t x_row = -1;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / g.K, k = r % g.K;
        if (b != x_row) {  // consecutive rows of one image share x
          copy_to_acc(typed.x + b * g.D, xa.data(), g.D);
          x_row = b;
        }
        row_scores(g, typed, xa.data(), b, g.class_of(b, k), s.data(), nullptr);
        acc_t m, l;
        max_and_normaliser(s.data(), g.T, m, l);
        o[r] = (std::isnan(m) || std::isinf(m)) ? m : m + std::log(l) - log_t;
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_ll_diff_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& mu_in,
    const at::Tensor& sigma_in, const std::optional<at::Tensor>& class_index, bool need_x,
    bool need_mu, bool need_sigma) {
  Geometry g = check_inputs("mixture_ll_diff_backward", x_in, mu_in, sigma_in, class_index);
  Inputs in = contiguous_inputs(x_in, mu_in, sigma_in, class_index, g);
  const at::ScalarType acc_type = acc_scalar_type(x_in);
  TORCH_CHECK_VALUE(grad_in.dim() == 2 && grad_in.size(0) == g.B && grad_in.size(1) == g.K,
                    "mixture_ll_diff_backward: grad must be [B, K] = [", g.B, ", ", g.K, "], got ",
                    grad_in.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(grad_in.scalar_type()),
                   "mixture_ll_diff_backward: grad must be floating point, got ",
                   grad_in.scalar_type());
  TORCH_CHECK_VALUE(grad_in.device().is_cpu(),
                    "mixture_ll_diff_backward: expects CPU tensors, grad is on ", grad_in.device());
  const at::Tensor grad = grad_in.to(acc_type).contiguous();
  at::Tensor gx = need_x ? at::empty_like(in.x) : at::empty({0}, x_in.options());
  at::Tensor gmu = need_mu ? at::empty_like(in.mu) : at::empty({0}, x_in.options());
  // Isotropic sigma: [Bs, Cs, T] in the accumulation type (as it came in), summed into; diagonal:
  // its shape and dtype, every block written once by its owner.
  at::Tensor gsig = !need_sigma ? at::empty({0}, x_in.options())
                    : g.diagonal ? at::empty_like(in.sigma)
                                 : at::zeros_like(in.sigma);
  const bool diag_sigma_grad = need_sigma && g.diagonal;
  const bool pass2 = need_x || need_mu || diag_sigma_grad;

  dispatch_types(g, in, [&](const auto& typed) {
    using Typed = std::decay_t<decltype(typed)>;
    using scalar_t = typename Typed::scalar_t;
    using sigma_t = typename Typed::sigma_t;
    using acc_t = typename Typed::acc_t;
    const SigmaTables<acc_t>& st = typed.st;
    const acc_t* gr = grad.data_ptr<acc_t>();
    const int64_t rows = g.B * g.K, TD = g.T * g.D;

    // Rows grouped by the bank block they read (and whose gradient they write), each group in
    // ascending row order (counting sort): one thread owns a block.
    const int64_t nblk = g.num_blocks();
    std::vector<int64_t> start(nblk + 1, 0), order(rows);
    for (int64_t r = 0; r < rows; ++r)
      ++start[g.block_of(r / g.K, g.class_of(r / g.K, r % g.K)) + 1];
    for (int64_t i = 0; i < nblk; ++i) start[i + 1] += start[i];
    {
      std::vector<int64_t> fill(start.begin(), start.end() - 1);
      for (int64_t r = 0; r < rows; ++r)
        order[fill[g.block_of(r / g.K, g.class_of(r / g.K, r % g.K))]++] = r;
    }
    // Per-row partials: the x gradient [rows, D] and the isotropic sigma gradient [rows, T],
    // reduced in row order below (B*K*D values: 1/T of what a gathered bank would take).
    std::vector<acc_t> gx_part(need_x ? rows * g.D : 0);
    std::vector<acc_t> gsig_part(need_sigma && !g.diagonal ? rows * g.T : 0);
    scalar_t* gmu_p = need_mu ? gmu.data_ptr<scalar_t>() : nullptr;
    sigma_t* gsd_p = diag_sigma_grad ? gsig.data_ptr<sigma_t>() : nullptr;
    constexpr bool mu_in_place = std::is_same_v<scalar_t, acc_t>;
    constexpr bool sig_in_place = std::is_same_v<sigma_t, acc_t>;

    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(TD, 1));
    at::parallel_for(0, nblk, grain, [&](int64_t k0, int64_t k1) {
      std::vector<acc_t> xa(g.D), s(g.T), q(g.T);
      // Accumulators of a block's gradients when the output type is narrower than acc_t.
      std::vector<acc_t> mu_buf(need_mu && !mu_in_place ? TD : 0);
      std::vector<acc_t> sig_buf(diag_sigma_grad && !sig_in_place ? TD : 0);
      for (int64_t blk = k0; blk < k1; ++blk) {
        acc_t* gm_acc = nullptr;
        acc_t* gs_acc = nullptr;
        if (need_mu) {
          if constexpr (mu_in_place) gm_acc = gmu_p + blk * TD;
          else gm_acc = mu_buf.data();
        }
        if (diag_sigma_grad) {
          if constexpr (sig_in_place) gs_acc = gsd_p + blk * TD;
          else gs_acc = sig_buf.data();
        }
        const int64_t n_rows = start[blk + 1] - start[blk];
        if (n_rows == 0) {  // a class no row selected: zero gradient
          if (gm_acc) std::fill(gm_acc, gm_acc + TD, acc_t(0));
          if (gs_acc) std::fill(gs_acc, gs_acc + TD, acc_t(0));
        }
        const scalar_t* mu_blk = typed.mu + blk * TD;
        const sigma_t* sig_blk = g.diagonal ? typed.sig + blk * TD : nullptr;
        for (int64_t i = start[blk]; i < start[blk + 1]; ++i) {
          const int64_t r = order[i], b = r / g.K, k = r % g.K, c = g.class_of(b, k);
          const bool first = i == start[blk];
          copy_to_acc(typed.x + b * g.D, xa.data(), g.D);
          row_scores(g, typed, xa.data(), b, c, s.data(), q.data());
          acc_t m, l;
          max_and_normaliser(s.data(), g.T, m, l);
          // An entry of -inf (every step of zero density) passes no gradient; a NaN entry passes
          // NaN (docs/METHOD.md, "Non-finite values").
          const bool flat = m == -std::numeric_limits<acc_t>::infinity();
          acc_t* gxr = need_x ? gx_part.data() + r * g.D : nullptr;
          if (gxr) std::fill(gxr, gxr + g.D, acc_t(0));
          const int64_t e = g.diagonal ? 0 : iso_entry(st, g, b, c);
          for (int64_t t = 0; t < g.T; ++t) {
            // w_t * dL/dll: the mixture weight of step t times the incoming gradient.
            const acc_t w = flat ? acc_t(0) : std::exp(s[t] - m) / l * gr[r];
            if (w == acc_t(0)) {
              // The step adds nothing, even where its terms are infinite (0 * inf is NaN); the
              // first row of a block still writes its zeros.
              if (!g.diagonal && need_sigma) gsig_part[r * g.T + t] = acc_t(0);
              if (!first) continue;
              if (gm_acc) std::fill(gm_acc + t * g.D, gm_acc + (t + 1) * g.D, acc_t(0));
              if (gs_acc) std::fill(gs_acc + t * g.D, gs_acc + (t + 1) * g.D, acc_t(0));
              continue;
            }
            if (!g.diagonal && need_sigma) {
              // ds/dsigma = |x - mu|^2 / sigma^3 - D / sigma
              const acc_t iv = st.inv_var[e + t];
              gsig_part[r * g.T + t] =
                  w * (q[t] * iv - static_cast<acc_t>(g.D)) / st.sig[e + t];
            }
            if (!pass2) continue;
            const acc_t coef = g.diagonal ? acc_t(0) : w * st.inv_var[e + t];
            step_grad<scalar_t, sigma_t, acc_t>(
                g.diagonal, xa.data(), mu_blk + t * g.D, g.diagonal ? sig_blk + t * g.D : nullptr,
                w, coef, g.D, gxr, gm_acc ? gm_acc + t * g.D : nullptr,
                gs_acc ? gs_acc + t * g.D : nullptr, !first);
          }
        }
        if constexpr (!mu_in_place) {
          if (need_mu)
            for (int64_t j = 0; j < TD; ++j) gmu_p[blk * TD + j] = static_cast<scalar_t>(mu_buf[j]);
        }
        if constexpr (!sig_in_place) {
          if (diag_sigma_grad)
            for (int64_t j = 0; j < TD; ++j) gsd_p[blk * TD + j] = static_cast<sigma_t>(sig_buf[j]);
        }
      }
    });

    if (need_x) {  // sum over k in order
      scalar_t* gxo = gx.data_ptr<scalar_t>();
      at::parallel_for(0, g.B, 1, [&](int64_t b0, int64_t b1) {
        std::vector<acc_t> acc(g.D);
        for (int64_t b = b0; b < b1; ++b) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t k = 0; k < g.K; ++k) {
            const acc_t* p = gx_part.data() + (b * g.K + k) * g.D;
            for (int64_t d = 0; d < g.D; ++d) acc[d] += p[d];
          }
          for (int64_t d = 0; d < g.D; ++d) gxo[b * g.D + d] = static_cast<scalar_t>(acc[d]);
        }
      });
    }
    if (need_sigma && !g.diagonal) {  // rows into [Bs, Cs, T], in row order
      acc_t* gso = gsig.data_ptr<acc_t>();
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = r / g.K, c = g.class_of(b, r % g.K);
        acc_t* dst = gso + iso_entry(st, g, b, c);
        for (int64_t t = 0; t < g.T; ++t) dst[t] += gsig_part[r * g.T + t];
      }
    }
  });
  return {gx, gmu, gsig};
}

}  // namespace

TORCH_LIBRARY_IMPL(genrep_fast, CPU, m) {
  m.impl("mixture_ll_diff", &mixture_ll_diff_cpu);
  m.impl("mixture_ll_diff_backward", &mixture_ll_diff_backward_cpu);
}

}  // namespace genrep_fast
