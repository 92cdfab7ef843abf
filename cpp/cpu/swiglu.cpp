// The entry points of swiglu_fwd, swiglu_bwd: each runs kernels/swiglu.h compiled for the instruction set
// cpu_isa() picks. The headers the body uses come first (isa_compile.h says why).
#include "common.h"
#include "ops_cpu.h"
#include "output_allocator.h"

#include <algorithm>

#define IFAST_ISA_BODY "kernels/swiglu.h"
#include "isa_compile.h"

namespace ifast::cpu {

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  IFAST_ISA_RETURN(swiglu_fwd, gate, up)
}

std::vector<at::Tensor> swiglu_bwd(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up, bool packed) {
  IFAST_ISA_RETURN(swiglu_bwd, dout, gate, up, packed)
}

}  // namespace ifast::cpu
