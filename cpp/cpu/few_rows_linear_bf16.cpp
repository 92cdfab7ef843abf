// The entry point of few_rows_linear_bf16: runs kernels/few_rows_linear_bf16.h compiled for the
// instruction set cpu_isa() picks. The headers the body uses come first (isa_compile.h says why).
// GCC 12 flags the _mm512_undefined_* idiom inside its own intrinsics as -Wmaybe-uninitialized
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "common.h"
#include "few_rows_panels.h"
#include "ops_cpu.h"

#include <ATen/ops/constant_pad_nd.h>

#include <algorithm>
#include <vector>

#define IFAST_ISA_BODY "kernels/few_rows_linear_bf16.h"
#include "isa_compile.h"

namespace ifast::cpu {

at::Tensor few_rows_linear_bf16(const at::Tensor& x, const at::Tensor& panels_w, const std::optional<at::Tensor>& bias) {
  IFAST_ISA_RETURN(few_rows_linear_bf16, x, panels_w, bias)
}

}  // namespace ifast::cpu
