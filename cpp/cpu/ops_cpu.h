// Declarations of the CPU kernels' entry points. Python has checked every argument before
// these run; the TORCH_CHECKs inside are a second line of defence, never the interface.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace ifast::cpu {

// y = x / rms(x) * weight over the last dim; with a residual, x + residual is normalised
// and returned too. Returns (y, residual_out or undefined, rstd fp32).
std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& residual, double eps);
// Returns (dx, dweight); dresidual_out, when given, is added into dx.
std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                     const at::Tensor& weight, const at::Tensor& rstd,
                                     const std::optional<at::Tensor>& dresidual_out);

// Flash attention over packed sequences: q (total_q, Hq, D), k/v (total_k, Hk, D), last dim
// contiguous, other strides free; cu_seqlens int32 (batch+1). Returns (out (total_q, Hq, D), lse
// (Hq, total_q) fp32, natural log of the scaled scores' sum; +inf for a row that sees no key).
std::vector<at::Tensor> flash_attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                       double softmax_scale, bool causal);
// Returns (dq, dk, dv) in the inputs' dtype; GQA gradients are summed into the shared kv heads.
std::vector<at::Tensor> flash_attn_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                       const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                       double softmax_scale, bool causal);
// Attention of q (B, Sq, Hq, D) against KV caches of which the first cache_lens[b] (int32) tokens
// of sequence b are valid (the new tokens already appended); causal aligned to the end.
// Without block_table the caches are (B, cache_len, Hk, D). With block_table int32 (B, max_blocks),
// last dim contiguous, they are a paged pool (num_blocks, block_size, Hk, D) (flash-attn's and vLLM's
// layout): token t of sequence b is at [block_table[b, t / block_size], t % block_size], and
// cache_lens[b] <= max_blocks * block_size. Returns (out (B, Sq, Hq, D), lse (B, Hq, Sq) fp32).
std::vector<at::Tensor> flash_attn_kvcache_fwd(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                               const std::optional<at::Tensor>& block_table,
                                               double softmax_scale, bool causal);
// Rotary embedding (flash-attn's apply_rotary): x (batch, seqlen, heads, d), or (total, heads, d)
// with cu_seqlens int32 (batch + 1,); last dim contiguous, other strides arbitrary. cos/sin
// (seqlen_ro, rotary_dim / 2) contiguous, x's dtype or fp32; seqlen_offsets int64 (batch,).
// Token t of sequence b uses row seqlen_offsets[b] + t; conjugate rotates by -angle. Writes into
// out when given (out may be x), else into a new contiguous tensor; returns it.
at::Tensor rotary_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& seqlen_offsets, const std::optional<at::Tensor>& cu_seqlens,
                      bool interleaved, bool conjugate, const std::optional<at::Tensor>& out);
// The gradient (x = dy): rotary_fwd with conjugate flipped; same arguments as the forward.
at::Tensor rotary_bwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& seqlen_offsets, const std::optional<at::Tensor>& cu_seqlens,
                      bool interleaved, bool conjugate, const std::optional<at::Tensor>& out);
// out = silu(gate) * up. gate and up: (rows, F), unit column stride, any row stride (the halves of
// a packed (rows, 2F) tensor are passed as views). Returns a contiguous (rows, F) tensor.
at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up);
// dout contiguous (rows, F). Returns {dgate, dup}, or with packed {dx}: (rows, 2F), dgate in the
// first F columns and dup in the last F.
std::vector<at::Tensor> swiglu_bwd(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up,
                                   bool packed);
// Cross-entropy of logits (rows, V) against int64 labels (rows,); rows whose label equals
// ignore_index count for nothing. reduction is "mean" (over the non-ignored rows; 0.0 when there
// are none) or "sum". Returns (loss: 0-d, lse: (rows,) log-sum-exp, 0 for ignored rows), both
// fp32 (fp64 for fp64 logits). Labels outside [0, V) that are not ignore_index: ValueError.
std::vector<at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& labels,
                                          int64_t ignore_index, const std::string& reduction);
// dlogits (rows, V) in logits' dtype = dloss * d loss / d logits, from the forward's lse.
at::Tensor cross_entropy_bwd(const at::Tensor& dloss, const at::Tensor& logits, const at::Tensor& labels,
                             const at::Tensor& lse, int64_t ignore_index, const std::string& reduction);

