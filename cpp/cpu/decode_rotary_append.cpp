// The entry points of decode_rotary_append: each runs kernels/decode_rotary_append.h compiled for the
// instruction set cpu_isa() picks. The headers the body uses come first (isa_compile.h says why).
#include "common.h"
#include "ops_cpu.h"

#include <cstdint>

#define IFAST_ISA_BODY "kernels/decode_rotary_append.h"
#include "isa_compile.h"

namespace ifast::cpu {

void decode_rotary_append(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& positions, at::Tensor& kv_rows, const at::Tensor& slots, int64_t q_heads) {
  IFAST_ISA_RETURN(decode_rotary_append, qkv, cos, sin, positions, kv_rows, slots, q_heads)
}

}  // namespace ifast::cpu
