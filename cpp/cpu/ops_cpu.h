// Declarations of the CPU kernels' entry points. Python has checked every argument before
// these run; the TORCH_CHECKs inside are a second line of defence, never the interface.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace ifast::cpu {

// y = x / rms(x) * weight over the last dim; with a residual, x + residual is normalised
// and returned too. Returns (y, residual_out or undefined, rstd fp32).
std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& residual, double eps);
// Returns (dx, dweight); dresidual_out, when given, is added into dx.
std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                     const at::Tensor& weight, const at::Tensor& rstd,
                                     const std::optional<at::Tensor>& dresidual_out);

// out = silu(gate) * up. gate and up: (rows, F), unit column stride, any row stride (the halves of
// a packed (rows, 2F) tensor are passed as views). Returns a contiguous (rows, F) tensor.
at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up);
// dout contiguous (rows, F). Returns {dgate, dup}, or with packed {dx}: (rows, 2F), dgate in the
// first F columns and dup in the last F.
std::vector<at::Tensor> swiglu_bwd(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up,
                                   bool packed);

}  // namespace ifast::cpu
