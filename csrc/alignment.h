// Shared pieces of the gradient-alignment ops (docs/METHOD.md section 3): the per-group coefficients and
// the argument checks, used by the CPU kernels (alignment_cpu.cpp) and the CUDA kernels
// (cuda/alignment_cuda.cu) so that both compute exactly the same a, b.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#if defined(__CUDACC__)
#define GENREP_HD __host__ __device__ __forceinline__
#else
#define GENREP_HD inline
#endif

namespace genrep_fast {

// Which gradient gets its projection onto the other scaled by alpha (reference.ALIGN_MODES).
enum AlignMode : int32_t { kSymmetric = 0, kGeneration = 1, kPerception = 2, kNone = 3 };

inline AlignMode parse_align_mode(const std::string& mode) {
  if (mode == "symmetric") return kSymmetric;
  if (mode == "generation") return kGeneration;
  if (mode == "perception") return kPerception;
  if (mode == "none") return kNone;
  TORCH_CHECK_VALUE(false, "align_combine: mode must be one of symmetric, generation, perception, ",
                    "none; got '", mode, "'");
}

struct AlignParams {
  double k, w_p, w_g;
  int32_t mode;
};

// (a, b) of one group from (d, pp, gg) = (<p,g>, |p|^2, |g|^2), mirroring
// reference.alignment_coefficients step by step (so the CPU and CUDA ops agree with it to the last
// bit up to pow's rounding). Group -1 (in no group) is the alpha = 1 case: a = w_p, b = w_g.
// Doubles throughout: when one gradient is tiny, d / |p|^2 exceeds the float range although
// a * p stays moderate.
GENREP_HD void align_coefficients(const double* sums, int64_t group, const AlignParams& prm,
                                  double* a_out, double* b_out) {
  if (group < 0) {
    *a_out = prm.w_p;
    *b_out = prm.w_g;
    return;
  }
  using std::isfinite;
  using std::pow;
  using std::sqrt;
  const double d = sums[3 * group + 0], pp = sums[3 * group + 1], gg = sums[3 * group + 2];
  if (!(isfinite(d) && isfinite(pp) && isfinite(gg))) {
    // A non-finite group must give a non-finite update so that a grad scaler skips the step.
    const double nan = std::numeric_limits<double>::quiet_NaN();
    *a_out = nan;
    *b_out = nan;
    return;
  }
  // sqrt(pp) * sqrt(gg), not sqrt(pp * gg): the product under- or overflows first.
  const double norm_prod = sqrt(pp) * sqrt(gg);
  double cos = norm_prod > 0.0 ? d / norm_prod : 0.0;
  // |cos| can exceed 1 by a rounding error; alpha's base must stay in [0, 1].
  cos = cos < -1.0 ? -1.0 : (cos > 1.0 ? 1.0 : cos);
  const double alpha = pow((cos + 1.0) * 0.5, prm.k);
  const double proj_on_p = pp > 0.0 ? d / pp : 0.0;  // par_g = proj_on_p * p
  const double proj_on_g = gg > 0.0 ? d / gg : 0.0;  // par_p = proj_on_g * g
  const bool align_a = prm.mode == kSymmetric || prm.mode == kGeneration;
  const bool align_b = prm.mode == kSymmetric || prm.mode == kPerception;
  *a_out = align_a ? prm.w_p + prm.w_g * (alpha - 1.0) * proj_on_p : prm.w_p;
  *b_out = align_b ? prm.w_g + prm.w_p * (alpha - 1.0) * proj_on_g : prm.w_g;
}

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;

// The tensor of pair i that is present (p[i] if given, else g[i]); undefined if both are None.
inline at::Tensor present_of(const OptionalTensorList& p, const OptionalTensorList& g, size_t i) {
  const std::optional<at::Tensor> pi = p[i];
  if (pi.has_value() && pi->defined()) return *pi;
  const std::optional<at::Tensor> gi = g[i];
  if (gi.has_value() && gi->defined()) return *gi;
  return at::Tensor();
}

inline at::Tensor get_or_undefined(const OptionalTensorList& list, size_t i) {
  const std::optional<at::Tensor> t = list[i];
  return t.has_value() ? *t : at::Tensor();
}

// A contiguous copy (or the tensor itself) of a defined tensor; an undefined one (a missing
// gradient) stays undefined. Both devices' kernels read their lists through it.
inline at::Tensor contiguous_or_undefined(const at::Tensor& t) {
  return t.defined() ? t.contiguous() : at::Tensor();
}

// Checks shared by both ops and both devices. The Python layer checks the same things first with
// friendlier messages; these guard direct calls through torch.ops.genrep_fast.
inline void check_align_lists(const char* op, const OptionalTensorList& p,
                              const OptionalTensorList& g, at::IntArrayRef group_ids,
                              int64_t num_groups, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(p.size() == g.size(), op, ": p and g must have the same length, got ",
                    p.size(), " and ", g.size());
  TORCH_CHECK_VALUE(group_ids.size() == p.size(), op, ": group_ids must have one entry per tensor (",
                    p.size(), "), got ", group_ids.size());
  TORCH_CHECK_VALUE(num_groups >= 0, op, ": num_groups must be >= 0, got ", num_groups);
  for (size_t i = 0; i < p.size(); ++i) {
    const at::Tensor pi = get_or_undefined(p, i), gi = get_or_undefined(g, i);
    for (const at::Tensor* t : {&pi, &gi}) {
      if (!t->defined()) continue;
      TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), op, ": tensor ", i,
                       " must be floating point, got ", t->scalar_type());
      TORCH_CHECK_VALUE(t->device().type() == device_type, op, ": tensor ", i, " is on ",
                        t->device(), ", expected a ", c10::DeviceTypeName(device_type),
                        " tensor");
    }
    if (pi.defined() && gi.defined()) {
      TORCH_CHECK_VALUE(pi.sizes() == gi.sizes(), op, ": p[", i, "] and g[", i,
                        "] differ in shape: ", pi.sizes(), " vs ", gi.sizes());
      TORCH_CHECK_TYPE(pi.scalar_type() == gi.scalar_type(), op, ": p[", i, "] and g[", i,
                       "] differ in dtype: ", pi.scalar_type(), " vs ", gi.scalar_type());
      TORCH_CHECK_VALUE(pi.device() == gi.device(), op, ": p[", i, "] and g[", i,
                        "] are on different devices: ", pi.device(), " vs ", gi.device());
    }
    TORCH_CHECK_VALUE(group_ids[i] >= -1 && group_ids[i] < num_groups, op, ": group_ids[", i,
                      "] = ", group_ids[i], " is out of range [-1, ", num_groups, ")");
  }
}

