// The AVX-512 tiles of the bf16 and int8 decode GEMMs, compiled for a CPU without AVX-512: every
// _mm512 intrinsic they use goes to SIMDe's portable version of it (Debian: libsimde-dev), so CI on
// an AVX2-only machine still runs the code an AVX-512 machine runs. check_decode_gemms.py writes
// simde_names.h (one #define per intrinsic the kernel bodies name), builds this file as a torch
// extension and compares it with the fp64 oracle, as tests/test_decode_gemm_*.py do.
#include <torch/extension.h>

#include "common.h"
#include "few_rows_panels.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

// SIMDe 0.7.4 has no _mm512_cvtepi32_ps
static inline simde__m512 emu_mm512_cvtepi32_ps(simde__m512i a) {
  int32_t v[16];
  float f[16];
  simde_mm512_storeu_si512(v, a);
  for (int i = 0; i < 16; ++i) f[i] = static_cast<float>(v[i]);
  return simde_mm512_loadu_ps(f);
}
#define simde_mm512_cvtepi32_ps emu_mm512_cvtepi32_ps

#undef __m512
#undef __m512i
#define __m512 simde__m512
#define __m512i simde__m512i
#include "simde_names.h"

// The int8 tiles pick vpdpwssd (AVX512-VNNI) at the avx512_bf16 level through cpu_isa(), here the
// harness's own setting so both tiles run; their target pragmas do nothing under SIMDe.
#include "cpu_isa.h"
namespace ifast::cpu {
static Isa g_emu_isa = Isa::avx512;
Isa cpu_isa() { return g_emu_isa; }
}  // namespace ifast::cpu
#define IFAST_PRAGMA(x)

#define IFAST_ISA emu_int8
#define IFAST_ISA_LEVEL 2
#include "kernels/few_rows_linear_int8.h"
#undef IFAST_ISA
#define IFAST_ISA emu_bf16
#include "kernels/few_rows_linear_bf16.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("few_rows_linear_int8", &ifast::cpu::emu_int8::few_rows_linear_int8);
  m.def("set_vnni", [](bool on) { ifast::cpu::g_emu_isa = on ? ifast::cpu::Isa::avx512_bf16 : ifast::cpu::Isa::avx512; });
  m.def("few_rows_linear_bf16", &ifast::cpu::emu_bf16::few_rows_linear_bf16);
}
