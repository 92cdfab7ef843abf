// Raw-pointer launchers of the CUDA kernels: the only interface between the .cu files (compiled by
// nvcc against CUDA headers alone, so they build in seconds) and the torch-facing host glue in the
// .cpp files. Callers have checked shapes, dtypes, devices and contiguity; pointers are device
// pointers on the current device, rows are contiguous with H elements each.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ifast::cuda {

enum class DType : int { kFloat32, kFloat64, kBFloat16, kFloat16 };

// The weight must be x's own dtype or x's accumulation type (fp32; fp64 for fp64 x): the host
// converts any other weight dtype first, which keeps the kernel instantiations few.
struct RmsNormFwdArgs {
  DType x_type, w_type;
  const void* x;
  const void* residual;  // nullable
  const void* w;
  void* y;
  void* residual_out;  // x + residual, rounded to x's dtype; null when residual is null
  void* rstd;          // rows values of the accumulation type
  int64_t rows, H;
  double eps;
};
void rms_norm_fwd_launch(const RmsNormFwdArgs& a, cudaStream_t stream);

// dweight is reduced in two kernels: per-block partial sums into a workspace of the accumulation
// type (rms_norm_bwd_workspace_rows(a) x H), then a fixed-order sum of those rows, so the result
// is deterministic. dw_type: fp32, bf16 or fp16 for an fp32 accumulation, fp64 for fp64.
struct RmsNormBwdArgs {
  DType x_type, w_type, dw_type;
  const void* dy;
  const void* x;
  const void* w;
  const void* rstd;       // accumulation type
  const void* dresidual;  // nullable; added into dx
  void* dx;
  void* dw;
  int64_t rows, H;
};
int64_t rms_norm_bwd_workspace_rows(const RmsNormBwdArgs& a);
void rms_norm_bwd_launch(const RmsNormBwdArgs& a, void* workspace, cudaStream_t stream);

// out[off_t + i] = scale * src_t[i] for every tensor t (the sharded optimizer's gradient buckets).
// desc: n device-resident rows (src pointer, offset into out, numel) as int64; n <= 65535 per launch.
// (src_type, dst_type): equal, or bf16/fp16 -> fp32. The product is taken in fp32 (fp64 for fp64).
struct FlattenScaleArgs {
  DType src_type, dst_type;
  const int64_t* desc;
  int64_t n, max_numel;
  void* out;
  double scale;
};
void flatten_scale_launch(const FlattenScaleArgs& a, cudaStream_t stream);

// Cross-entropy rows (cross_entropy.cu): logits x (rows, V) with row stride ld_x. Forward
// (lse_in null): lse_out[r] = log-sum-exp of row r and loss_rows[r] = lse - x[r, label], both 0
// for ignored rows, whose logits are never read. Backward (lse_in set): lse is read. With g
// (row stride ld_g, may be x itself for an in-place pass after the forward's): g = (softmax -
// onehot) * scale, scale = (*dloss or 1) / max(*count, 1) (count null: 1), zeros for ignored rows.
// Labels must be ignore_index or in [0, V) (checked by the caller); others are never read out of
// range and give a NaN loss. lse_in, lse_out and dloss are of the accumulation type.
struct CrossEntropyArgs {
  DType x_type;
  const void* x;
  void* g;               // nullable
  const int64_t* labels;
  const void* lse_in;    // nullable
  void* lse_out;         // nullable
  double* loss_rows;     // nullable
  const void* dloss;     // nullable, one value
  const int64_t* count;  // nullable, one value
  int64_t rows, V, ld_x, ld_g, ignore_index;
};
void cross_entropy_rows_launch(const CrossEntropyArgs& a, cudaStream_t stream);

// One block: *count = the labels that are not ignore_index; *loss = the sum of loss_rows over
// them in a fixed order (divided by the count for mean, 0.0 when there are none), rounded to
// loss_type (fp32 or fp64). Each output nullable; loss needs loss_rows.
struct CrossEntropyReduceArgs {
  DType loss_type;
  const double* loss_rows;
  const int64_t* labels;
  int64_t rows, ignore_index;
  bool mean;
  void* loss;
  int64_t* count;
};
void cross_entropy_reduce_launch(const CrossEntropyReduceArgs& a, cudaStream_t stream);

