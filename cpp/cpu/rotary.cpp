// The entry points of rotary_fwd, rotary_bwd: each runs kernels/rotary.h compiled for the instruction set
// cpu_isa() picks. The headers the body uses come first (isa_compile.h says why).
#include "common.h"
#include "ops_cpu.h"
#include "output_allocator.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#define IFAST_ISA_BODY "kernels/rotary.h"
#include "isa_compile.h"

namespace ifast::cpu {

at::Tensor rotary_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& seqlen_offsets, const std::optional<at::Tensor>& cu_seqlens,
                      bool interleaved, bool conjugate, const std::optional<at::Tensor>& out) {
  IFAST_ISA_RETURN(rotary_fwd, x, cos, sin, seqlen_offsets, cu_seqlens, interleaved, conjugate, out)
}

at::Tensor rotary_bwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& seqlen_offsets, const std::optional<at::Tensor>& cu_seqlens,
                      bool interleaved, bool conjugate, const std::optional<at::Tensor>& out) {
  IFAST_ISA_RETURN(rotary_bwd, x, cos, sin, seqlen_offsets, cu_seqlens, interleaved, conjugate, out)
}

}  // namespace ifast::cpu
