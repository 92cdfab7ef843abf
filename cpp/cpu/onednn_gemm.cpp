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

// A choice between two routes, `on` and `off`, or "auto" (the machine decides) until the environment
// variable, read at the first query, or set() names one.
class Choice {
 public:
  Choice(const char* env, const char* on, const char* off) : env_(env), on_(on), off_(off) {}

  // 1: on, 0: off, -1: auto
  int setting() {
    int v = v_.load(std::memory_order_relaxed);
    if (v == -2) {
      int expected = -2;
      v_.compare_exchange_strong(expected, parse(std::getenv(env_)));  // an unknown value means auto
      v = v_.load(std::memory_order_relaxed);
    }
    return v;
  }

  // Sets `name` (on, off or auto) and returns the setting it replaced; ValueError, naming `fn`, for
  // another name.
  std::string set(const std::string& name, const char* fn) {
    const int v = parse(name.c_str());
    TORCH_CHECK_VALUE(v >= 0 || name == "auto", fn, ": expected ", on_, ", ", off_, " or auto, got '", name, "'");
    setting();  // reads the environment first, so it cannot overwrite this later
    const int before = v_.exchange(v, std::memory_order_relaxed);
    return before < 0 ? "auto" : before == 1 ? on_ : off_;
  }

  const char* name(bool on) const { return on ? on_ : off_; }

 private:
  int parse(const char* s) const {
    if (s != nullptr && std::string(s) == on_) return 1;
    if (s != nullptr && std::string(s) == off_) return 0;
    return -1;
  }

  const char *env_, *on_, *off_;
  std::atomic<int> v_{-2};  // -2 until the first query
};

Choice& fp32_choice() {
  static Choice c("IFAST_FP32_GEMM", "onednn", "aten");
  return c;
}

Choice& attn_choice() {
  static Choice c("IFAST_ATTN_BF16_GEMM", "brgemm", "tiles");
  return c;
}

Choice& bf16_choice() {
  static Choice c("IFAST_BF16_GEMM", "widen", "native");
  return c;
}

bool has_amx_packing() {
  static const bool amx = at::native::cpublas::could_pack(at::kBFloat16);
  return amx;
}

}  // namespace

bool onednn_fp32_gemm() {
  const int v = fp32_choice().setting();
  // following the CPU, a cap below AVX-512 (IFAST_CPU_ISA) moves the GEMMs back too, as on a CPU
  // without it; oneDNN named where torch has none is aten
  return v < 0 ? cpu_isa() >= Isa::avx512 && onednn_pays_here() : v == 1 && linear_op().has_value();
}

at::Tensor linear_nt(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(linear_op().has_value(), "linear_nt: this torch build has no oneDNN");
  // (X, W, B, attr, scalars, algorithm): X W^T, no bias, no fused post-op
  torch::jit::Stack stack{a, b, c10::IValue(), c10::IValue(std::string("none")),
                          c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue()};
  linear_op()->callBoxed(&stack);
  return stack[0].toTensor();
}

std::string fp32_gemm() { return fp32_choice().name(onednn_fp32_gemm()); }

std::string set_fp32_gemm(const std::string& name) { return fp32_choice().set(name, "set_fp32_gemm"); }

bool bf16_gemm_widened() {
  const int v = bf16_choice().setting();
#ifdef IFAST_X86_DISPATCH
  return v < 0 ? detected_isa() < Isa::avx512 : v == 1;
#else
  return v == 1;
#endif
}

std::string bf16_gemm() { return bf16_choice().name(bf16_gemm_widened()); }

std::string set_bf16_gemm(const std::string& name) { return bf16_choice().set(name, "set_bf16_gemm"); }

bool attn_bf16_brgemm() {
  const int v = attn_choice().setting();
  return v < 0 ? has_amx_packing() : v == 1;
}

std::string attn_bf16_gemm() { return attn_choice().name(attn_bf16_brgemm()); }

std::string set_attn_bf16_gemm(const std::string& name) { return attn_choice().set(name, "set_attn_bf16_gemm"); }

}  // namespace ifast::cpu
