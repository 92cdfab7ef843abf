// out (M, N) = x (M, K) @ W [+ bias] for the few rows of a decode step (M <= ~16) with bf16 weights:
// a bf16 model's decode step reads every weight once per token, so the step costs what streaming the
// weights from DRAM costs, and the weights must stay bf16 (2 bytes) all the way into the registers.
//
// Layout (made once per model by few_rows_linear_bf16_panels in Python): panels (N / 16, ceil(K / 2),
// 32) bf16; panel p, pair j holds W^T rows 2j and 2j + 1 of columns 16p..16p+15 interleaved:
// element 2c + t = W[16p + c, 2j + t] (a zero for t = 1 past an odd K). One pair of a panel is 64
// bytes, one cache line, and seen as 16 32-bit lanes, lane c holds (row 2j, row 2j + 1) of column
// c: a bf16 is the top half of an fp32, so `lane << 16` is row 2j and `lane & 0xffff0000` row 2j + 1
// as fp32, exactly: two integer ops turn a 64-byte load into 32 fp32 weights, where a plain
// (K, 16) layout needs a widening move (one shuffle port) per 16. It is also avx512_bf16's
// vdpbf16ps layout, unused here: that instruction would round x to bf16 as well.
// Accumulation in fp32, x fp32 or bf16 (converted once per call), out in x's dtype (rounded once).
// Threads own whole panels, as in few_rows_linear (fp32).
// Reference: few_rows_linear_bf16_ref (python/internlm_fast/ops/inference.py).
// Compiled once per instruction set (isa_compile.h): no include guard; IFAST_ISA_LEVEL selects the
// tiles of each path.

namespace ifast::cpu::IFAST_ISA {
namespace {

using panels::kCols;
constexpr int kPrefetchPairs = 16;  // panel lines (pairs) prefetched ahead: 1 KiB per stream
// Pairs summed in registers before the sum is added into out: one fp32 chain over all of K (11008
// for InternLM-7B's down projection) errs ~K ulps, several times a blocked GEMM's; two levels of
// 128 + K / 128 terms do not, for one load and store of out per 128 inputs.
constexpr int kBlockPairs = 64;

// The arguments of one microkernel call: rows [0, R) of x (fp32, row stride K) against panels
// [p0, p1) of w, into out (fp32, row stride ldo) from column 16 * p0 on.
struct Args {
  const float* x;
  int64_t K;
  const uint16_t* w;
  const float* bias;
  float* out;
  int64_t ldo;

  // x fp32 as it is, bf16 converted once
  at::Tensor bind(const at::Tensor& x_in) {
    at::Tensor xf = x_in.scalar_type() == at::kBFloat16 ? x_in.to(at::kFloat) : x_in;
    x = xf.data_ptr<float>();
    K = x_in.size(1);
    return xf;
  }
  Args from_row(int64_t r0) const {
    Args a = *this;
    a.x += r0 * K;
    a.out += r0 * ldo;
    return a;
  }
};

inline int64_t pairs_of(int64_t K) { return (K + 1) / 2; }

#if IFAST_ISA_LEVEL == 0
void tile(const Args& a, int R, int64_t p0, int64_t p1) {
  const int64_t K = a.K, pairs = pairs_of(K);
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* w = a.w + p * pairs * 2 * kCols;
    for (int r = 0; r < R; ++r) {
      float acc[kCols];
      for (int c = 0; c < kCols; ++c) acc[c] = a.bias ? a.bias[p * kCols + c] : 0.f;
      const float* xr = a.x + r * K;
      for (int64_t k0 = 0; k0 < K; k0 += 2 * kBlockPairs) {
        float part[kCols] = {};
        for (int64_t k = k0; k < std::min<int64_t>(K, k0 + 2 * kBlockPairs); ++k) {
          const uint16_t* row = w + (k / 2) * 2 * kCols + (k % 2);
          for (int c = 0; c < kCols; ++c) part[c] += xr[k] * bits_to_float(static_cast<uint32_t>(row[2 * c]) << 16);
        }
        for (int c = 0; c < kCols; ++c) acc[c] += part[c];
      }
      for (int c = 0; c < kCols; ++c) a.out[r * a.ldo + p * kCols + c] = acc[c];
    }
  }
}
#endif

#if IFAST_ISA_LEVEL >= 2

// out[r][16q..16q+15] += c[r][q], and c = 0.
template <int R, int P>
inline void flush(__m512 (&c)[R][P], float* out, int64_t ldo) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int q = 0; q < P; ++q) {
      float* o = out + r * ldo + q * kCols;
      _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), c[r][q]));
      c[r][q] = _mm512_setzero_ps();
    }
}

// R rows x P adjacent panels; one zmm accumulator per (row, panel): R * P + 2P + 2 <= 32 registers.
template <int R, int P>
inline void tile512(const Args& a, int64_t p) {
  const int64_t K = a.K, full = K / 2, ldp = pairs_of(K) * 2 * kCols;
  const uint16_t* w = a.w + p * ldp;
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  float* out = a.out + p * kCols;
#pragma GCC unroll 16
  for (int q = 0; q < P; ++q) {
    const __m512 z = a.bias ? _mm512_loadu_ps(a.bias + (p + q) * kCols) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * a.ldo + q * kCols, z);
  }
  __m512 c[R][P];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int q = 0; q < P; ++q) c[r][q] = _mm512_setzero_ps();
  for (int64_t j = 0; j < full; ++j) {
    if (j % kBlockPairs == 0 && j > 0) flush(c, out, a.ldo);
    __m512 lo[P], hi[P];
#pragma GCC unroll 16
    for (int q = 0; q < P; ++q) {
      const uint16_t* src = w + q * ldp + j * 2 * kCols;
      const __m512i v = _mm512_loadu_si512(src);
      _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchPairs * 2 * kCols), _MM_HINT_T0);
      lo[q] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      hi[q] = _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask));
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 x0 = _mm512_set1_ps(a.x[r * K + 2 * j]);
      const __m512 x1 = _mm512_set1_ps(a.x[r * K + 2 * j + 1]);
