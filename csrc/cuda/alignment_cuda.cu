// CUDA kernels of gradient alignment (docs/METHOD.md section 3): group_sums and align_combine over
// lists of tensors, multi-tensor-apply style.
//
// Launch layout: a list is cut into chunks of kChunk elements. The pointers, sizes, group ids and
// first chunk of up to kMaxTensors tensors travel by value in one argument struct (LaunchMeta,
// < 4 KiB, the classic kernel-parameter limit), so a launch handles many tensors: the number of
// launches is ceil(tensors / kMaxTensors) per dtype present in the list (a DiT-XL/2 list of ~300
// tensors: 4 per pass). The grid is sized to the machine, not to the list: kWaves times the blocks
// that fit on the device at once (SM count x resident blocks per SM, from the device's attributes
// and the kernel's occupancy, cached per kernel and device), and each block walks the launch's
// chunks with a grid stride, so a large list keeps every SM busy and a small one launches one
// block per chunk. All metadata is passed by value: nothing is copied host-to-device, no host sync
// happens, and a CUDA graph captures the launches as they are.
//
// Determinism (group_sums): stage 1 writes one partial (3 doubles) per chunk to its own slot, no
// atomics; stage 2 runs one block per group that adds the partials of that group's chunks in a
// fixed order (fixed thread striding + fixed shuffle tree). Same inputs -> same bits.
//
// Precision: sums and the combine are computed in double (the ops' contract: float32 squares
// under/overflow for 1e-30 / 1e30 gradients, and a = w_p + ... d / |p|^2 can exceed the float range
// when one gradient is tiny). On A100/H100 (FP64 at 1/2 the FP32 rate) this is far from the
// bandwidth bound: ~6 double flops per 8 bytes read.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "../alignment.h"

namespace genrep_fast {
namespace {

constexpr int kThreads = 512;          // threads per chunk block
constexpr int kCleanupThreads = 256;   // threads per group in the cleanup pass
constexpr int64_t kChunk = 65536;      // elements per block: 128 per thread at 512 threads
constexpr int kMaxTensors = 80;        // tensors per launch: fills the 4 KiB argument struct
// Blocks per launch: kWaves x the blocks resident at once. More than one wave evens out the tail
// (chunks of a tensor's end are short; blocks finish at different times).
constexpr int kWaves = 4;

// By-value kernel argument: the tensors of one launch. Tensor t owns the launch's chunks
// [chunk_start[t], chunk_start[t + 1]); chunk_start[num_tensors] == num_chunks.
struct LaunchMeta {
  const void* p[kMaxTensors];  // null: missing gradient (zeros)
  const void* g[kMaxTensors];
  void* out[kMaxTensors];      // combine only
  int64_t numel[kMaxTensors];
  int64_t chunk_start[kMaxTensors + 1];
  int32_t group[kMaxTensors];  // -1: in no group
  int32_t num_tensors;
  int64_t num_chunks;
  int64_t chunk_base;  // global slot of this launch's first chunk (group_sums partials)
};
static_assert(sizeof(LaunchMeta) + 64 <= 4096, "kernel arguments must stay under 4 KiB");

// 16-byte vectors: 4 fp32, 8 bf16/fp16, 2 fp64 per load.
template <typename T>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

__device__ __forceinline__ double to_double(double x) { return x; }
__device__ __forceinline__ double to_double(float x) { return static_cast<double>(x); }
__device__ __forceinline__ double to_double(c10::Half x) { return static_cast<float>(x); }
__device__ __forceinline__ double to_double(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
__device__ __forceinline__ T from_double(double x) {
  return static_cast<T>(x);
}
template <>
__device__ __forceinline__ c10::Half from_double<c10::Half>(double x) {
  return c10::Half(static_cast<float>(x));
}
template <>
__device__ __forceinline__ c10::BFloat16 from_double<c10::BFloat16>(double x) {
  return c10::BFloat16(static_cast<float>(x));
}

__device__ __forceinline__ bool aligned16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0;
}

// Sum of v over the block in a fixed order (shuffle tree per warp, then warp 0 over the warps'
// results). The result is valid in thread 0.
template <int kBlock>
__device__ __forceinline__ void block_sum3(double& a, double& b, double& c) {
  static_assert(kBlock % 32 == 0 && kBlock <= 1024, "block must be whole warps");
  __shared__ double shared[3][kBlock / 32];
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
    c += __shfl_down_sync(0xffffffffu, c, off);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    shared[0][warp] = a;
    shared[1][warp] = b;
    shared[2][warp] = c;
  }
  __syncthreads();
  if (warp == 0) {
    constexpr int kWarps = kBlock / 32;
    a = lane < kWarps ? shared[0][lane] : 0.0;
    b = lane < kWarps ? shared[1][lane] : 0.0;
    c = lane < kWarps ? shared[2][lane] : 0.0;
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, off);
      b += __shfl_down_sync(0xffffffffu, b, off);
      c += __shfl_down_sync(0xffffffffu, c, off);
    }
  }
  // The next call (the next chunk of a grid-stride loop) writes `shared` again: warp 0 must have
  // read it first.
  __syncthreads();
}

// The tensor that owns chunk c of a launch: the last t with chunk_start[t] <= c (binary search
// over at most kMaxTensors entries, once per chunk of kChunk elements).
__device__ __forceinline__ int tensor_of_chunk(const LaunchMeta& meta, int64_t c) {
  int lo = 0, hi = meta.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (meta.chunk_start[mid] <= c) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

template <typename T>
__device__ __forceinline__ void accumulate(double x, double y, double& dot, double& pp,
                                           double& gg) {
  dot = fma(x, y, dot);
  pp = fma(x, x, pp);
  gg = fma(y, y, gg);
}

// Stage 1 of group_sums: partials[chunk_base + c] = sums of chunk c of the launch, for every chunk
// c this block takes (c = blockIdx.x, blockIdx.x + gridDim.x, ...). One slot per chunk, whichever
// block computes it: the partials do not depend on the grid size.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    group_sums_partial_kernel(LaunchMeta meta, double* __restrict__ partials,
                              int32_t* __restrict__ chunk_group) {
  for (int64_t c = blockIdx.x; c < meta.num_chunks; c += gridDim.x) {
    const int tensor = tensor_of_chunk(meta, c);
    // int64: a tensor may hold more than 2^31 elements.
    const int64_t start = (c - meta.chunk_start[tensor]) * kChunk;
    const int64_t n = min(kChunk, meta.numel[tensor] - start);
    const T* p = meta.p[tensor] ? static_cast<const T*>(meta.p[tensor]) + start : nullptr;
    const T* g = meta.g[tensor] ? static_cast<const T*>(meta.g[tensor]) + start : nullptr;
    double dot = 0.0, pp = 0.0, gg = 0.0;
    constexpr int V = Vec<T>::kSize;
    const bool vec_ok = (p == nullptr || aligned16(p)) && (g == nullptr || aligned16(g));
    int64_t done = 0;
    if (vec_ok) {
      const int64_t nvec = n / V;
      for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
        Vec<T> pv, gv;
        if (p) pv = reinterpret_cast<const Vec<T>*>(p)[i];
        if (g) gv = reinterpret_cast<const Vec<T>*>(g)[i];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          accumulate<T>(p ? to_double(pv.v[j]) : 0.0, g ? to_double(gv.v[j]) : 0.0, dot, pp,
                        gg);
        }
      }
      done = nvec * V;
    }
    for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {
      accumulate<T>(p ? to_double(p[i]) : 0.0, g ? to_double(g[i]) : 0.0, dot, pp, gg);
    }
    block_sum3<kThreads>(dot, pp, gg);
    if (threadIdx.x == 0) {
      const int64_t slot = meta.chunk_base + c;
      partials[3 * slot + 0] = dot;
      partials[3 * slot + 1] = pp;
      partials[3 * slot + 2] = gg;
      chunk_group[slot] = meta.group[tensor];
    }
  }
}

