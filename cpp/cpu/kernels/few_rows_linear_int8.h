// out (M, N) = x (M, K) @ W [+ bias] for the few rows of a decode step (M <= ~16) with int8
// weight-only quantized weights: W[n, k] = q[n, k] * scale[n, k / G], q symmetric int8 in
// [-127, 127], one fp32 scale per group of G = 64 consecutive input values of one output column.
// The weights cross the memory bus as 1 byte each, half the bf16 kernel's traffic.
//
// G = 64: the scales cost 4 / 64 = 6.25% of the int8 bytes (G = 128: 3.1%, G = 32: 12.5%), and a
// group's step is absmax(group) / 127: the expected maximum of 64 Gaussian weights is ~2.4 sigma
// against ~2.6 at 128, and an outlier (LLM weights have them) spoils 64 weights instead of 128.
// fp32 scales rather than bf16: a bf16 scale is off by up to 2^-9 relative, a systematic error on
// the whole group as large as half the int8 rounding step itself, to save 3% of the bytes.
//
// Integer products. Each group of 64 values of a row of x is held as 16-bit integers on a scale of
// its own (absmax / 32767: block floating point with a 16-bit mantissa, finer than the 8 bits of the
// bf16 activations a bf16 model computes with), so a group's sum is exact in int32: one sign
// extension (int8 -> int16) and one vpmaddwd (16-bit pairs multiplied and added into int32) per 2
// inputs x 8 or 16 columns, then one vpaddd. Widening every weight to fp32 instead costs a
// sign extension, a conversion and an FMA per 8 or 16 weights: 4.4 cycles per 32 weights on a Zen 3
// core (17 GB/s from L2, half its DRAM share) against 1.3-1.7 here. The group's int32 sum is
// scaled once into out: out += float(sum) * (scale_w * scale_x). |sum| <= 64 * 127 * 32767 < 2^31.
// A group of x holding inf or NaN gets a NaN scale, so the outputs it touches are NaN.
//
// Layout (int8_panels in python/internlm_fast/ops/inference.py): N / 16 panels of ceil(K / 2) pairs,
// in groups of 4 panels that take turns pair by pair (few_rows_panels.h says why), as the bf16
// kernel's; pair j of panel p = q[16p + c, 2j + t] at 2c + t (zero past an odd K): 32 bytes, 2 inputs
// x 16 columns, the 16-bit pairs vpmaddwd multiplies once sign-extended; scales (N / 16,
// ceil(K / 64), 16) fp32, the last group shorter when 64 does not divide K. x fp32 or bf16, out in
// x's dtype.
// Reference: few_rows_linear_int8_ref (x rounded by int8_activations, as here).
// Compiled once per instruction set (isa_compile.h): no include guard; IFAST_ISA_LEVEL selects the
// tiles of each path.

namespace ifast::cpu::IFAST_ISA {
namespace {

using panels::kCols;
constexpr int kGroup = 64;                // input values per scale
constexpr int kGroupPairs = kGroup / 2;   // panel rows per scale
constexpr float kXLevels = 32767.f;       // |x| / scale_x of a group's largest value
constexpr int kPrefetchPairs = 64;        // how far ahead (into L2) an AVX2 pass over part of a group fetches

inline int64_t groups_of(int64_t K) { return (K + kGroup - 1) / kGroup; }
inline int64_t pairs_of(int64_t K) { return (K + 1) / 2; }

struct Args {
  const int32_t* x2;  // x as 16-bit pairs, (rows, pairs_of(K)): low half input 2j, high half 2j + 1
  const float* xs;    // x's scale per group, (rows, groups_of(K))
  int64_t K;
  const int8_t* w;
  const float* scales;
  const float* bias;
  float* out;
  int64_t ldo;

