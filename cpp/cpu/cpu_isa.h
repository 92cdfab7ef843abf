// Run-time choice of the vector instruction set: every CPU kernel carries a scalar, an AVX2 and an
// AVX-512 path, and the one that runs is picked here. One level more, avx512_bf16 (AVX-512 plus the
// AVX512-BF16 dot product and AVX512-VNNI, which every CPU with the first has: Intel Cooper Lake and
// Sapphire Rapids on, AMD Zen 4 on), runs the AVX-512 body everywhere and lets attention on bf16
// inputs multiply in bf16 (kernels/flash_attn_bf16.h) and the int8 decode GEMM multiply-add in one
// instruction (kernels/few_rows_linear_int8.h); capping at avx512 turns those off alone.
//
// The module is compiled with -march=$INTERNLM_FAST_CPU_ARCH (x86-64-v2 by default, so a wheel runs
// on any x86-64 machine of the last fifteen years). The paths exist in the binary whatever -march
// was: every kernel compiles its body once per level (isa_compile.h) into the namespaces
// ifast::cpu::scalar / avx2 / avx512 and calls through IFAST_ISA_RETURN. The level is the best the
// CPU supports (__builtin_cpu_supports), capped by the environment variable IFAST_CPU_ISA (scalar |
// avx2 | avx512 | avx512_bf16), read once at the first query, so tests and users can force a lower
// path. set_isa_cap changes the cap later (tests).
#pragma once

#include <string>

namespace ifast::cpu {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3 };

// The level the dispatching kernels run now: min(detected, cap). A relaxed atomic load.
Isa cpu_isa();
// The best level this CPU runs (avx512_bf16 = avx512 + avx512bf16 + avx512vnni; avx512 = avx512f + bw + vl + dq;
// avx2 = avx2 + fma + f16c).
Isa detected_isa();
const char* isa_name(Isa isa);

// _C.cpu.isa(): the name of cpu_isa().
std::string isa();
// _C.cpu.set_isa_cap(level): caps the level at "scalar", "avx2", "avx512" or "avx512_bf16" (never above what the
// CPU runs) and returns the level now chosen. ValueError for another name.
std::string set_isa_cap(const std::string& level);

}  // namespace ifast::cpu

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define IFAST_X86_DISPATCH 1
// The features of each level, as detected_isa() requires them: the one spelling for the bodies
// isa_compile.h compiles (and the bf16 tiles' own push of avx512bf16).
#define IFAST_AVX512_FEATURES "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"
#define IFAST_AVX2_FEATURES "avx2,fma,f16c"
#define IFAST_AVX512_BF16_FEATURES IFAST_AVX512_FEATURES ",avx512bf16,avx512vnni"
#endif

// return <level>::fn(args...) for the level cpu_isa() picks: the entry point of a kernel compiled
// through isa_compile.h, called from inside namespace ifast::cpu.
#ifdef IFAST_X86_DISPATCH
#define IFAST_ISA_RETURN(fn, ...)                                              \
  switch (::ifast::cpu::cpu_isa()) {                                           \
    case ::ifast::cpu::Isa::avx512_bf16:                                      \
    case ::ifast::cpu::Isa::avx512: return ::ifast::cpu::avx512::fn(__VA_ARGS__); \
    case ::ifast::cpu::Isa::avx2: return ::ifast::cpu::avx2::fn(__VA_ARGS__);     \
    default: return ::ifast::cpu::scalar::fn(__VA_ARGS__);                        \
  }
#else
#define IFAST_ISA_RETURN(fn, ...) return ::ifast::cpu::scalar::fn(__VA_ARGS__);
#endif
