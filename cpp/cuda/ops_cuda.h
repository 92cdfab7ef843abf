// Declarations of the CUDA kernels' entry points: the same signatures and return conventions as
// ifast::cpu (cpp/cpu/ops_cpu.h), so Python calls either backend the same way. Python has checked
// every argument before these run; the TORCH_CHECKs inside are a second line of defence.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace ifast::cuda {

// y = x / rms(x) * weight over the last dim; with a residual, x + residual is normalised
// and returned too. Returns (y, residual_out or undefined, rstd fp32; fp64 for fp64 x).
std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& residual, double eps);
// Returns (dx, dweight); dresidual_out, when given, is added into dx.
std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                     const at::Tensor& weight, const at::Tensor& rstd,
                                     const std::optional<at::Tensor>& dresidual_out);

// out[off_i : off_i + n_i] = scale * tensors[i], laid end to end from out[0] (see ops_cpu.h).
void flatten_scale_fwd(const std::vector<at::Tensor>& tensors, const at::Tensor& out, double scale);

}  // namespace ifast::cuda
