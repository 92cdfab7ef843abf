// The entry points of flash_attn_fwd, flash_attn_bwd, flash_attn_kvcache_fwd: each runs
// kernels/flash_attn.h compiled for the instruction set cpu_isa() picks. The headers the body uses come
// first (isa_compile.h says why).
#include "common.h"
#include "onednn_gemm.h"
#include "ops_cpu.h"
#include "output_allocator.h"

#include <ATen/native/CPUBlas.h>
#include <ATen/ops/copy.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#define IFAST_ISA_BODY "kernels/flash_attn.h"
#include "isa_compile.h"

namespace ifast::cpu {

std::vector<at::Tensor> flash_attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                       double softmax_scale, bool causal) {
  IFAST_ISA_RETURN(flash_attn_fwd, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
}

std::vector<at::Tensor> flash_attn_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                       const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                       double softmax_scale, bool causal) {
  IFAST_ISA_RETURN(flash_attn_bwd, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
}

std::vector<at::Tensor> flash_attn_kvcache_fwd(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                               const std::optional<at::Tensor>& block_table, double softmax_scale,
                                               bool causal) {
  IFAST_ISA_RETURN(flash_attn_kvcache_fwd, q, k_cache, v_cache, cache_lens, block_table, softmax_scale, causal)
}

}  // namespace ifast::cpu
