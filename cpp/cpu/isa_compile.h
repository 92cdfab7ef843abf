// Compiles a kernel body once per instruction set, as ATen's DispatchStub does with its per-capability
// kernel files, so one build carries every path and the CPU it runs on picks one (cpu_isa.h).
//
// Usage, in the kernel's .cpp after every header the body needs:
//   #define IFAST_ISA_BODY "kernels/rms_norm.h"
//   #include "isa_compile.h"
// The body is included up to three times, each time inside `#pragma GCC target(...)` with IFAST_ISA
// set to the namespace it must open (ifast::cpu::IFAST_ISA) and IFAST_ISA_LEVEL to 0 (scalar: the
// build's own -march, x86-64-v2 by default), 1 (avx2: AVX2 + FMA + F16C) or 2 (avx512: F, BW, VL,
// DQ on top). Bodies test IFAST_ISA_LEVEL, never __AVX2__: in C++ the pragma does not change the
// predefined macros. Every system, ATen and c10 header is included before the first pragma, so the
// inline functions and templates they define keep the build's baseline target: a template
// instantiated inside a body still takes the target of its definition (checked with objdump), which
// keeps wider instructions out of any symbol the linker could share between paths.
// No include guard: one inclusion per kernel translation unit.

#ifndef IFAST_ISA_BODY
#error "define IFAST_ISA_BODY (the kernel body header) before including isa_compile.h"
#endif

#include "cpu_isa.h"

#ifdef IFAST_X86_DISPATCH
#include <immintrin.h>

// #pragma does not expand macros; _Pragma of a stringised argument does
#define IFAST_PRAGMA_(x) _Pragma(#x)
#define IFAST_PRAGMA(x) IFAST_PRAGMA_(x)

#pragma GCC push_options
IFAST_PRAGMA(GCC target(IFAST_AVX512_FEATURES))
#define IFAST_ISA avx512
#define IFAST_ISA_LEVEL 2
#include IFAST_ISA_BODY
#undef IFAST_ISA
#undef IFAST_ISA_LEVEL
#pragma GCC pop_options

#pragma GCC push_options
IFAST_PRAGMA(GCC target(IFAST_AVX2_FEATURES))
#define IFAST_ISA avx2
#define IFAST_ISA_LEVEL 1
#include IFAST_ISA_BODY
#undef IFAST_ISA
#undef IFAST_ISA_LEVEL
#pragma GCC pop_options
#endif

#define IFAST_ISA scalar
#define IFAST_ISA_LEVEL 0
#include IFAST_ISA_BODY
#undef IFAST_ISA
#undef IFAST_ISA_LEVEL
#undef IFAST_ISA_BODY
