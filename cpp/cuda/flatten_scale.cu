// Flatten and scale on NVIDIA GPUs: out[off_t + i] = scale * src_t[i] for a list of tensors, one
// launch per bucket. blockIdx.y picks the tensor, blockIdx.x strides over it; blocks past the end
// of a small tensor exit at once. Same rounding as cpp/cpu/flatten_scale.cpp (one product in fp32, or
// fp64, then one rounding to out's type); reference: internlm_fast/ops/flatten_scale.py.
#include "device_common.cuh"
#include "kernels.h"

#include <algorithm>
#include <cstdint>

namespace ifast::cuda {
namespace {

template <typename S, typename D, typename A>
__global__ void flatten_scale_kernel(const int64_t* __restrict__ desc, D* __restrict__ out, A scale) {
  const int64_t* d = desc + 3 * static_cast<int64_t>(blockIdx.y);
  const S* src = reinterpret_cast<const S*>(d[0]);
  const int64_t off = d[1], n = d[2];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[off + i] = from_acc<D>(static_cast<A>(to_acc(src[i])) * scale);
  }
}

template <typename S, typename D, typename A>
void launch(const FlattenScaleArgs& a, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((a.max_numel + kThreads - 1) / kThreads, 1024);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(a.n));
  flatten_scale_kernel<S, D, A><<<grid, kThreads, 0, stream>>>(a.desc, static_cast<D*>(a.out),
                                                                static_cast<A>(a.scale));
}

}  // namespace

void flatten_scale_launch(const FlattenScaleArgs& a, cudaStream_t stream) {
  if (a.n == 0 || a.max_numel == 0) return;
  using F = DType;
  if (a.src_type == F::kFloat32 && a.dst_type == F::kFloat32) return launch<float, float, float>(a, stream);
  if (a.src_type == F::kFloat64 && a.dst_type == F::kFloat64) return launch<double, double, double>(a, stream);
  if (a.src_type == F::kBFloat16 && a.dst_type == F::kBFloat16)
    return launch<__nv_bfloat16, __nv_bfloat16, float>(a, stream);
  if (a.src_type == F::kFloat16 && a.dst_type == F::kFloat16) return launch<__half, __half, float>(a, stream);
  if (a.src_type == F::kBFloat16 && a.dst_type == F::kFloat32) return launch<__nv_bfloat16, float, float>(a, stream);
  if (a.src_type == F::kFloat16 && a.dst_type == F::kFloat32) return launch<__half, float, float>(a, stream);
}

}  // namespace ifast::cuda
