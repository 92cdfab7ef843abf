// Shared helpers for the CPU kernels: dtype conversion that the compiler can vectorise,
// a vectorisable exp, and the accumulation type. Kept header-only and free of
// torch/extension.h so each kernel file compiles quickly.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace ifast {

// fp32 accumulation for every storage type except fp64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

// Bit-level conversions, written with plain integer ops so `#pragma omp simd` loops
// vectorise them (c10's converters go through memcpy and do not always vectorise).
inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float load(const float* p, int64_t i) { return p[i]; }
inline double load(const double* p, int64_t i) { return p[i]; }
inline float load(const c10::BFloat16* p, int64_t i) {
  return bits_to_float(static_cast<uint32_t>(p[i].x) << 16);
}
// fp16 by bit manipulation, branch-free so loops vectorise (c10::Half's converters branch).
// Exact: a half's exponent and mantissa shifted into a float's place, rescaled by 2^112 (exact for
// normals and subnormals); all-ones exponents (inf, NaN) mapped explicitly.
inline float load(const c10::Half* p, int64_t i) {
  const uint32_t h = p[i].x;
  const uint32_t em = h & 0x7fffu;
  const uint32_t finite = float_to_bits(bits_to_float(em << 13) * 0x1p112f);
  const uint32_t special = 0x7f800000u | ((em & 0x3ffu) << 13);
  return bits_to_float(((h & 0x8000u) << 16) | (em >= 0x7c00u ? special : finite));
}

inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(double* p, int64_t i, double v) { p[i] = v; }
inline void store(c10::BFloat16* p, int64_t i, float v) {
  // round to nearest even; NaN stays NaN (quiet) instead of rounding into inf
  uint32_t u = float_to_bits(v);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  p[i].x = static_cast<uint16_t>(std::isnan(v) ? 0x7FC0u : rounded);
}
// Round to nearest even (F. Giesen's float_to_half_fast3_rtne, made branch-free): subnormal
// results by adding 0.5f, which lets the FPU round; normal ones by rebiasing the exponent and
// adding half an ulp (plus the odd bit, for ties to even); overflow to inf, NaN stays NaN.
inline void store(c10::Half* p, int64_t i, float v) {
  uint32_t f = float_to_bits(v);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  const uint32_t sub = float_to_bits(bits_to_float(f) + 0.5f) - 0x3f000000u;
  const uint32_t norm = (f + 0xc8000fffu + ((f >> 13) & 1u)) >> 13;
  const uint32_t big = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
  uint32_t o = f < 0x38800000u ? sub : norm;
  o = f >= 0x47800000u ? big : o;
  p[i].x = static_cast<uint16_t>(o | (sign >> 16));
}

// c ? a : b as bit masks. GCC 12 jump-threads two clamping ternaries into a 3-way branch (one
// arm per constant) and then refuses to vectorise the loop ("control flow in loop"); masks keep
// the select branch-free, so loops calling fast_exp vectorise.
inline float select_bits(bool c, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return bits_to_float((float_to_bits(a) & m) | (float_to_bits(b) & ~m));
}

// exp(x) for float to ~1 ulp over the normal range, branch-free so it vectorises:
// x = n*ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial, 2^n by exponent bits.
inline float fast_exp(float x) {
  // compares, not fmin/fmax: a NaN input must stay NaN (the trainer detects NaN losses)
  x = select_bits(x < -87.3f, -87.3f, x);
  x = select_bits(x > 88.7f, 88.7f, x);
  float n = std::nearbyint(x * 1.44269504088896341f);
  float r = std::fma(n, -0.693145751953125f, x);
  r = std::fma(n, -1.428606765330187045e-06f, r);
  float p = 1.3981999507e-3f;
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r + 1.0f);
  int32_t e = static_cast<int32_t>(n) + 127;
  return p * bits_to_float(static_cast<uint32_t>(e) << 23);
}
inline double fast_exp(double x) { return std::exp(x); }

// rows handled per task: enough work per task to amortise scheduling
inline int64_t row_grain(int64_t row_elems, int64_t min_elems = 32768) {
  int64_t g = min_elems / (row_elems > 0 ? row_elems : 1);
  return g < 1 ? 1 : g;
}

}  // namespace ifast

// fp32, fp64, bf16 and fp16: every storage type the CPU kernels accept
#define IFAST_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
