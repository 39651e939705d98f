// The per-step bookkeeping of a GradientAligner step in one native pass over the two gradient
// lists (genrep_fast/alignment.py, GradientAligner._prepare): what Python did per tensor with
// about ten attribute calls each (0.56 ms for 291 tensor pairs on the 2-core CPU machine) is a
// loop over metadata here. It reads metadata only (no data): the same function is the CPU kernel
// (registered below) and the CUDA one (csrc/cuda/alignment_cuda.cu).
#include <torch/library.h>

#include <ATen/ATen.h>

#include "alignment.h"

#include <cstdint>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace genrep_fast {
namespace {

std::optional<at::Tensor> entry(const OptionalTensorList& list, size_t i) {
  const std::optional<at::Tensor> t = list.get(i);
  if (t.has_value() && t->defined()) return t;
  return std::nullopt;
}

// Appends the layout code of one gradient, numbers separated by ',' and entries by ';': "-" for a
// missing one, else (ndim, sizes..., dtype, device type, device index, layout). Prefix-coded: two
// lists give the same code exactly when every entry has the same presence, shape, dtype, device
// and layout. A string (not a tensor) so that reading it is no tensor read on the host.
void encode(std::string& code, const std::optional<at::Tensor>& t) {
  if (!t.has_value()) {
    code += "-;";
    return;
  }
  auto put = [&code](int64_t v) {
    code += std::to_string(v);
    code += ',';
  };
  put(t->dim());
  for (int64_t s : t->sizes()) put(s);
  put(static_cast<int64_t>(t->scalar_type()));
  put(static_cast<int64_t>(t->device().type()));
  put(static_cast<int64_t>(t->device().index()));
  put(static_cast<int64_t>(t->layout()));
  code += ';';
}

// Whether t may take the update in place: contiguous, covering its whole storage, and its storage
// held by entry i alone (autograd may hand one buffer to two parameters, or an expanded one).
bool writable(const at::Tensor& t, size_t i,
              const std::unordered_map<const void*, int64_t>& owner) {
  if (!t.is_contiguous()) return false;
  const auto& storage = t.storage();
  if (storage.nbytes() != static_cast<size_t>(t.numel()) * t.element_size()) return false;
  return owner.at(storage.data()) == static_cast<int64_t>(i);
}

}  // namespace

// (layout code, choice per position): choice 0 writes the update into p[i],
// 1 into g[i], -1 into a fresh buffer, -2 nowhere (both gradients missing). The same choices as
// alignment._writable_outputs (the Python fallback), which tests/test_alignment_layout.py checks.
std::tuple<std::string, std::vector<int64_t>> grad_layout(const OptionalTensorList& p,
                                                         const OptionalTensorList& g) {
  TORCH_CHECK(p.size() == g.size(), "grad_layout: p and g differ in length (", p.size(), " vs ",
              g.size(), ")");
  const size_t n = p.size();
  std::string code;
  code.reserve(n * 40);
  // Storage -> the one position holding it, or -2 when two positions do.
  std::unordered_map<const void*, int64_t> owner;
  owner.reserve(2 * n);
  for (size_t i = 0; i < n; ++i) {
    for (const auto& t : {entry(p, i), entry(g, i)}) {
      encode(code, t);
      if (!t.has_value()) continue;
      const void* key = t->storage().data();
      auto [it, inserted] = owner.emplace(key, static_cast<int64_t>(i));
      if (!inserted && it->second != static_cast<int64_t>(i)) it->second = -2;
    }
  }
  std::vector<int64_t> choice(n);
  for (size_t i = 0; i < n; ++i) {
    const auto tp = entry(p, i);
    const auto tg = entry(g, i);
    if (tp.has_value() && writable(*tp, i, owner)) {
      choice[i] = 0;
    } else if (tg.has_value() && writable(*tg, i, owner)) {
      choice[i] = 1;
    } else {
      choice[i] = (tp.has_value() || tg.has_value()) ? -1 : -2;
    }
  }
  return {code, choice};
}

TORCH_LIBRARY_IMPL(genrep_fast, CPU, m) { m.impl("grad_layout", &grad_layout); }

}  // namespace genrep_fast