// Stage 2 of group_sums: block `grp` adds the partials of the chunks of group grp in slot order
// (thread t takes slots t, t + kCleanupThreads, ...; then the fixed block tree).
__global__ void __launch_bounds__(kCleanupThreads)
    group_sums_cleanup_kernel(const double* __restrict__ partials,
                              const int32_t* __restrict__ chunk_group, int64_t num_chunks,
                              double* __restrict__ sums) {
  const int32_t grp = static_cast<int32_t>(blockIdx.x);
  double dot = 0.0, pp = 0.0, gg = 0.0;
  for (int64_t c = threadIdx.x; c < num_chunks; c += kCleanupThreads) {
    if (chunk_group[c] == grp) {
      dot += partials[3 * c + 0];
      pp += partials[3 * c + 1];
      gg += partials[3 * c + 2];
    }
  }
  block_sum3<kCleanupThreads>(dot, pp, gg);
  if (threadIdx.x == 0) {
    sums[3 * int64_t(grp) + 0] = dot;
    sums[3 * int64_t(grp) + 1] = pp;
    sums[3 * int64_t(grp) + 2] = gg;
  }
}

// out = a * p + b * g over one chunk per block; (a, b) from the sums of the tensor's group, formed
// by every block from 3 doubles (cheaper than a separate launch). out may alias p or g: every
// element is read before it is written, by the same thread.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    align_combine_kernel(LaunchMeta meta, const double* __restrict__ sums, AlignParams prm) {
  for (int64_t c = blockIdx.x; c < meta.num_chunks; c += gridDim.x) {
    const int tensor = tensor_of_chunk(meta, c);
    const int64_t start = (c - meta.chunk_start[tensor]) * kChunk;
    const int64_t n = min(kChunk, meta.numel[tensor] - start);
    const T* p = meta.p[tensor] ? static_cast<const T*>(meta.p[tensor]) + start : nullptr;
    const T* g = meta.g[tensor] ? static_cast<const T*>(meta.g[tensor]) + start : nullptr;
    T* out = static_cast<T*>(meta.out[tensor]) + start;
    double a, b;
    align_coefficients(sums, meta.group[tensor], prm, &a, &b);
    constexpr int V = Vec<T>::kSize;
    const bool vec_ok =
        aligned16(out) && (p == nullptr || aligned16(p)) && (g == nullptr || aligned16(g));
    int64_t done = 0;
    if (vec_ok) {
      const int64_t nvec = n / V;
      for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
        Vec<T> pv, gv, ov;
        if (p) pv = reinterpret_cast<const Vec<T>*>(p)[i];
        if (g) gv = reinterpret_cast<const Vec<T>*>(g)[i];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const double x = p ? a * to_double(pv.v[j]) : 0.0;
          ov.v[j] = from_double<T>(g ? x + b * to_double(gv.v[j]) : x);
        }
        reinterpret_cast<Vec<T>*>(out)[i] = ov;
      }
      done = nvec * V;
    }
    for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {
      const double x = p ? a * to_double(p[i]) : 0.0;
      out[i] = from_double<T>(g ? x + b * to_double(g[i]) : x);
    }
  }
}

// One tensor of a launch list.
struct Item {
  const void* p;
  const void* g;
  void* out;
  int64_t numel;
  int32_t group;
};

int64_t num_chunks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Packs `items` into LaunchMeta structs of up to kMaxTensors tensors and calls
// launch(meta, num_chunks) for each. Returns the next free chunk slot.
template <typename LaunchFn>
int64_t multi_tensor_apply(const std::vector<Item>& items, int64_t chunk_base, LaunchFn&& launch) {
  LaunchMeta meta;
  std::memset(&meta, 0, sizeof(meta));
  int nt = 0;
  int64_t nc = 0;
  auto flush = [&] {
    meta.num_tensors = nt;
    meta.chunk_start[nt] = nc;
    meta.num_chunks = nc;
    meta.chunk_base = chunk_base;
    launch(meta, nc);
    chunk_base += nc;
    nt = 0;
    nc = 0;
  };
  for (const Item& it : items) {
    const int64_t chunks = num_chunks(it.numel);
    if (chunks == 0) continue;
    meta.p[nt] = it.p;
    meta.g[nt] = it.g;
    meta.out[nt] = it.out;
    meta.numel[nt] = it.numel;
    meta.group[nt] = it.group;
    meta.chunk_start[nt] = nc;
    nc += chunks;
    if (++nt == kMaxTensors) flush();
  }
  if (nt > 0) flush();
  return chunk_base;
}

