// Helpers shared by the CUDA ops' host glue (cpp/cuda/*_host.cpp): torch's dtypes and strides
// mapped to what the raw-pointer launchers of kernels.h take.
#pragma once

#include "kernels.h"

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace ifast::cuda {

inline DType dtype_of(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", t);
  }
}

// The accumulation type of a storage type: fp64 for fp64, else fp32.
inline at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A dimension of size 1 is never stepped over, and torch may record any stride for it: 0 keeps the
// kernels' alignment checks (stride % vector width) from rejecting the vector path over it.
inline int64_t stride_or_zero(const at::Tensor& t, int64_t dim) {
  return t.size(dim) == 1 ? 0 : t.stride(dim);
}

}  // namespace ifast::cuda
