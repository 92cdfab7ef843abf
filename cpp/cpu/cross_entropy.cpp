// The entry points of cross_entropy_fwd, cross_entropy_bwd, fused_linear_cross_entropy_fwd,
// fused_linear_cross_entropy_bwd: each runs kernels/cross_entropy.h compiled for the instruction set
// cpu_isa() picks. The headers the body uses come first (isa_compile.h says why).
#include "common.h"
#include "onednn_gemm.h"
#include "ops_cpu.h"
#include "output_allocator.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/index_copy.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#define IFAST_ISA_BODY "kernels/cross_entropy.h"
#include "isa_compile.h"

namespace ifast::cpu {

std::vector<at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                                          const std::string& reduction) {
  IFAST_ISA_RETURN(cross_entropy_fwd, logits, labels, ignore_index, reduction)
}

at::Tensor cross_entropy_bwd(const at::Tensor& dloss, const at::Tensor& logits, const at::Tensor& labels,
                             const at::Tensor& lse, int64_t ignore_index, const std::string& reduction) {
  IFAST_ISA_RETURN(cross_entropy_bwd, dloss, logits, labels, lse, ignore_index, reduction)
}

std::vector<at::Tensor> fused_linear_cross_entropy_fwd(const at::Tensor& hidden, const at::Tensor& weight,
                                                       const at::Tensor& labels, int64_t ignore_index,
                                                       const std::string& reduction, int64_t chunk_size,
                                                       bool need_dhidden, bool need_dweight) {
  IFAST_ISA_RETURN(fused_linear_cross_entropy_fwd, hidden, weight, labels, ignore_index, reduction, chunk_size,
                   need_dhidden, need_dweight)
}

std::vector<at::Tensor> fused_linear_cross_entropy_bwd(const at::Tensor& dloss, const at::Tensor& dhidden,
                                                       const at::Tensor& dweight) {
  IFAST_ISA_RETURN(fused_linear_cross_entropy_bwd, dloss, dhidden, dweight)
}

}  // namespace ifast::cpu