// Decoding attention over a KV cache (flash-decoding): q (B, Sq, Hq, D) against k, v (B, cache_len,
// Hk, D) given by element strides (batch, token, head) and a unit last stride; the first lens[b]
// (int32, device) rows of sequence b are valid, causal aligned to the end (query i sees key j when
// j <= i + lens[b] - Sq); GQA: Hq a multiple of Hk. Writes out (B, Sq, Hq, D) contiguous in q's
// dtype and lse (B, Hq, Sq) fp32; a row that sees no key gets 0 and +inf. fp32, bf16, fp16; D a
// multiple of 8 up to 256. Each sequence's keys are cut into `splits` chunks: splits > 0 asks for
// that many (at most cache_len), 0 picks from num_sms, B * Hk and cache_len. With more than one
// chunk the launch needs flash_attn_kvcache_plan(a).workspace_floats fp32 of device workspace.
// Paged (block_table not null): k, v are a pool (num_blocks, block_size, Hk, D), strides (block,
// token, head); token t of sequence b is at [block_table[b * block_table_stride + t / block_size],
// t % block_size]; block_table int32 (B, max_blocks) on the device and cache_len = max_blocks *
// block_size (lens beyond it are clamped to it, block ids to [0, num_blocks)).
struct FlashAttnKvcacheArgs {
  DType type;
  const void* q;
  const void* k;
  const void* v;
  const int32_t* lens;
  const int32_t* block_table;
  void* out;
  float* lse;
  int64_t q_strides[3], k_strides[3], v_strides[3];
  int64_t B, Sq, Hq, Hk, D, cache_len;
  int64_t block_table_stride, block_size, num_blocks;
  double softmax_scale;
  bool causal;
  int num_sms;
  int splits;
};
// grid: (blocks_x = splits * tiles, Hk, B); tiles: query-row tiles per kv head
struct FlashAttnKvcachePlan {
  int64_t splits, tiles, blocks_x, workspace_floats;
};
FlashAttnKvcachePlan flash_attn_kvcache_plan(const FlashAttnKvcacheArgs& a);
void flash_attn_kvcache_launch(const FlashAttnKvcacheArgs& a, float* workspace, cudaStream_t stream);

// A decode step's rotary + cache append, in place: qkv (tokens, q_heads + 2 * kv_heads, D)
// contiguous; q and k heads rotated (pairs (i, i + rd2), i < rd2; dims past 2 * rd2 untouched) by
// cos/sin fp32 (n_positions, rd2) row positions[t]; k (rotated) and v of token t copied into row
// slots[t] of kv_rows (n_rows, 2, kv_heads, D) contiguous. positions, slots: int64 on the device; a
// token whose position or slot is out of range is skipped. fp32 math (fp64 too), one rounding.
struct DecodeRotaryAppendArgs {
  DType type;
  void* qkv;
  void* kv_rows;
  const float* cos;
  const float* sin;
  const int64_t* positions;
  const int64_t* slots;
  int64_t tokens, q_heads, kv_heads, D, rd2, n_positions, n_rows;
};
void decode_rotary_append_launch(const DecodeRotaryAppendArgs& a, cudaStream_t stream);

// Rotary embedding (see ops_cpu.h): x (batch, seqlen, heads, head_dim), or (seqlen, heads,
// head_dim) with seqlen the total tokens when cu_seqlens (batch + 1,) is given; strides in
// elements, the last dim contiguous. out may be x (then the dims past 2 * rd2 are left alone, else
// copied). cos/sin (rows, rd2) contiguous, x's dtype or fp32 (cs_type); seqlen_offsets (batch,).
// conjugate rotates by -angle.
struct RotaryArgs {
  DType x_type, cs_type;
  const void* x;
  void* out;
  const void* cos;
  const void* sin;
  const int64_t* seqlen_offsets;
  const int32_t* cu_seqlens;  // nullable: x is then batch x seqlen tokens
  int64_t batch, seqlen, heads, head_dim, rd2;
  int64_t x_stride_batch, x_stride_seq, x_stride_head;  // batch strides unused with cu_seqlens
  int64_t out_stride_batch, out_stride_seq, out_stride_head;
  bool interleaved, conjugate;
};
void rotary_launch(const RotaryArgs& a, cudaStream_t stream);

// out (rows, F) contiguous = silu(gate) * up; gate and up (rows, F) with unit column stride and
// the given row strides (the halves of a packed (rows, 2F) tensor work in place).
struct SwigluFwdArgs {
  DType type;
  const void* gate;
  const void* up;
  void* out;
  int64_t gate_stride, up_stride, rows, F;
};
void swiglu_fwd_launch(const SwigluFwdArgs& a, cudaStream_t stream);

// dout (rows, F) contiguous; dgate and dup rows grad_stride apart (F for two tensors, 2F with
// dup = dgate + F for the packed (rows, 2F) gradient).
struct SwigluBwdArgs {
  DType type;
  const void* dout;
  const void* gate;
  const void* up;
  void* dgate;
  void* dup;
  int64_t gate_stride, up_stride, grad_stride, rows, F;
};
void swiglu_bwd_launch(const SwigluBwdArgs& a, cudaStream_t stream);

}  // namespace ifast::cuda
