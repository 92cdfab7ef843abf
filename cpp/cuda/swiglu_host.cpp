// Host glue of the CUDA SwiGLU: checks, device guard, allocation on torch's caching allocator,
// dtype mapping, then swiglu.cu's launchers on the current stream. Same contract as
// cpp/cpu/swiglu.cpp: gate and up may be row-strided views, read in place.
#include "host_common.h"
#include "kernels.h"
#include "ops_cuda.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace ifast::cuda {
namespace {

// gate/up/dout: 2-D, gate's shape, dtype and device, unit column stride (any when F <= 1).
void check_operand(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& gate) {
  TORCH_CHECK(t.is_cuda(), fn, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 2, fn, ": ", name, " must be 2-D");
  TORCH_CHECK(t.sizes() == gate.sizes() && t.scalar_type() == gate.scalar_type() &&
                  t.device() == gate.device(),
              fn, ": ", name, " must match gate in shape, dtype and device");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, fn, ": ", name, " must have unit column stride");
}

}  // namespace

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  check_operand("swiglu_fwd", "gate", gate, gate);
  check_operand("swiglu_fwd", "up", up, gate);
  const int64_t rows = gate.size(0), F = gate.size(1);
  at::Tensor out = at::empty({rows, F}, gate.options());
  if (rows == 0 || F == 0) return out;
  const c10::cuda::CUDAGuard guard(gate.device());
  SwigluFwdArgs a{};
  a.type = dtype_of(gate.scalar_type(), "swiglu_fwd");
  a.gate = gate.const_data_ptr();
  a.up = up.const_data_ptr();
  a.out = out.mutable_data_ptr();
  a.gate_stride = stride_or_zero(gate, 0);
  a.up_stride = stride_or_zero(up, 0);
  a.rows = rows;
  a.F = F;
  swiglu_fwd_launch(a, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::vector<at::Tensor> swiglu_bwd(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up,
                                   bool packed) {
  check_operand("swiglu_bwd", "gate", gate, gate);
  check_operand("swiglu_bwd", "up", up, gate);
  check_operand("swiglu_bwd", "dout", dout, gate);
  TORCH_CHECK(dout.is_contiguous(), "swiglu_bwd: dout must be contiguous");
  const int64_t rows = gate.size(0), F = gate.size(1);
  std::vector<at::Tensor> grads;
  if (packed) {
    grads.push_back(at::empty({rows, 2 * F}, gate.options()));
  } else {
    grads.push_back(at::empty({rows, F}, gate.options()));
    grads.push_back(at::empty({rows, F}, gate.options()));
  }
  if (rows == 0 || F == 0) return grads;
  const c10::cuda::CUDAGuard guard(gate.device());
  SwigluBwdArgs a{};
  a.type = dtype_of(gate.scalar_type(), "swiglu_bwd");
  a.dout = dout.const_data_ptr();
  a.gate = gate.const_data_ptr();
  a.up = up.const_data_ptr();
  a.dgate = grads[0].mutable_data_ptr();
  a.dup = packed ? static_cast<void*>(static_cast<char*>(a.dgate) + F * gate.element_size())
                 : grads[1].mutable_data_ptr();
  a.gate_stride = stride_or_zero(gate, 0);
  a.up_stride = stride_or_zero(up, 0);
  a.grad_stride = packed ? 2 * F : F;
  a.rows = rows;
  a.F = F;
  swiglu_bwd_launch(a, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grads;
}

}  // namespace ifast::cuda
