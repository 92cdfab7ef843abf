// out (M, N) = x (M, K) @ W [+ bias] for the few rows of a decode step (M <= ~16) with int8
// weight-only quantized weights: W[n, k] = q[n, k] * scale[n, k / G], q symmetric int8 in
// [-127, 127], one fp32 scale per group of G = 64 consecutive input values of one output column.
// Dequantized in registers (int8 -> int32 -> fp32; the group's scale applied to the group's partial
// sum): the weights cross the memory bus as 1 byte each, half the bf16 kernel's traffic.
//
// G = 64: the scales cost 4 / 64 = 6.25% of the int8 bytes (G = 128: 3.1%, G = 32: 12.5%), and a
// group's step is absmax(group) / 127: the expected maximum of 64 Gaussian weights is ~2.4 sigma
// against ~2.6 at 128, and an outlier (LLM weights have them) spoils 64 weights instead of 128.
// fp32 scales rather than bf16: a bf16 scale is off by up to 2^-9 relative, a systematic error on
// the whole group as large as half the int8 rounding step itself, to save 3% of the bytes.
//
// Layout (quantize_int8 in python/internlm_fast/ops/inference.py): panels (N / 16, K, 16) int8, panel
// p row k = q[16p..16p+15, k] (16 bytes; 4 rows a cache line); scales (N / 16, ceil(K / 64), 16)
// fp32, the last group shorter when 64 does not divide K. Accumulation in fp32; x fp32 or bf16,
// out in x's dtype. Threads own whole panels, as in few_rows_linear.
// Reference: few_rows_linear_int8_ref.
// Compiled once per instruction set (isa_compile.h): no include guard; IFAST_ISA_LEVEL selects the
// tiles of each path.

namespace ifast::cpu::IFAST_ISA {
namespace {

using panels::kCols;
constexpr int kGroup = 64;          // input values per scale
constexpr int kPrefetchRows = 64;  // panel rows prefetched ahead: 1 KiB per stream

struct Args {
  const float* x;
  int64_t K;
  const int8_t* w;
  const float* scales;
  const float* bias;
  float* out;
  int64_t ldo;
};

inline int64_t groups_of(int64_t K) { return (K + kGroup - 1) / kGroup; }

#if IFAST_ISA_LEVEL == 0
void tile(const Args& a, int R, int64_t p0, int64_t p1) {
  const int64_t K = a.K, G = groups_of(K);
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* w = a.w + p * K * kCols;
    const float* s = a.scales + p * G * kCols;
    for (int r = 0; r < R; ++r) {
      float acc[kCols];
      for (int c = 0; c < kCols; ++c) acc[c] = a.bias ? a.bias[p * kCols + c] : 0.f;
      const float* xr = a.x + r * K;
      for (int64_t g = 0; g < G; ++g) {
        float part[kCols] = {};
        for (int64_t k = g * kGroup; k < std::min<int64_t>(K, (g + 1) * kGroup); ++k)
          for (int c = 0; c < kCols; ++c) part[c] += xr[k] * static_cast<float>(w[k * kCols + c]);
        for (int c = 0; c < kCols; ++c) acc[c] += part[c] * s[g * kCols + c];
      }
      for (int c = 0; c < kCols; ++c) a.out[r * a.ldo + p * kCols + c] = acc[c];
    }
  }
}
#endif

#if IFAST_ISA_LEVEL >= 2

// R rows x P adjacent panels. A group's products sum in registers, t[r][q] = sum_k x[r][k] q[k][..]
// (one zmm per (row, panel): R * P + P + 1 <= 32), and go into out scaled once: out += t * scale.
// The scale multiplies once per group instead of once per weight, and the sum has two levels (64
// terms, then K / 64), as accurate as a blocked GEMM's where one chain over K would not be.
template <int R, int P>
inline void tile512(const Args& a, int64_t p) {
  const int64_t K = a.K, G = groups_of(K), ldp = K * kCols, lds = G * kCols;
  const int8_t* w = a.w + p * ldp;
  const float* sp = a.scales + p * lds;
  float* out = a.out + p * kCols;
#pragma GCC unroll 16
  for (int q = 0; q < P; ++q) {
    const __m512 z = a.bias ? _mm512_loadu_ps(a.bias + (p + q) * kCols) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * a.ldo + q * kCols, z);
  }
  for (int64_t g = 0; g < G; ++g) {
    __m512 t[R][P];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int q = 0; q < P; ++q) t[r][q] = _mm512_setzero_ps();
    const int64_t k1 = std::min<int64_t>(K, (g + 1) * kGroup);
    for (int64_t k = g * kGroup; k < k1; ++k) {
      __m512 v[P];
#pragma GCC unroll 16
      for (int q = 0; q < P; ++q) {
        const int8_t* src = w + q * ldp + k * kCols;
        if ((k & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchRows * kCols), _MM_HINT_T0);
        v[q] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512 xk = _mm512_set1_ps(a.x[r * K + k]);
#pragma GCC unroll 16
        for (int q = 0; q < P; ++q) t[r][q] = _mm512_fmadd_ps(xk, v[q], t[r][q]);
      }
    }
#pragma GCC unroll 16
    for (int q = 0; q < P; ++q) {
      const __m512 s = _mm512_loadu_ps(sp + q * lds + g * kCols);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        float* o = out + r * a.ldo + q * kCols;
        _mm512_storeu_ps(o, _mm512_fmadd_ps(t[r][q], s, _mm512_loadu_ps(o)));
      }
    }
  }
}