// cross_entropy(hidden @ weight^T, labels) without the (rows, V) logits: hidden (rows, H),
// weight (V, H) of hidden's dtype, labels as above. chunk_size: tokens per chunk, 0 = the
// backend's own choice. Computes the gradients of the loss (for a unit incoming gradient) in the
// same pass when asked. Returns (loss: 0-d fp32 (fp64 for fp64), dhidden (rows, H) or (0,),
// dweight (V, H) or (0,)), the gradients in hidden's dtype.
std::vector<at::Tensor> fused_linear_cross_entropy_fwd(const at::Tensor& hidden, const at::Tensor& weight,
                                                       const at::Tensor& labels, int64_t ignore_index,
                                                       const std::string& reduction, int64_t chunk_size,
                                                       bool need_dhidden, bool need_dweight);
// (dloss * dhidden, dloss * dweight) as new tensors; (0,) inputs give (0,) outputs.
std::vector<at::Tensor> fused_linear_cross_entropy_bwd(const at::Tensor& dloss, const at::Tensor& dhidden,
                                                       const at::Tensor& dweight);

// Flatten and scale (the sharded optimizer's gradient buckets): out[off_i : off_i + n_i] =
// scale * tensors[i], laid end to end from out[0]; elements of out past the last tensor are left
// as they are. Tensors contiguous, one dtype; out contiguous 1-D of that dtype, or fp32 for
// bf16/fp16 tensors. Accumulates the product in fp32 (fp64 for fp64).
void flatten_scale_fwd(const std::vector<at::Tensor>& tensors, const at::Tensor& out, double scale);

// out = x (M, K) @ W (K, N) [+ bias (N,)] for the few rows of a decode step, W given as column
// panels (N / 16, K, 16) made once; panels split across the threads (MKL repacks the weights per
// call and uses one thread at small M). fp32, contiguous.
at::Tensor few_rows_linear(const at::Tensor& x, const at::Tensor& panels_w, const std::optional<at::Tensor>& bias);
// few_rows_linear with bf16 weights: panels (N / 16, ceil(K / 2), 32) bf16 in size, pairs of W^T rows
// interleaved, 4 panels to a group taking turns pair by pair (few_rows_linear_bf16_panels in
// ops/inference.py, few_rows_panels.h). x (M, K) fp32 or bf16, bias (N,) of x's dtype; fp32
// accumulation, out (M, N) in x's dtype. Contiguous.
at::Tensor few_rows_linear_bf16(const at::Tensor& x, const at::Tensor& panels_w,
                                const std::optional<at::Tensor>& bias);
// few_rows_linear with int8 weight-only quantized weights (quantize_int8 in ops/inference.py):
// panels int8 laid out as few_rows_linear_bf16's, scales (N / 16, ceil(K / 64), 16) fp32, one per 64
// input values of an output column; multiplied in integers. x, bias and out as few_rows_linear_bf16.
at::Tensor few_rows_linear_int8(const at::Tensor& x, const at::Tensor& panels_w, const at::Tensor& scales,
                                const std::optional<at::Tensor>& bias);
// The index of each row's maximum (the first; the first NaN if any), x (rows, V) fp32 with
// contiguous rows -> (rows,) int64: torch.argmax(x, -1) for greedy decoding.
at::Tensor argmax_rows(const at::Tensor& x);
// A decode step's new tokens: qkv (tokens, q_heads + 2 * kv_heads, D) contiguous; rotates q and k in
// place (half-rotated, cos/sin fp32 (positions, rotary_dim / 2), token t at positions[t]) and copies
// k and v into row slots[t] of kv_rows (rows, 2, kv_heads, D).
void decode_rotary_append(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& positions, at::Tensor& kv_rows, const at::Tensor& slots,
                          int64_t q_heads);
// A decode step's decoder layer, its projections in decode-GEMM layout (int8 where scales are given,
// else fp32 column panels or bf16 ones, by the panels' dtype): the kernels above in the order the
// model calls them. Returns (mlp out, residual).
std::vector<at::Tensor> decode_layer(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& attn_norm,
    const at::Tensor& mlp_norm, double eps, const at::Tensor& qkv_panels, const std::optional<at::Tensor>& qkv_scales,
    const std::optional<at::Tensor>& qkv_bias, const at::Tensor& o_panels, const std::optional<at::Tensor>& o_scales,
    const std::optional<at::Tensor>& o_bias, const at::Tensor& gate_up_panels,
    const std::optional<at::Tensor>& gate_up_scales, const at::Tensor& down_panels,
    const std::optional<at::Tensor>& down_scales, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& positions, at::Tensor& kv_rows, const at::Tensor& slots, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& cache_lens, const std::optional<at::Tensor>& block_table,
    double softmax_scale, int64_t q_heads);

}  // namespace ifast::cpu