  // Rounds each group of x to 16-bit integers on its own scale; one int32 tensor holds the pairs
  // and, after them, the scales.
  at::Tensor bind(const at::Tensor& x) {
    const int64_t M = x.size(0), pairs = pairs_of(x.size(1)), G = groups_of(x.size(1));
    K = x.size(1);
    at::Tensor held = at::empty({M * (pairs + G)}, x.options().dtype(at::kInt));
    int32_t* pairs_out = held.data_ptr<int32_t>();
    float* scales_out = reinterpret_cast<float*>(pairs_out + M * pairs);
    AT_DISPATCH_SWITCH(x.scalar_type(), "few_rows_linear_int8",
                       AT_DISPATCH_CASE(at::kFloat, [&] { round_x(x.data_ptr<float>(), M, pairs_out, scales_out); })
                           AT_DISPATCH_CASE(at::kBFloat16, [&] {
                             round_x(x.data_ptr<c10::BFloat16>(), M, pairs_out, scales_out);
                           }));
    x2 = pairs_out;
    xs = scales_out;
    return held;
  }

  template <typename T>
  void round_x(const T* x, int64_t M, int32_t* pairs_out, float* scales_out) const {
    const int64_t pairs = pairs_of(K), G = groups_of(K);
    for (int64_t r = 0; r < M; ++r) {
      const T* xr = x + r * K;
      uint16_t* q = reinterpret_cast<uint16_t*>(pairs_out + r * pairs);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k0 = g * kGroup, k1 = std::min<int64_t>(K, k0 + kGroup);
        float absmax = 0.f;
        bool finite = true;
        for (int64_t k = k0; k < k1; ++k) {
          const float v = load(xr, k);
          absmax = std::max(absmax, std::fabs(v));
          finite &= std::isfinite(v);
        }
        // the same fp32 operations as int8_activations: scale = absmax / 32767, q = round(x / scale)
        const float scale = finite ? absmax / kXLevels : std::numeric_limits<float>::quiet_NaN();
        for (int64_t k = k0; k < k1; ++k) {
          const float v = absmax > 0.f && finite ? std::nearbyint(load(xr, k) / scale) : 0.f;
          q[k] = static_cast<uint16_t>(static_cast<int16_t>(std::clamp(v, -kXLevels, kXLevels)));
        }
        scales_out[r * G + g] = scale;
      }
      if (K & 1) q[K] = 0;
    }
  }

