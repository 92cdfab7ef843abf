// The entry points of argmax_rows: each runs kernels/argmax_rows.h compiled for the instruction set
// cpu_isa() picks. The headers the body uses come first (isa_compile.h says why).
#include "common.h"
#include "ops_cpu.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <limits>

#define IFAST_ISA_BODY "kernels/argmax_rows.h"
#include "isa_compile.h"

namespace ifast::cpu {

at::Tensor argmax_rows(const at::Tensor& x) {
  IFAST_ISA_RETURN(argmax_rows, x)
}

}  // namespace ifast::cpu
