// Host glue of the CUDA flatten-and-scale: checks, the per-tensor descriptors (source pointer,
// offset, length) staged in pinned memory and copied to the device on the current stream, then
// the launcher of flatten_scale.cu, in chunks of at most 65535 tensors (the grid's y limit).
#include "host_common.h"
#include "kernels.h"
#include "ops_cuda.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

namespace ifast::cuda {
namespace {

constexpr int64_t kMaxTensorsPerLaunch = 65535;

}  // namespace

void flatten_scale_fwd(const std::vector<at::Tensor>& tensors, const at::Tensor& out, double scale) {
  TORCH_CHECK(out.is_cuda() && out.dim() == 1 && out.is_contiguous(),
              "flatten_scale: out must be a contiguous 1-D CUDA tensor");
  if (tensors.empty()) return;
  const at::ScalarType st = tensors[0].scalar_type(), dt = out.scalar_type();
  TORCH_CHECK(st == dt || (dt == at::kFloat && (st == at::kBFloat16 || st == at::kHalf)),
              "flatten_scale: unsupported dtypes ", st, " -> ", dt);
  const c10::cuda::CUDAGuard guard(out.device());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  int64_t offset = 0;
  for (size_t first = 0; first < tensors.size(); first += kMaxTensorsPerLaunch) {
    const int64_t n = std::min<int64_t>(kMaxTensorsPerLaunch, static_cast<int64_t>(tensors.size() - first));
    at::Tensor desc = at::empty({n, 3}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    int64_t* d = desc.mutable_data_ptr<int64_t>();
    int64_t max_numel = 0;
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor& t = tensors[first + i];
      TORCH_CHECK(t.device() == out.device() && t.is_contiguous() && t.scalar_type() == st,
                  "flatten_scale: tensors must be contiguous, of one dtype, on out's device");
      TORCH_CHECK(offset + t.numel() <= out.numel(), "flatten_scale: out holds ", out.numel(),
                  " elements, fewer than the tensors");
      d[3 * i] = reinterpret_cast<int64_t>(t.const_data_ptr());
      d[3 * i + 1] = offset;
      d[3 * i + 2] = t.numel();
      offset += t.numel();
      max_numel = std::max(max_numel, t.numel());
    }
    // pinned source, non-blocking copy: the caching host allocator keeps the buffer until it is done
    const at::Tensor desc_dev = desc.to(out.device(), /*non_blocking=*/true);
    FlattenScaleArgs a{};
    a.src_type = dtype_of(st, "flatten_scale");
    a.dst_type = dtype_of(dt, "flatten_scale");
    a.desc = desc_dev.const_data_ptr<int64_t>();
    a.n = n;
    a.max_numel = max_numel;
    a.out = out.mutable_data_ptr();
    a.scale = scale;
    flatten_scale_launch(a, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace ifast::cuda