// 4 panels at every R: at one row, 8 panels (8 weight streams per thread) read 13% slower (37.6
// against 42.5 GB/s at InternLM-7B's shapes, 2 threads, 47 GB/s DRAM read); 2 panels no faster
constexpr int panels512(int) { return 4; }

void tile(const Args& a, int R, int64_t p0, int64_t p1) {
  panels::over_panels<panels512>(R, p0, p1, [&](auto r, auto np, int64_t p) {
    tile512<decltype(r)::value, decltype(np)::value>(a, p);
  });
}

#endif

#if IFAST_ISA_LEVEL == 1

// AVX2: a panel row is two halves of 8 columns, two ymm partial sums per (row, panel); as tile512.
template <int R, int P>
inline void tile256(const Args& a, int64_t p) {
  const int64_t K = a.K, G = groups_of(K), ldp = K * kCols, lds = G * kCols;
  const int8_t* w = a.w + p * ldp;
  const float* sp = a.scales + p * lds;
  float* out = a.out + p * kCols;
#pragma GCC unroll 16
  for (int h = 0; h < 2 * P; ++h) {
    const __m256 z = a.bias ? _mm256_loadu_ps(a.bias + p * kCols + h * 8) : _mm256_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * a.ldo + h * 8, z);
  }
  for (int64_t g = 0; g < G; ++g) {
    __m256 t[R][2 * P];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int h = 0; h < 2 * P; ++h) t[r][h] = _mm256_setzero_ps();
    const int64_t k1 = std::min<int64_t>(K, (g + 1) * kGroup);
    for (int64_t k = g * kGroup; k < k1; ++k) {
#pragma GCC unroll 16
      for (int h = 0; h < 2 * P; ++h) {
        const int8_t* src = w + (h / 2) * ldp + k * kCols + (h % 2) * 8;
        if (h % 2 == 0 && (k & 3) == 0)
          _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchRows * kCols), _MM_HINT_T0);
        const __m256 v =
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src))));
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) t[r][h] = _mm256_fmadd_ps(_mm256_broadcast_ss(a.x + r * K + k), v, t[r][h]);
      }
    }
#pragma GCC unroll 16
    for (int h = 0; h < 2 * P; ++h) {
      const __m256 s = _mm256_loadu_ps(sp + (h / 2) * lds + g * kCols + (h % 2) * 8);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        float* o = out + r * a.ldo + h * 8;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(t[r][h], s, _mm256_loadu_ps(o)));
      }
    }
  }
}

// panels at once on AVX2: R * 2P partial sums + 2 <= 16 ymm registers
constexpr int panels256(int R) { return R == 1 ? 4 : R == 2 ? 2 : 1; }

void tile(const Args& a, int R, int64_t p0, int64_t p1) {
  panels::over_panels<panels256>(R, p0, p1, [&](auto r, auto np, int64_t p) {
    tile256<decltype(r)::value, decltype(np)::value>(a, p);
  });
}

#endif

}  // namespace

at::Tensor few_rows_linear_int8(const at::Tensor& x, const at::Tensor& panels_w, const at::Tensor& scales,
                                const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && panels_w.dim() == 3 && panels_w.size(2) == kCols && panels_w.size(1) == x.size(1),
              "few_rows_linear_int8: x (M, K) and the weight panels (N / 16, K, 16) must agree on K");
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
  const Args weights{nullptr, 0, panels_w.data_ptr<int8_t>(), scales.data_ptr<float>(), nullptr, nullptr, 0};
  return panels::run(x, bias, panels_w.size(0), weights, tile);
}

}  // namespace ifast::cpu::IFAST_ISA