// Blocks of `kernel` (kThreads threads) resident on `device` at once: SM count x blocks per SM
// at the kernel's occupancy. Cached per (kernel, device): the first launch pays two driver
// queries, later launches a map lookup.
int resident_blocks(const void* kernel, c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(kernel, static_cast<int>(device));
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const int blocks = std::max(1, sms) * std::max(1, per_sm);
  cache.emplace(key, blocks);
  return blocks;
}

// Grid of one launch over `chunks` chunks: one block per chunk up to kWaves waves of the device.
unsigned grid_size(const void* kernel, c10::DeviceIndex device, int64_t chunks) {
  const int64_t cap = int64_t(kWaves) * resident_blocks(kernel, device);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(chunks, cap)));
}

// Items of the list split by dtype (one kernel instantiation per dtype), in list order within a
// dtype and dtypes in order of first appearance, so the chunk slots depend on the inputs only.
std::vector<std::pair<at::ScalarType, std::vector<Item>>> split_by_dtype(
    const std::vector<at::ScalarType>& dtypes, const std::vector<Item>& items) {
  std::vector<std::pair<at::ScalarType, std::vector<Item>>> out;
  for (size_t i = 0; i < items.size(); ++i) {
    if (items[i].numel == 0) continue;
    auto it = std::find_if(out.begin(), out.end(), [&](const auto& e) { return e.first == dtypes[i]; });
    if (it == out.end()) {
      out.emplace_back(dtypes[i], std::vector<Item>{});
      it = out.end() - 1;
    }
    it->second.push_back(items[i]);
  }
  return out;
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

c10::Device common_device(const OptionalTensorList& p, const OptionalTensorList& g,
                          const char* op) {
  std::optional<c10::Device> dev;
  for (size_t i = 0; i < p.size(); ++i) {
    for (const at::Tensor& t : {get_or_undefined(p, i), get_or_undefined(g, i)}) {
      if (!t.defined()) continue;
      if (!dev) dev = t.device();
      TORCH_CHECK_VALUE(t.device() == *dev, op, ": all tensors must be on one device, got ", *dev,
                        " and ", t.device());
    }
  }
  TORCH_CHECK_VALUE(dev.has_value(), op, ": every gradient is None");
  return *dev;
}

at::Tensor group_sums_cuda(const OptionalTensorList& p_list, const OptionalTensorList& g_list,
                           at::IntArrayRef group_ids, int64_t num_groups) {
  check_align_lists("group_sums", p_list, g_list, group_ids, num_groups, c10::DeviceType::CUDA);
  TORCH_CHECK_VALUE(num_groups < (int64_t(1) << 31), "group_sums: at most 2^31 - 1 groups");
  const c10::Device device = common_device(p_list, g_list, "group_sums");
  const c10::cuda::CUDAGuard guard(device);
  const auto opts = at::TensorOptions().device(device);
  at::Tensor sums = at::empty({num_groups, 3}, opts.dtype(at::kDouble));
  if (num_groups == 0) return sums;

  const size_t n = p_list.size();
  std::vector<at::Tensor> keep;  // contiguous copies live until the launches are queued
  std::vector<Item> items;
  std::vector<at::ScalarType> dtypes;
  int64_t total_chunks = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor src = present_of(p_list, g_list, i);
    if (group_ids[i] < 0 || !src.defined() || src.numel() == 0) continue;
    const at::Tensor pc = contiguous_or_undefined(get_or_undefined(p_list, i));
    const at::Tensor gc = contiguous_or_undefined(get_or_undefined(g_list, i));
    keep.push_back(pc);
    keep.push_back(gc);
    items.push_back({ptr_or_null(pc), ptr_or_null(gc), nullptr, src.numel(),
                     static_cast<int32_t>(group_ids[i])});
    dtypes.push_back(src.scalar_type());
    total_chunks += num_chunks(src.numel());
  }
  at::Tensor partials = at::empty({std::max<int64_t>(total_chunks, 1), 3}, opts.dtype(at::kDouble));
  at::Tensor chunk_group = at::empty({std::max<int64_t>(total_chunks, 1)}, opts.dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int64_t slot = 0;
  for (const auto& dtype_items : split_by_dtype(dtypes, items)) {
    const std::vector<Item>& list = dtype_items.second;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype_items.first, "group_sums_cuda", [&] {
      const void* kernel = reinterpret_cast<const void*>(&group_sums_partial_kernel<scalar_t>);
      slot = multi_tensor_apply(list, slot, [&](const LaunchMeta& meta, int64_t chunks) {
        const unsigned blocks = grid_size(kernel, device.index(), chunks);
        group_sums_partial_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
            meta, partials.data_ptr<double>(), chunk_group.data_ptr<int32_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  TORCH_INTERNAL_ASSERT(slot == total_chunks, "group_sums: chunk count mismatch");
  group_sums_cleanup_kernel<<<static_cast<unsigned>(num_groups), kCleanupThreads, 0, stream>>>(
      partials.data_ptr<double>(), chunk_group.data_ptr<int32_t>(), total_chunks,
      sums.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sums;
}

void align_combine_cuda(const OptionalTensorList& p_list, const OptionalTensorList& g_list,
                        const at::Tensor& sums, at::IntArrayRef group_ids, double k, double w_p,
                        double w_g, c10::string_view mode, at::TensorList out) {
  const int64_t num_groups = sums.dim() == 2 ? sums.size(0) : 0;
  check_sums(sums, c10::DeviceType::CUDA);
  check_align_lists("align_combine", p_list, g_list, group_ids, num_groups, c10::DeviceType::CUDA);
  check_combine_args(p_list, g_list, sums, out, c10::DeviceType::CUDA);
  TORCH_CHECK_VALUE(k >= 0.0, "align_combine: k must be >= 0, got ", k);
  const AlignParams prm{k, w_p, w_g, parse_align_mode(std::string(mode))};
  const c10::Device device = sums.device();
  for (size_t i = 0; i < out.size(); ++i) {
    TORCH_CHECK_VALUE(out[i].device() == device, "align_combine: out[", i, "] is on ",
                      out[i].device(), ", sums on ", device);
  }
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor sums_c = sums.contiguous();

  const size_t n = p_list.size();
  std::vector<at::Tensor> keep, results(n);
  std::vector<Item> items;
  std::vector<at::ScalarType> dtypes;
  for (size_t i = 0; i < n; ++i) {
    if (out[i].numel() == 0) continue;
    const at::Tensor pc = contiguous_or_undefined(get_or_undefined(p_list, i));
    const at::Tensor gc = contiguous_or_undefined(get_or_undefined(g_list, i));
    keep.push_back(pc);
    keep.push_back(gc);
    // A strided output is computed into a contiguous buffer and copied back after the launches.
    results[i] = out[i].is_contiguous() ? out[i]
                                        : at::empty_like(out[i], at::MemoryFormat::Contiguous);
    items.push_back({ptr_or_null(pc), ptr_or_null(gc), results[i].data_ptr(), out[i].numel(),
                     static_cast<int32_t>(group_ids[i])});
    dtypes.push_back(out[i].scalar_type());
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& dtype_items : split_by_dtype(dtypes, items)) {
    const std::vector<Item>& list = dtype_items.second;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype_items.first, "align_combine_cuda", [&] {
      const void* kernel = reinterpret_cast<const void*>(&align_combine_kernel<scalar_t>);
      multi_tensor_apply(list, 0, [&](const LaunchMeta& meta, int64_t chunks) {
        const unsigned blocks = grid_size(kernel, device.index(), chunks);
        align_combine_kernel<scalar_t>
            <<<blocks, kThreads, 0, stream>>>(meta, sums_c.const_data_ptr<double>(), prm);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  for (size_t i = 0; i < n; ++i) {
    if (results[i].defined() && !results[i].is_same(out[i])) out[i].copy_(results[i]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(genrep_fast, CUDA, m) {
  m.impl("group_sums", &group_sums_cuda);
  m.impl("align_combine", &align_combine_cuda);
  m.impl("grad_layout", &grad_layout);  // metadata only: the CPU function (csrc/grad_layout.cpp)
}

}  // namespace genrep_fast
