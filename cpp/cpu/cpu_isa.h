// Run-time choice of the vector instruction set for kernels that carry several paths.
//
// The module is compiled with -march=$INTERNLM_FAST_CPU_ARCH (native by default), but a kernel that
// dispatches compiles each path in functions marked IFAST_TARGET_AVX512 / IFAST_TARGET_AVX2 (GCC
// target attributes), so every path exists in the binary whatever -march was, and the one that runs
// is picked here: the best level the CPU supports (__builtin_cpu_supports), capped by the
// environment variable IFAST_CPU_ISA (scalar | avx2 | avx512), read once at the first query, so
// tests and users can force a lower path. set_isa_cap changes the cap later (tests).
#pragma once

#include <string>

namespace ifast::cpu {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

// The level the dispatching kernels run now: min(detected, cap). A relaxed atomic load.
Isa cpu_isa();
// The best level this CPU runs (avx512 = avx512f + avx512bw + avx512vl; avx2 = avx2 + fma + f16c).
Isa detected_isa();
const char* isa_name(Isa isa);

// _C.cpu.isa(): the name of cpu_isa().
std::string isa();
// _C.cpu.set_isa_cap(level): caps the level at "scalar", "avx2" or "avx512" (never above what the
// CPU runs) and returns the level now chosen. ValueError for another name.
std::string set_isa_cap(const std::string& level);

}  // namespace ifast::cpu

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define IFAST_X86_DISPATCH 1
#define IFAST_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define IFAST_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif
