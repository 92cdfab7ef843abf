// The entry points of rms_norm_fwd, rms_norm_bwd: each runs kernels/rms_norm.h compiled for the instruction
// set cpu_isa() picks. The headers the body uses come first (isa_compile.h says why).
#include "common.h"
#include "ops_cpu.h"
#include "output_allocator.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>


#define IFAST_ISA_BODY "kernels/rms_norm.h"
#include "isa_compile.h"

namespace ifast::cpu {

std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& residual, double eps) {
  IFAST_ISA_RETURN(rms_norm_fwd, x, weight, residual, eps)
}

std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& rstd, const std::optional<at::Tensor>& dresidual_out) {
  IFAST_ISA_RETURN(rms_norm_bwd, dy, x, weight, rstd, dresidual_out)
}

}  // namespace ifast::cpu
