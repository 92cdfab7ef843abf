// The entry points of few_rows_linear: each runs kernels/few_rows_linear.h compiled for the instruction set
// cpu_isa() picks. The headers the body uses come first (isa_compile.h says why).
#include "common.h"
#include "ops_cpu.h"

#include <ATen/ops/empty.h>

#include <algorithm>

#define IFAST_ISA_BODY "kernels/few_rows_linear.h"
#include "isa_compile.h"

namespace ifast::cpu {

at::Tensor few_rows_linear(const at::Tensor& x, const at::Tensor& panels_w, const std::optional<at::Tensor>& bias) {
  IFAST_ISA_RETURN(few_rows_linear, x, panels_w, bias)
}

}  // namespace ifast::cpu
