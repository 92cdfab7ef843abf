// Host glue of the CUDA RMSNorm: checks, device guard, allocation on torch's caching allocator,
// dtype mapping, then the raw-pointer launchers of rms_norm.cu on the current stream.
#include "host_common.h"
#include "kernels.h"
#include "ops_cuda.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

namespace ifast::cuda {
namespace {

// The kernels read a weight of x's dtype or of x's accumulation type; any other is converted once
// per call (H elements), which keeps the kernel instantiations few.
at::Tensor kernel_weight(const at::Tensor& weight, at::ScalarType xt) {
  if (weight.scalar_type() == xt || weight.scalar_type() == acc_of(xt)) return weight.contiguous();
  return weight.to(acc_of(xt)).contiguous();
}

void check_rows(const char* fn, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.is_cuda(), fn, ": x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), fn, ": x must be contiguous 2-D");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), fn, ": weight shape");
  TORCH_CHECK(weight.device() == x.device(), fn, ": weight must be on x's device");
  TORCH_CHECK(x.size(1) <= std::numeric_limits<int>::max(), fn, ": last dimension too large");
}

void check_like(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.is_contiguous() && t.scalar_type() == x.scalar_type() &&
                  t.device() == x.device(),
              fn, ": ", name, " must match x (shape, dtype, device, contiguous)");
}

}  // namespace

std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& residual, double eps) {
  check_rows("rms_norm_fwd", x, weight);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_like("rms_norm_fwd", "residual", *residual, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), H = x.size(1);
  const at::ScalarType xt = x.scalar_type();
  const at::Tensor w = kernel_weight(weight, xt);
  at::Tensor y = at::empty_like(x);
  at::Tensor res_out = has_res ? at::empty_like(x) : at::Tensor();
  at::Tensor rstd = at::empty({rows}, x.options().dtype(acc_of(xt)));
  RmsNormFwdArgs a{};
  a.x_type = dtype_of(xt, "rms_norm_fwd");
  a.w_type = dtype_of(w.scalar_type(), "rms_norm_fwd");
  a.x = x.const_data_ptr();
  a.residual = has_res ? residual->const_data_ptr() : nullptr;
  a.w = w.const_data_ptr();
  a.y = y.mutable_data_ptr();
  a.residual_out = has_res ? res_out.mutable_data_ptr() : nullptr;
  a.rstd = rstd.mutable_data_ptr();
  a.rows = rows;
  a.H = H;
  a.eps = eps;
  if (rows > 0) {
    rms_norm_fwd_launch(a, c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {y, res_out, rstd};
}

std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                     const at::Tensor& weight, const at::Tensor& rstd,
                                     const std::optional<at::Tensor>& dresidual_out) {
  check_rows("rms_norm_bwd", x, weight);
  check_like("rms_norm_bwd", "dy", dy, x);
  const bool has_dres = dresidual_out.has_value() && dresidual_out->defined();
  if (has_dres) check_like("rms_norm_bwd", "dresidual_out", *dresidual_out, x);
  TORCH_CHECK(rstd.numel() == x.size(0) && rstd.device() == x.device(),
              "rms_norm_bwd: rstd must hold one value per row, on x's device");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), H = x.size(1);
  const at::ScalarType xt = x.scalar_type(), acc = acc_of(xt);
  at::Tensor dx = at::empty_like(x);
  if (rows == 0 || H == 0) return {dx, at::zeros({H}, weight.options())};
  const at::Tensor w = kernel_weight(weight, xt);
  const at::Tensor rs = rstd.to(acc).contiguous();
  // dweight straight in the weight's dtype when the reduce kernel writes it (fp32/bf16/fp16 from
  // fp32 sums, fp64 from fp64 sums), else in the accumulation type and converted after
  const at::ScalarType wt = weight.scalar_type();
  const bool direct = (wt == at::kDouble) == (acc == at::kDouble);
  at::Tensor dw = at::empty({H}, weight.options().dtype(direct ? wt : acc));
  RmsNormBwdArgs a{};
  a.x_type = dtype_of(xt, "rms_norm_bwd");
  a.w_type = dtype_of(w.scalar_type(), "rms_norm_bwd");
  a.dw_type = dtype_of(dw.scalar_type(), "rms_norm_bwd");
  a.dy = dy.const_data_ptr();
  a.x = x.const_data_ptr();
  a.w = w.const_data_ptr();
  a.rstd = rs.const_data_ptr();
  a.dresidual = has_dres ? dresidual_out->const_data_ptr() : nullptr;
  a.dx = dx.mutable_data_ptr();
  a.dw = dw.mutable_data_ptr();
  a.rows = rows;
  a.H = H;
  at::Tensor workspace = at::empty({rms_norm_bwd_workspace_rows(a), H}, x.options().dtype(acc));
  rms_norm_bwd_launch(a, workspace.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, direct ? dw : dw.to(wt)};
}

}  // namespace ifast::cuda