#pragma GCC unroll 16
      for (int q = 0; q < P; ++q) c[r][q] = _mm512_fmadd_ps(x1, hi[q], _mm512_fmadd_ps(x0, lo[q], c[r][q]));
    }
  }
  if (K & 1) {
#pragma GCC unroll 16
    for (int q = 0; q < P; ++q) {
      const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(w + q * ldp + full * 2 * kCols), 16));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) c[r][q] = _mm512_fmadd_ps(_mm512_set1_ps(a.x[r * K + K - 1]), lo, c[r][q]);
    }
  }
  flush(c, out, a.ldo);
}

// 4 panels at every R: at one row, 8 panels (8 weight streams per thread) read 12-15% slower (43.8
// against 50.5 GB/s at InternLM-7B's shapes, 2 threads); 2 panels no faster than 4
constexpr int panels512(int) { return 4; }

void tile(const Args& a, int R, int64_t p0, int64_t p1) {
  panels::over_panels<panels512>(R, p0, p1, [&](auto r, auto np, int64_t p) {
    tile512<decltype(r)::value, decltype(np)::value>(a, p);
  });
}

#endif

#if IFAST_ISA_LEVEL == 1

// out[r][8h..8h+7] += c[r][h], and c = 0.
template <int R, int H>
inline void flush(__m256 (&c)[R][H], float* out, int64_t ldo) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int h = 0; h < H; ++h) {
      float* o = out + r * ldo + h * 8;
      _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), c[r][h]));
      c[r][h] = _mm256_setzero_ps();
    }
}

// AVX2: a pair of a panel is two 32-byte halves (columns 0..7 and 8..15), each giving 2 x 8 fp32;
// two ymm accumulators per (row, panel).
template <int R, int P>
inline void tile256(const Args& a, int64_t p) {
  const int64_t K = a.K, full = K / 2, ldp = pairs_of(K) * 2 * kCols;
  const uint16_t* w = a.w + p * ldp;
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  float* out = a.out + p * kCols;
#pragma GCC unroll 16
  for (int h = 0; h < 2 * P; ++h) {
    const __m256 z = a.bias ? _mm256_loadu_ps(a.bias + p * kCols + h * 8) : _mm256_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * a.ldo + h * 8, z);
  }
  __m256 c[R][2 * P];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int h = 0; h < 2 * P; ++h) c[r][h] = _mm256_setzero_ps();
  for (int64_t j = 0; j < full; ++j) {
    if (j % kBlockPairs == 0 && j > 0) flush(c, out, a.ldo);
#pragma GCC unroll 16
    for (int h = 0; h < 2 * P; ++h) {
      const uint16_t* src = w + (h / 2) * ldp + j * 2 * kCols + (h % 2) * kCols;
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
      if (h % 2 == 0)
        _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchPairs * 2 * kCols), _MM_HINT_T0);
      const __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 hi = _mm256_castsi256_ps(_mm256_and_si256(v, hi_mask));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        c[r][h] = _mm256_fmadd_ps(_mm256_broadcast_ss(a.x + r * K + 2 * j + 1), hi,
                                  _mm256_fmadd_ps(_mm256_broadcast_ss(a.x + r * K + 2 * j), lo, c[r][h]));
    }
  }
  if (K & 1) {
#pragma GCC unroll 16
    for (int h = 0; h < 2 * P; ++h) {
      const uint16_t* src = w + (h / 2) * ldp + full * 2 * kCols + (h % 2) * kCols;
      const __m256 lo =
          _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)), 16));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) c[r][h] = _mm256_fmadd_ps(_mm256_broadcast_ss(a.x + r * K + K - 1), lo, c[r][h]);
    }
  }
  flush(c, out, a.ldo);
}

// R * 2P accumulators + 3 + broadcasts <= 16
constexpr int panels256(int R) { return R == 1 ? 4 : R == 2 ? 2 : 1; }

void tile(const Args& a, int R, int64_t p0, int64_t p1) {
  panels::over_panels<panels256>(R, p0, p1, [&](auto r, auto np, int64_t p) {
    tile256<decltype(r)::value, decltype(np)::value>(a, p);
  });
}

#endif

}  // namespace

at::Tensor few_rows_linear_bf16(const at::Tensor& x, const at::Tensor& panels_w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && panels_w.dim() == 3 && panels_w.size(2) == 2 * kCols &&
                  panels_w.size(1) == pairs_of(x.size(1)),
              "few_rows_linear_bf16: x (M, K) and the weight panels (N / 16, ceil(K / 2), 32) must agree on K");
  TORCH_CHECK(x.is_contiguous() && panels_w.is_contiguous(), "few_rows_linear_bf16: x and the panels must be contiguous");
  TORCH_CHECK(x.device().is_cpu() && panels_w.device().is_cpu(), "few_rows_linear_bf16: CPU tensors only");
  TORCH_CHECK(panels_w.scalar_type() == at::kBFloat16, "few_rows_linear_bf16: the panels must be bf16");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "few_rows_linear_bf16: x must be fp32 or bf16");
  panels::check_bias("few_rows_linear_bf16", bias, panels_w.size(0) * kCols, x);
  const Args weights{nullptr, 0, reinterpret_cast<const uint16_t*>(panels_w.data_ptr()), nullptr, nullptr, 0};
  return panels::run(x, bias, panels_w.size(0), weights, tile);
}

}  // namespace ifast::cpu::IFAST_ISA
