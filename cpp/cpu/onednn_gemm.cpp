#include "onednn_gemm.h"

#include "cpu_isa.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <optional>

namespace ifast::cpu {
namespace {

// The op, when this torch build has oneDNN (it registers the op when torch loads).
const std::optional<c10::OperatorHandle>& linear_op() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op;
}

bool is_intel() {
#ifdef IFAST_X86_DISPATCH
  __builtin_cpu_init();
  return __builtin_cpu_is("intel");
#else
  return true;  // not x86: nothing here to gain over the BLAS
#endif
}

// The CPU's part of the choice, fixed: oneDNN present, not an Intel CPU.
bool onednn_pays_here() {
  static const bool pays = linear_op().has_value() && !is_intel();
  return pays;
}

// -1: follow the CPU; 0: aten; 1: oneDNN (IFAST_FP32_GEMM, or set_fp32_gemm)
int from_env() {
  const char* env = std::getenv("IFAST_FP32_GEMM");
  if (env != nullptr && std::string(env) == "onednn") return linear_op().has_value() ? 1 : 0;
  if (env != nullptr && std::string(env) == "aten") return 0;
  return -1;
}

std::atomic<int> g_choice{-2};  // -2 until the first query reads the environment

}  // namespace

bool onednn_fp32_gemm() {
  int v = g_choice.load(std::memory_order_relaxed);
  if (v == -2) {
    int expected = -2;
    g_choice.compare_exchange_strong(expected, from_env());
    v = g_choice.load(std::memory_order_relaxed);
  }
  // following the CPU, a cap below AVX-512 (IFAST_CPU_ISA) moves the GEMMs back too, as on a CPU
  // without it
  return v < 0 ? cpu_isa() >= Isa::avx512 && onednn_pays_here() : v == 1;
}

at::Tensor linear_nt(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(linear_op().has_value(), "linear_nt: this torch build has no oneDNN");
  // (X, W, B, attr, scalars, algorithm): X W^T, no bias, no fused post-op
  torch::jit::Stack stack{a, b, c10::IValue(), c10::IValue(std::string("none")),
                          c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue()};
  linear_op()->callBoxed(&stack);
  return stack[0].toTensor();
}

std::string fp32_gemm() { return onednn_fp32_gemm() ? "onednn" : "aten"; }

std::string set_fp32_gemm(const std::string& name) {
  TORCH_CHECK_VALUE(name == "onednn" || name == "aten" || name == "auto",
                    "set_fp32_gemm: expected onednn, aten or auto, got '", name, "'");
  onednn_fp32_gemm();  // reads the environment first, so it cannot overwrite this later
  const int v = name == "auto" ? -1 : name == "onednn" && linear_op().has_value() ? 1 : 0;
  const int before = g_choice.exchange(v, std::memory_order_relaxed);
  return before < 0 ? "auto" : before == 1 ? "onednn" : "aten";
}

}  // namespace ifast::cpu
