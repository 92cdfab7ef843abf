// Host glue of the CUDA rotary embedding: checks, device guard, the output (x itself, a given
// tensor of any strides with a contiguous last dim, or a new contiguous one), dtype mapping, then
// rotary.cu's launcher on the current stream. Same contract as cpp/cpu/rotary.cpp.
#include "host_common.h"
#include "kernels.h"
#include "ops_cuda.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

namespace ifast::cuda {

at::Tensor rotary_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& seqlen_offsets, const std::optional<at::Tensor>& cu_seqlens,
                      bool interleaved, bool conjugate, const std::optional<at::Tensor>& out) {
  const bool varlen = cu_seqlens.has_value() && cu_seqlens->defined();
  TORCH_CHECK(x.is_cuda(), "rotary_fwd: x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == (varlen ? 3 : 4), "rotary_fwd: x must be 4-D, or 3-D with cu_seqlens");
  TORCH_CHECK(x.size(-1) <= 1 || x.stride(-1) == 1, "rotary_fwd: x's last dim must be contiguous");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.scalar_type() == sin.scalar_type(),
              "rotary_fwd: cos and sin must be contiguous 2-D of one shape and dtype");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() || cos.scalar_type() == at::kFloat,
              "rotary_fwd: cos/sin must have x's dtype or fp32");
  TORCH_CHECK(cos.device() == x.device() && sin.device() == x.device(),
              "rotary_fwd: cos and sin must be on x's device");
  const int64_t D = x.size(-1), rd2 = cos.size(1), heads = x.size(-2);
  TORCH_CHECK(rd2 >= 1 && 2 * rd2 <= D, "rotary_fwd: rotary_dim must be in [2, headdim]");
  TORCH_CHECK(heads * D <= std::numeric_limits<int>::max(), "rotary_fwd: heads * headdim too large");
  RotaryArgs a{};
  if (varlen) {
    TORCH_CHECK(cu_seqlens->scalar_type() == at::kInt && cu_seqlens->dim() == 1 &&
                    cu_seqlens->is_contiguous() && cu_seqlens->numel() >= 1 &&
                    cu_seqlens->device() == x.device(),
                "rotary_fwd: cu_seqlens must be contiguous int32 (batch + 1,) on x's device");
    a.batch = cu_seqlens->numel() - 1;
    a.seqlen = x.size(0);
  } else {
    a.batch = x.size(0);
    a.seqlen = x.size(1);
  }
  TORCH_CHECK(seqlen_offsets.scalar_type() == at::kLong && seqlen_offsets.dim() == 1 &&
                  seqlen_offsets.numel() == a.batch && seqlen_offsets.is_contiguous() &&
                  seqlen_offsets.device() == x.device(),
              "rotary_fwd: seqlen_offsets must be contiguous int64 (batch,) on x's device");
  at::Tensor y;
  if (out.has_value() && out->defined()) {
    y = *out;
    TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type() &&
                    y.device() == x.device() && (D <= 1 || y.stride(-1) == 1),
                "rotary_fwd: out must match x's shape, dtype and device, last dim contiguous");
  } else {
    y = at::empty(x.sizes(), x.options());
  }
  if (x.numel() == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t off = varlen ? 1 : 0;  // 3-D has no batch dim: the token stride sits in dim 0
  a.x_type = dtype_of(x.scalar_type(), "rotary_fwd");
  a.cs_type = dtype_of(cos.scalar_type(), "rotary_fwd");
  a.x = x.const_data_ptr();
  a.out = y.data_ptr();  // may be x's own memory (in place)
  a.cos = cos.const_data_ptr();
  a.sin = sin.const_data_ptr();
  a.seqlen_offsets = seqlen_offsets.const_data_ptr<int64_t>();
  a.cu_seqlens = varlen ? cu_seqlens->const_data_ptr<int32_t>() : nullptr;
  a.heads = heads;
  a.head_dim = D;
  a.rd2 = rd2;
  a.x_stride_batch = varlen ? 0 : stride_or_zero(x, 0);
  a.x_stride_seq = stride_or_zero(x, 1 - off);
  a.x_stride_head = stride_or_zero(x, 2 - off);
  a.out_stride_batch = varlen ? 0 : stride_or_zero(y, 0);
  a.out_stride_seq = stride_or_zero(y, 1 - off);
  a.out_stride_head = stride_or_zero(y, 2 - off);
  a.interleaved = interleaved;
  a.conjugate = conjugate;
  rotary_launch(a, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor rotary_bwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& seqlen_offsets, const std::optional<at::Tensor>& cu_seqlens,
                      bool interleaved, bool conjugate, const std::optional<at::Tensor>& out) {
  // the rotation is orthogonal: its gradient is the rotation by -angle
  return rotary_fwd(x, cos, sin, seqlen_offsets, cu_seqlens, interleaved, !conjugate, out);
}

}  // namespace ifast::cuda
