// Declarations of the CUDA kernels' entry points: the same signatures and return conventions as
// ifast::cpu (cpp/cpu/ops_cpu.h), so Python calls either backend the same way. Python has checked
// every argument before these run; the TORCH_CHECKs inside are a second line of defence.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

namespace ifast::cuda {

// y = x / rms(x) * weight over the last dim; with a residual, x + residual is normalised
// and returned too. Returns (y, residual_out or undefined, rstd fp32; fp64 for fp64 x).
std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& residual, double eps);
// Returns (dx, dweight); dresidual_out, when given, is added into dx.
std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                     const at::Tensor& weight, const at::Tensor& rstd,
                                     const std::optional<at::Tensor>& dresidual_out);

// out[off_i : off_i + n_i] = scale * tensors[i], laid end to end from out[0] (see ops_cpu.h).
void flatten_scale_fwd(const std::vector<at::Tensor>& tensors, const at::Tensor& out, double scale);

// Rotary embedding: same contract as ifast::cpu::rotary_fwd / rotary_bwd (ops_cpu.h).
at::Tensor rotary_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& seqlen_offsets, const std::optional<at::Tensor>& cu_seqlens,
                      bool interleaved, bool conjugate, const std::optional<at::Tensor>& out);
at::Tensor rotary_bwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& seqlen_offsets, const std::optional<at::Tensor>& cu_seqlens,
                      bool interleaved, bool conjugate, const std::optional<at::Tensor>& out);

// SwiGLU: same contract as ifast::cpu::swiglu_fwd / swiglu_bwd.
at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up);
std::vector<at::Tensor> swiglu_bwd(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up,
                                   bool packed);

// Cross-entropy and fused linear + cross-entropy: same contracts as ifast::cpu (ops_cpu.h).
std::vector<at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& labels,
                                          int64_t ignore_index, const std::string& reduction);
at::Tensor cross_entropy_bwd(const at::Tensor& dloss, const at::Tensor& logits, const at::Tensor& labels,
                             const at::Tensor& lse, int64_t ignore_index, const std::string& reduction);
std::vector<at::Tensor> fused_linear_cross_entropy_fwd(const at::Tensor& hidden, const at::Tensor& weight,
                                                       const at::Tensor& labels, int64_t ignore_index,
                                                       const std::string& reduction, int64_t chunk_size,
                                                       bool need_dhidden, bool need_dweight);
std::vector<at::Tensor> fused_linear_cross_entropy_bwd(const at::Tensor& dloss, const at::Tensor& dhidden,
                                                       const at::Tensor& dweight);

// KV-cache decode attention (split-K over the cache, GQA) and the decode step's rotary + cache
// append: same contracts as ifast::cpu::flash_attn_kvcache_fwd / decode_rotary_append.
std::vector<at::Tensor> flash_attn_kvcache_fwd(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                               const std::optional<at::Tensor>& block_table,
                                               double softmax_scale, bool causal);
void decode_rotary_append(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& positions, at::Tensor& kv_rows, const at::Tensor& slots,
                          int64_t q_heads);

}  // namespace ifast::cuda
