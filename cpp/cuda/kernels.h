// Raw-pointer launchers of the CUDA kernels: the only interface between the .cu files (compiled by
// nvcc against CUDA headers alone, so they build in seconds) and the torch-facing host glue in the
// .cpp files. Callers have checked shapes, dtypes, devices and contiguity; pointers are device
// pointers on the current device, rows are contiguous with H elements each.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ifast::cuda {

enum class DType : int { kFloat32, kFloat64, kBFloat16, kFloat16 };

// The weight must be x's own dtype or x's accumulation type (fp32; fp64 for fp64 x): the host
// converts any other weight dtype first, which keeps the kernel instantiations few.
struct RmsNormFwdArgs {
  DType x_type, w_type;
  const void* x;
  const void* residual;  // nullable
  const void* w;
  void* y;
  void* residual_out;  // x + residual, rounded to x's dtype; null when residual is null
  void* rstd;          // rows values of the accumulation type
  int64_t rows, H;
  double eps;
};
void rms_norm_fwd_launch(const RmsNormFwdArgs& a, cudaStream_t stream);

// dweight is reduced in two kernels: per-block partial sums into a workspace of the accumulation
// type (rms_norm_bwd_workspace_rows(a) x H), then a fixed-order sum of those rows, so the result
// is deterministic. dw_type: fp32, bf16 or fp16 for an fp32 accumulation, fp64 for fp64.
struct RmsNormBwdArgs {
  DType x_type, w_type, dw_type;
  const void* dy;
  const void* x;
  const void* w;
  const void* rstd;       // accumulation type
  const void* dresidual;  // nullable; added into dx
  void* dx;
  void* dw;
  int64_t rows, H;
};
int64_t rms_norm_bwd_workspace_rows(const RmsNormBwdArgs& a);
void rms_norm_bwd_launch(const RmsNormBwdArgs& a, void* workspace, cudaStream_t stream);

// out[off_t + i] = scale * src_t[i] for every tensor t (the sharded optimizer's gradient buckets).
// desc: n device-resident rows (src pointer, offset into out, numel) as int64; n <= 65535 per launch.
// (src_type, dst_type): equal, or bf16/fp16 -> fp32. The product is taken in fp32 (fp64 for fp64).
struct FlattenScaleArgs {
  DType src_type, dst_type;
  const int64_t* desc;
  int64_t n, max_numel;
  void* out;
  double scale;
};
void flatten_scale_launch(const FlattenScaleArgs& a, cudaStream_t stream);

}  // namespace ifast::cuda
