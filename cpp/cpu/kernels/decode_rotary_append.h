// The step of a decode that sits between the qkv projection and attention: rotate each new token's
// q and k by its position and append its k and v to the KV cache, in one pass over the few new
// tokens. Unfused it is rotary_fwd plus an index_copy_: two calls and a thread wake-up for a few KB
// a layer. One thread: the work is far below what a parallel region costs. Dims past the rotary
// ones are left as they are. Reference: internlm_fast/ops/inference.py::decode_rotary_append_ref.
// Compiled once per instruction set (isa_compile.h): no include guard; IFAST_ISA_LEVEL selects the
// vector code of each path.

#include "rotate_head.h"

namespace ifast::cpu::IFAST_ISA {

void decode_rotary_append(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& positions, at::Tensor& kv_rows, const at::Tensor& slots,
                          int64_t q_heads) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous() && qkv.device().is_cpu(),
              "decode_rotary_append: qkv must be a contiguous CPU tensor (tokens, q_heads + 2 * kv_heads, D)");
  const int64_t n = qkv.size(0), heads = qkv.size(1), D = qkv.size(2), hk = (heads - q_heads) / 2;
  TORCH_CHECK(q_heads > 0 && hk > 0 && q_heads + 2 * hk == heads,
              "decode_rotary_append: qkv's heads must be q_heads + 2 * kv_heads");
  TORCH_CHECK(kv_rows.dim() == 4 && kv_rows.is_contiguous() && kv_rows.size(1) == 2 && kv_rows.size(2) == hk &&
                  kv_rows.size(3) == D && kv_rows.scalar_type() == qkv.scalar_type(),
              "decode_rotary_append: kv_rows must be contiguous (rows, 2, kv_heads, D) of qkv's dtype");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && 2 * cos.size(1) <= D,
              "decode_rotary_append: cos and sin must be contiguous fp32 (positions, rotary_dim / 2)");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong && positions.numel() == n &&
                  slots.numel() == n && positions.is_contiguous() && slots.is_contiguous(),
              "decode_rotary_append: positions and slots must be contiguous int64 (tokens,)");
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  const int64_t rd2 = cos.size(1), rows = kv_rows.size(0);
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "decode_rotary_append: position ", pos[t], " of token ", t,
                " is outside the rotary table (", cos.size(0), " positions)");
    TORCH_CHECK(slot[t] >= 0 && slot[t] < rows, "decode_rotary_append: slot ", slot[t], " of token ", t,
                " is outside the cache (", rows, " rows)");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "decode_rotary_append", [&] {
    scalar_t* x = qkv.mutable_data_ptr<scalar_t>();
    scalar_t* kv = kv_rows.mutable_data_ptr<scalar_t>();
    const float* cp = cos.const_data_ptr<float>();
    const float* sp = sin.const_data_ptr<float>();
    for (int64_t t = 0; t < n; ++t) {
      const float* c = cp + pos[t] * rd2;
      const float* s = sp + pos[t] * rd2;
      scalar_t* q = x + t * heads * D;
      scalar_t* k = q + q_heads * D;
      scalar_t* v = k + hk * D;
      scalar_t* ck = kv + slot[t] * 2 * hk * D;  // the cache row: hk keys, then hk values
      const auto rotate = [&](scalar_t* head) { rotate_head<scalar_t, float, false>(head, head, c, s, 1.f, rd2); };
      for (int64_t h = 0; h < q_heads; ++h) rotate(q + h * D);
      for (int64_t h = 0; h < hk; ++h) {
        rotate(k + h * D);  // q and k stay rotated in qkv for attention
        std::copy(k + h * D, k + (h + 1) * D, ck + h * D);
      }
      std::copy(v, v + hk * D, ck + hk * D);
    }
  });
}

}  // namespace ifast::cpu::IFAST_ISA
