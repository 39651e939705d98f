// CPU kernels of gradient alignment: per-group multi-tensor reductions.
//
// Determinism: every tensor is cut into fixed-size chunks (independent of the thread count), each
// chunk's partial sums are computed in double by one thread, and the partials are added in chunk
// order by one pass. The result is bitwise identical across calls and thread counts.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

namespace genrep_fast {
namespace {

// 32K elements: large enough that the per-chunk bookkeeping is negligible, small enough that a
// 1M-element tensor still spreads over all cores.
constexpr int64_t kChunk = 1 << 15;

struct Partial {
  double dot = 0.0, pp = 0.0, gg = 0.0;
};

// Sums of one chunk in double: every product of two fp32 values is exact in double, so a chunk's
// partial carries no rounding beyond the additions.
template <typename scalar_t>
Partial chunk_sums(const scalar_t* a, const scalar_t* b, int64_t n) {
  double dot = 0.0, pp = 0.0, gg = 0.0;
#pragma omp simd reduction(+ : dot, pp, gg)
  for (int64_t j = 0; j < n; ++j) {
    const double x = static_cast<double>(a[j]);
    const double y = static_cast<double>(b[j]);
    dot += x * y;
    pp += x * x;
    gg += y * y;
  }
  return {dot, pp, gg};
}

void check_lists(const std::vector<at::Tensor>& p, const std::vector<at::Tensor>& g,
                 at::IntArrayRef group_ids, int64_t num_groups) {
  TORCH_CHECK(p.size() == g.size(), "group_sums: p and g must have the same length, got ", p.size(),
              " and ", g.size());
  TORCH_CHECK(group_ids.size() == p.size(), "group_sums: group_ids must have one entry per tensor (",
              p.size(), "), got ", group_ids.size());
  TORCH_CHECK(num_groups >= 0, "group_sums: num_groups must be >= 0, got ", num_groups);
  for (size_t i = 0; i < p.size(); ++i) {
    TORCH_CHECK(p[i].sizes() == g[i].sizes(), "group_sums: p[", i, "] and g[", i,
                "] differ in shape: ", p[i].sizes(), " vs ", g[i].sizes());
    TORCH_CHECK(p[i].scalar_type() == g[i].scalar_type(), "group_sums: p[", i, "] and g[", i,
                "] differ in dtype: ", p[i].scalar_type(), " vs ", g[i].scalar_type());
    TORCH_CHECK(at::isFloatingType(p[i].scalar_type()), "group_sums: p[", i,
                "] must be floating point, got ", p[i].scalar_type());
    TORCH_CHECK(group_ids[i] >= -1 && group_ids[i] < num_groups, "group_sums: group_ids[", i,
                "] = ", group_ids[i], " is out of range [-1, ", num_groups, ")");
  }
}

at::Tensor group_sums_cpu(at::TensorList p_list, at::TensorList g_list, at::IntArrayRef group_ids,
                          int64_t num_groups) {
  std::vector<at::Tensor> p(p_list.begin(), p_list.end()), g(g_list.begin(), g_list.end());
  check_lists(p, g, group_ids, num_groups);

  // Chunk table: (tensor, start) for every chunk of every grouped tensor.
  std::vector<at::Tensor> pc(p.size()), gc(g.size());
  std::vector<std::pair<int64_t, int64_t>> chunks;
  for (size_t i = 0; i < p.size(); ++i) {
    if (group_ids[i] < 0 || p[i].numel() == 0) continue;
    pc[i] = p[i].contiguous();
    gc[i] = g[i].contiguous();
    for (int64_t s = 0; s < p[i].numel(); s += kChunk) chunks.emplace_back(i, s);
  }
  std::vector<Partial> partials(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const auto [i, start] = chunks[c];
      const int64_t n = std::min(kChunk, pc[i].numel() - start);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pc[i].scalar_type(), "group_sums",
                                      [&] {
        partials[c] = chunk_sums(pc[i].const_data_ptr<scalar_t>() + start,
                                 gc[i].const_data_ptr<scalar_t>() + start, n);
      });
    }
  });
  std::vector<double> acc(static_cast<size_t>(num_groups) * 3, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) {
    const int64_t grp = group_ids[chunks[c].first];
    acc[grp * 3 + 0] += partials[c].dot;
    acc[grp * 3 + 1] += partials[c].pp;
    acc[grp * 3 + 2] += partials[c].gg;
  }
  auto out = at::empty({num_groups, 3}, at::TensorOptions().dtype(at::kDouble));
  std::copy(acc.begin(), acc.end(), out.data_ptr<double>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(genrep_fast, CPU, m) { m.impl("group_sums", &group_sums_cpu); }

}  // namespace genrep_fast