// The sums table of align_combine, checked before the lists: the number of groups (hence the range
// of group_ids) is read from it.
inline void check_sums(const at::Tensor& sums, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(sums.dim() == 2 && sums.size(1) == 3, "align_combine: sums must be [G, 3], got ",
                    sums.sizes());
  TORCH_CHECK_TYPE(sums.scalar_type() == at::kDouble, "align_combine: sums must be float64, got ",
                   sums.scalar_type());
  TORCH_CHECK_VALUE(sums.device().type() == device_type, "align_combine: sums is on ",
                    sums.device(), ", expected a ", c10::DeviceTypeName(device_type), " tensor");
}

// Extra checks of align_combine: the output list (after check_sums).
inline void check_combine_args(const OptionalTensorList& p, const OptionalTensorList& g,
                               const at::Tensor& sums, at::TensorList out,
                               c10::DeviceType device_type) {
  check_sums(sums, device_type);
  TORCH_CHECK_VALUE(out.size() == p.size(), "align_combine: out must have one tensor per pair (",
                    p.size(), "), got ", out.size());
  for (size_t i = 0; i < out.size(); ++i) {
    const at::Tensor src = present_of(p, g, i);
    if (!src.defined()) {
      TORCH_CHECK_TYPE(at::isFloatingType(out[i].scalar_type()), "align_combine: out[", i,
                       "] must be floating point, got ", out[i].scalar_type());
      continue;
    }
    TORCH_CHECK_VALUE(out[i].sizes() == src.sizes(), "align_combine: out[", i, "] has shape ",
                      out[i].sizes(), ", the gradients have ", src.sizes());
    TORCH_CHECK_TYPE(out[i].scalar_type() == src.scalar_type(), "align_combine: out[", i,
                     "] has dtype ", out[i].scalar_type(), ", the gradients have ",
                     src.scalar_type());
    TORCH_CHECK_VALUE(out[i].device() == src.device(), "align_combine: out[", i, "] is on ",
                      out[i].device(), ", the gradients on ", src.device());
  }
}

// The per-step metadata pass of GradientAligner (csrc/grad_layout.cpp): the layout code of the two
// gradient lists and, per position, where the update may be written (0: p[i], 1: g[i], -1: a
// fresh buffer, -2: nowhere). Reads metadata only: the CPU and the CUDA kernel alike.
std::tuple<std::string, std::vector<int64_t>> grad_layout(const OptionalTensorList& p,
                                                         const OptionalTensorList& g);

}  // namespace genrep_fast
