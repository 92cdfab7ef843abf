#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>

namespace ifast::cpu {
namespace {

Isa detect() {
#ifdef IFAST_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni") ? Isa::avx512_bf16
                                                                                         : Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::avx2;
#endif
  return Isa::scalar;
}

bool parse(const std::string& name, Isa* out) {
  for (Isa l : {Isa::scalar, Isa::avx2, Isa::avx512, Isa::avx512_bf16})
    if (name == isa_name(l)) {
      *out = l;
      return true;
    }
  return false;
}

// -1 until the first query reads the environment.
std::atomic<int> g_level{-1};

int from_env() {
  const Isa best = detect();
  Isa cap = Isa::avx512_bf16;
  const char* env = std::getenv("IFAST_CPU_ISA");
  // an unknown value is ignored rather than fatal: the module must still import
  if (env != nullptr && *env != '\0' && !parse(env, &cap)) cap = Isa::avx512_bf16;
  return static_cast<int>(std::min(best, cap));
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512_bf16: return "avx512_bf16";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "scalar";
  }
}

Isa detected_isa() {
  static const Isa best = detect();
  return best;
}

Isa cpu_isa() {
  int level = g_level.load(std::memory_order_relaxed);
  if (level < 0) {
    int expected = -1;
    g_level.compare_exchange_strong(expected, from_env());
    level = g_level.load(std::memory_order_relaxed);
  }
  return static_cast<Isa>(level);
}

std::string isa() { return isa_name(cpu_isa()); }

std::string set_isa_cap(const std::string& level) {
  Isa cap;
  TORCH_CHECK_VALUE(parse(level, &cap), "set_isa_cap: expected scalar, avx2, avx512 or avx512_bf16, got '", level, "'");
  g_level.store(static_cast<int>(std::min(detected_isa(), cap)), std::memory_order_relaxed);
  return isa();
}

}  // namespace ifast::cpu