  Args from_row(int64_t r0) const {
    Args a = *this;
    a.x2 += r0 * pairs_of(K);
    a.xs += r0 * groups_of(K);
    a.out += r0 * ldo;
    return a;
  }
};

#if IFAST_ISA_LEVEL == 0
void tile(const Args& a, int R, int64_t p0, int gs) {
  const int64_t pairs = pairs_of(a.K), G = groups_of(a.K);
  const int8_t* w = a.w + p0 * pairs * 2 * kCols;
  for (int q = 0; q < gs; ++q) {
    const float* s = a.scales + (p0 + q) * G * kCols;
    for (int r = 0; r < R; ++r) {
      float* o = a.out + r * a.ldo + (p0 + q) * kCols;
      const int32_t* xr = a.x2 + r * pairs;
      for (int64_t g = 0; g < G; ++g) {
        int32_t part[kCols] = {};
        for (int64_t j = g * kGroupPairs; j < std::min<int64_t>(pairs, (g + 1) * kGroupPairs); ++j) {
          const int32_t x0 = static_cast<int16_t>(xr[j] & 0xffff), x1 = static_cast<int16_t>(xr[j] >> 16);
          const int8_t* line = w + (j * gs + q) * 2 * kCols;
          for (int c = 0; c < kCols; ++c) part[c] += line[2 * c] * x0 + line[2 * c + 1] * x1;
        }
        const float sx = a.xs[r * G + g];
        for (int c = 0; c < kCols; ++c) o[c] += static_cast<float>(part[c]) * (s[g * kCols + c] * sx);
      }
    }
  }
}
#endif

#if IFAST_ISA_LEVEL >= 2

// R rows x P panels q0..q0+P-1 of the group of gs panels at w (scales from sp, out from the group's
// first column), one group g of 64 inputs: per pair of a panel, one 32-byte load sign-extended to
// 32 int16 (2 inputs x 16 columns), one vpmaddwd and one vpaddd per row of x, or with kVnni (the
// avx512_bf16 level, whose CPUs all have AVX512-VNNI) one vpdpwssd doing both: the same int32 sums, a
// third fewer instructions (1.5x the weights per cycle from L2 on a Sapphire Rapids core, so more of
// the time DRAM is busy). t[r][q] sums the group in int32 (one zmm per (row, panel): R * P + R + 2 <=
// 32), then goes into out: out += float(t) * (scale_w * scale_x). Compiled with VNNI enabled for both
// instantiations; only kVnni's holds a VNNI instruction (intrinsics map one to one;
// test_portable_binary checks).
#pragma GCC push_options
IFAST_PRAGMA(GCC target(IFAST_AVX512_BF16_FEATURES))
template <int R, int P, bool kVnni>
void block512(const Args& a, const int8_t* w, const float* sp, int gs, int q0, int64_t g, float* out) {
  const int64_t pairs = pairs_of(a.K), G = groups_of(a.K), lds = G * kCols;
  __m512i t[R][P];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int q = 0; q < P; ++q) t[r][q] = _mm512_setzero_si512();
  const int64_t j1 = std::min<int64_t>(pairs, (g + 1) * kGroupPairs);
  for (int64_t j = g * kGroupPairs; j < j1; ++j) {
    __m512i xj[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) xj[r] = _mm512_set1_epi32(a.x2[r * pairs + j]);
    const int8_t* line = w + (j * gs + q0) * 2 * kCols;
#pragma GCC unroll 16
    for (int q = 0; q < P; ++q) {
      const __m512i v =
          _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + q * 2 * kCols)));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        if constexpr (kVnni)
          t[r][q] = _mm512_dpwssd_epi32(t[r][q], v, xj[r]);
        else
          t[r][q] = _mm512_add_epi32(t[r][q], _mm512_madd_epi16(v, xj[r]));
      }
    }
  }
#pragma GCC unroll 16
  for (int q = 0; q < P; ++q) {
    const __m512 s = _mm512_loadu_ps(sp + (q0 + q) * lds + g * kCols);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      float* o = out + r * a.ldo + (q0 + q) * kCols;
      const __m512 sc = _mm512_mul_ps(s, _mm512_set1_ps(a.xs[r * G + g]));
      _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_cvtepi32_ps(t[r][q]), sc, _mm512_loadu_ps(o)));
    }
  }
}
#pragma GCC pop_options

// a whole group at every R
constexpr int panels_per_block(int) { return 4; }

#endif

#if IFAST_ISA_LEVEL == 1

// AVX2: a pair of a panel is two halves of 16 bytes (columns 0..7 and 8..15), each sign-extended to
// 16 int16; two ymm int32 sums per (row, panel), as block512. With fewer panels in registers than
// the group holds, each pass prefetches its panels two groups of inputs ahead into L2 (the bf16
// kernel's block256 says why).
template <int R, int P>
inline void block256(const Args& a, const int8_t* w, const float* sp, int gs, int q0, int64_t g, float* out) {
  const bool fetch = P < gs;
  const int64_t pairs = pairs_of(a.K), G = groups_of(a.K), lds = G * kCols;
  __m256i t[R][2 * P];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int h = 0; h < 2 * P; ++h) t[r][h] = _mm256_setzero_si256();
  const int64_t j1 = std::min<int64_t>(pairs, (g + 1) * kGroupPairs);
  for (int64_t j = g * kGroupPairs; j < j1; ++j) {
    __m256i xj[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) xj[r] = _mm256_set1_epi32(a.x2[r * pairs + j]);
    const int8_t* line = w + (j * gs + q0) * 2 * kCols;
    if (fetch)
#pragma GCC unroll 16
      for (int q = 0; q < P; ++q)
        _mm_prefetch(reinterpret_cast<const char*>(line + (kPrefetchPairs * gs + q) * 2 * kCols), _MM_HINT_T1);
#pragma GCC unroll 16
    for (int h = 0; h < 2 * P; ++h) {
      const __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(line + h * kCols)));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) t[r][h] = _mm256_add_epi32(t[r][h], _mm256_madd_epi16(v, xj[r]));
    }
  }
