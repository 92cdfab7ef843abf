// The entry points of flatten_scale_fwd: each runs kernels/flatten_scale.h compiled for the instruction set
// cpu_isa() picks. The headers the body uses come first (isa_compile.h says why).
#include "common.h"
#include "ops_cpu.h"

#include <algorithm>

#define IFAST_ISA_BODY "kernels/flatten_scale.h"
#include "isa_compile.h"

namespace ifast::cpu {

void flatten_scale_fwd(const std::vector<at::Tensor>& tensors, const at::Tensor& out, double scale) {
  IFAST_ISA_RETURN(flatten_scale_fwd, tensors, out, scale)
}

}  // namespace ifast::cpu
