// The entry point of transpose_fp32: runs kernels/transpose.h compiled for the instruction set
// cpu_isa() picks. The headers the body uses come first (isa_compile.h says why).
#include "common.h"
#include "onednn_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#define IFAST_ISA_BODY "kernels/transpose.h"
#include "isa_compile.h"

namespace ifast::cpu {

void transpose_fp32_into(const at::Tensor& x, const at::Tensor& out) { IFAST_ISA_RETURN(transpose_fp32_into, x, out) }

at::Tensor transpose_fp32(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2, "transpose_fp32: x must be 2-D, got ", x.sizes());
  at::Tensor out = at::empty({x.size(1), x.size(0)}, x.options());
  transpose_fp32_into(x, out);
  return out;
}

}  // namespace ifast::cpu