#pragma GCC unroll 16
  for (int h = 0; h < 2 * P; ++h) {
    const __m256 s = _mm256_loadu_ps(sp + (q0 + h / 2) * lds + g * kCols + (h % 2) * 8);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      float* o = out + r * a.ldo + q0 * kCols + h * 8;
      const __m256 sc = _mm256_mul_ps(s, _mm256_set1_ps(a.xs[r * G + g]));
      _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(t[r][h]), sc, _mm256_loadu_ps(o)));
    }
  }
}

// panels at once on AVX2: R * 2P int32 sums + R broadcasts + 2 <= 16 ymm registers
constexpr int panels_per_block(int R) { return R == 1 ? 4 : R == 2 ? 2 : 1; }

#endif

#if IFAST_ISA_LEVEL >= 1
void tile(const Args& a, int R, int64_t p0, int gs) {
#if IFAST_ISA_LEVEL >= 2
  const bool vnni = cpu_isa() >= Isa::avx512_bf16;
#endif
  const int64_t G = groups_of(a.K);
  const int8_t* w = a.w + p0 * pairs_of(a.K) * 2 * kCols;
  const float* sp = a.scales + p0 * G * kCols;
  float* out = a.out + p0 * kCols;
  for (int64_t g = 0; g < G; ++g)
    panels::over_group<panels_per_block>(R, gs, [&](auto r, auto np, int q0) {
      constexpr int kR = decltype(r)::value, kP = decltype(np)::value;
#if IFAST_ISA_LEVEL >= 2
      if (vnni)
        block512<kR, kP, true>(a, w, sp, gs, q0, g, out);
      else
        block512<kR, kP, false>(a, w, sp, gs, q0, g, out);
#else
      block256<kR, kP>(a, w, sp, gs, q0, g, out);
#endif
    });
}
#endif

}  // namespace

at::Tensor few_rows_linear_int8(const at::Tensor& x, const at::Tensor& panels_w, const at::Tensor& scales,
                                const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && panels_w.dim() == 3 && panels_w.size(2) == 2 * kCols &&
                  panels_w.size(1) == pairs_of(x.size(1)),
              "few_rows_linear_int8: x (M, K) and the weight panels (N / 16, ceil(K / 2), 32) must agree on K");
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == panels_w.size(0) && scales.size(1) == groups_of(x.size(1)) &&
                  scales.size(2) == kCols,
              "few_rows_linear_int8: scales must be (N / 16, ceil(K / 64), 16)");
  TORCH_CHECK(x.is_contiguous() && panels_w.is_contiguous() && scales.is_contiguous(),
              "few_rows_linear_int8: x, the panels and the scales must be contiguous");
  TORCH_CHECK(x.device().is_cpu() && panels_w.device().is_cpu() && scales.device().is_cpu(),
              "few_rows_linear_int8: CPU tensors only");
  TORCH_CHECK(panels_w.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat,
              "few_rows_linear_int8: the panels must be int8 and the scales fp32");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "few_rows_linear_int8: x must be fp32 or bf16");
  panels::check_bias("few_rows_linear_int8", bias, panels_w.size(0) * kCols, x);
  const Args weights{nullptr, nullptr, 0, panels_w.data_ptr<int8_t>(), scales.data_ptr<float>(), nullptr, nullptr, 0};
  return panels::run(x, bias, panels_w.size(0), weights, tile);
}

}  // namespace ifast::cpu::IFAST_ISA
