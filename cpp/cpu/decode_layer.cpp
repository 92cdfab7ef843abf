// A decode step's whole decoder layer in one call, for models whose projections are laid out for the
// decode GEMMs (int8 or bf16 panels, or the fp32 column panels a small fp32 model decodes on):
// RMSNorm (+ residual), q/k/v, rotary + cache append, attention over the cache, o, RMSNorm
// (+ residual), gate/up, SwiGLU, down. It runs the same kernels the model calls one by one, in the
// same order, so its result is the same to the bit.
//
// Why: a batch-1 step of a large model streams hundreds of MB of weights through the caches, and
// each GEMM leaves them holding weights only. Everything run between two GEMMs then starts cold:
// the Python of the model, pybind11 and the dispatcher, each op's allocation. Measured on 2 Zen 4
// cores after a 256 MB read: a tensor's .view() 52 us cold against 4 warm, a pybind11 call 19 us
// against 1.5. Four such stretches a layer were ~0.5 ms of a 7B-shaped int8 layer's ~5 ms; here the
// stretches hold only the kernels' own code.
#include "ops_cpu.h"

#include <c10/util/Exception.h>

namespace ifast::cpu {
namespace {

// x W^T + b through the decode GEMM the weights are laid out for: int8 with scales, fp32 column
// panels, else bf16 (its bias in x's dtype), as the model's projections call them.
at::Tensor project(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& scales,
                   const std::optional<at::Tensor>& bias) {
  if (scales.has_value()) return few_rows_linear_int8(x, panels, *scales, bias);
  if (panels.scalar_type() == at::kFloat) return few_rows_linear(x, panels, bias);
  if (!bias.has_value() || bias->scalar_type() == x.scalar_type()) return few_rows_linear_bf16(x, panels, bias);
  return few_rows_linear_bf16(x, panels, bias->to(x.scalar_type()));
}

}  // namespace

std::vector<at::Tensor> decode_layer(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& attn_norm,
    const at::Tensor& mlp_norm, double eps, const at::Tensor& qkv_panels, const std::optional<at::Tensor>& qkv_scales,
    const std::optional<at::Tensor>& qkv_bias, const at::Tensor& o_panels, const std::optional<at::Tensor>& o_scales,
    const std::optional<at::Tensor>& o_bias, const at::Tensor& gate_up_panels,
    const std::optional<at::Tensor>& gate_up_scales, const at::Tensor& down_panels,
    const std::optional<at::Tensor>& down_scales, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& positions, at::Tensor& kv_rows, const at::Tensor& slots, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& cache_lens, const std::optional<at::Tensor>& block_table,
    double softmax_scale, int64_t q_heads) {
  TORCH_CHECK_VALUE(x.dim() == 2, "decode_layer: x must be (tokens, hidden), got ", x.sizes());
  TORCH_CHECK_VALUE(kv_rows.dim() == 4 && kv_rows.size(1) == 2,
                    "decode_layer: kv_rows must be (rows, 2, kv_heads, head_dim), got ", kv_rows.sizes());
  const int64_t tokens = x.size(0), head_dim = kv_rows.size(3);
  at::Tensor h, summed;
  if (residual.has_value()) {
    auto r = rms_norm_fwd(x, attn_norm, residual, eps);
    h = r[0], summed = r[1];
  } else {
    h = rms_norm_fwd(x, attn_norm, std::nullopt, eps)[0], summed = x;
  }
  const at::Tensor qkv = project(h, qkv_panels, qkv_scales, qkv_bias).view({tokens, -1, head_dim});
  decode_rotary_append(qkv, cos, sin, positions, kv_rows, slots, q_heads);
  const at::Tensor q = qkv.slice(1, 0, q_heads).unsqueeze(1);  // (tokens, 1, q_heads, head_dim)
  const at::Tensor attn = flash_attn_kvcache_fwd(q, k_cache, v_cache, cache_lens, block_table, softmax_scale, true)[0];
  const at::Tensor o = project(attn.view({tokens, -1}), o_panels, o_scales, o_bias);
  auto r = rms_norm_fwd(o, mlp_norm, summed, eps);
  const at::Tensor gate_up = project(r[0], gate_up_panels, gate_up_scales, std::nullopt);
  const int64_t f = gate_up.size(1) / 2;
  const at::Tensor act = swiglu_fwd(gate_up.slice(1, 0, f), gate_up.slice(1, f));
  return {project(act, down_panels, down_scales, std::nullopt), r[1]};
}

}  // namespace ifast::cpu
