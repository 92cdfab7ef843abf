// The entry point of few_rows_linear_int8: runs kernels/few_rows_linear_int8.h compiled for the
// instruction set cpu_isa() picks. The headers the body uses come first (isa_compile.h says why).
// GCC 12 flags the _mm512_undefined_* idiom inside its own intrinsics as -Wmaybe-uninitialized (or,
// inlined into a template, -Wuninitialized)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "common.h"
#include "few_rows_panels.h"
#include "ops_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>

#define IFAST_ISA_BODY "kernels/few_rows_linear_int8.h"
#include "isa_compile.h"

namespace ifast::cpu {

at::Tensor few_rows_linear_int8(const at::Tensor& x, const at::Tensor& panels_w, const at::Tensor& scales,
                                const std::optional<at::Tensor>& bias) {
  IFAST_ISA_RETURN(few_rows_linear_int8, x, panels_w, scales, bias)
}

}  // namespace ifast::cpu
