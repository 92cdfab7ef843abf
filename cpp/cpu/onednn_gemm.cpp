#include "onednn_gemm.h"

#include "cpu_isa.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/CPUBlas.h>
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

// bf16 attention: -1 auto, 0 tiles, 1 brgemm; -2 until the first query reads IFAST_ATTN_BF16_GEMM
std::atomic<int> g_attn{-2};

int attn_from_env() {
  const char* env = std::getenv("IFAST_ATTN_BF16_GEMM");
  if (env != nullptr && std::string(env) == "brgemm") return 1;
  if (env != nullptr && std::string(env) == "tiles") return 0;
  return -1;
}

bool has_amx_packing() {
  static const bool amx = at::native::cpublas::could_pack(at::kBFloat16);
  return amx;
}

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

bool attn_bf16_brgemm() {
  int v = g_attn.load(std::memory_order_relaxed);
  if (v == -2) {
    int expected = -2;
    g_attn.compare_exchange_strong(expected, attn_from_env());
    v = g_attn.load(std::memory_order_relaxed);
  }
  return v < 0 ? has_amx_packing() : v == 1;
}

std::string attn_bf16_gemm() { return attn_bf16_brgemm() ? "brgemm" : "tiles"; }

std::string set_attn_bf16_gemm(const std::string& name) {
  TORCH_CHECK_VALUE(name == "brgemm" || name == "tiles" || name == "auto",
                    "set_attn_bf16_gemm: expected brgemm, tiles or auto, got '", name, "'");
  attn_bf16_brgemm();  // reads the environment first, so it cannot overwrite this later
  const int before = g_attn.exchange(name == "auto" ? -1 : name == "brgemm" ? 1 : 0, std::memory_order_relaxed);
  return before < 0 ? "auto" : before == 1 ? "brgemm" : "tiles";
}

}  // namespace ifast::cpu
