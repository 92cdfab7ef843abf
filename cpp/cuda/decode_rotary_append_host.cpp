// Host glue of the CUDA decode step's rotary + cache append (decode_rotary_append.cu): checks,
// device guard, dtype mapping, then the raw-pointer launcher on the current stream. Positions and
// slots stay on the GPU (a decode step must not synchronise); the kernel skips a token whose
// position or slot is out of range.
#include "host_common.h"
#include "kernels.h"
#include "ops_cuda.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace ifast::cuda {

void decode_rotary_append(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& positions, at::Tensor& kv_rows, const at::Tensor& slots,
                          int64_t q_heads) {
  constexpr const char* fn = "decode_rotary_append";
  TORCH_CHECK(qkv.is_cuda() && qkv.dim() == 3 && qkv.is_contiguous(), fn,
              ": qkv must be a contiguous CUDA tensor (tokens, q_heads + 2 * kv_heads, D)");
  const int64_t n = qkv.size(0), heads = qkv.size(1), D = qkv.size(2), hk = (heads - q_heads) / 2;
  TORCH_CHECK(q_heads > 0 && hk > 0 && q_heads + 2 * hk == heads, fn, ": qkv's heads must be q_heads + 2 * kv_heads");
  TORCH_CHECK(kv_rows.dim() == 4 && kv_rows.is_contiguous() && kv_rows.size(1) == 2 && kv_rows.size(2) == hk &&
                  kv_rows.size(3) == D && kv_rows.scalar_type() == qkv.scalar_type(),
              fn, ": kv_rows must be contiguous (rows, 2, kv_heads, D) of qkv's dtype");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && 2 * cos.size(1) <= D,
              fn, ": cos and sin must be contiguous fp32 (positions, rotary_dim / 2)");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong && positions.numel() == n &&
                  slots.numel() == n && positions.is_contiguous() && slots.is_contiguous(),
              fn, ": positions and slots must be contiguous int64 (tokens,)");
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&kv_rows), &cos, &sin, &positions, &slots})
    TORCH_CHECK(t->device() == qkv.device(), fn, ": every tensor must be on qkv's device");
  const DType type = dtype_of(qkv.scalar_type(), fn);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(qkv.device());
  DecodeRotaryAppendArgs a{};
  a.type = type;
  a.qkv = qkv.mutable_data_ptr();
  a.kv_rows = kv_rows.mutable_data_ptr();
  a.cos = cos.const_data_ptr<float>();
  a.sin = sin.const_data_ptr<float>();
  a.positions = positions.const_data_ptr<int64_t>();
  a.slots = slots.const_data_ptr<int64_t>();
  a.tokens = n;
  a.q_heads = q_heads;
  a.kv_heads = hk;
  a.D = D;
  a.rd2 = cos.size(1);
  a.n_positions = cos.size(0);
  a.n_rows = kv_rows.size(0);
  decode_rotary_append_launch(a, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ifast::cuda
