// out (M, N) = x (M, K) @ W [+ bias] for the few rows of a decode step (M <= ~16) with bf16 weights:
// a bf16 model's decode step reads every weight once per token, so the step costs what streaming the
// weights from DRAM costs, and the weights must stay bf16 (2 bytes) all the way into the registers.
//
// Layout (made once per model by few_rows_linear_bf16_panels in Python): N / 16 panels of 16 columns,
// ceil(K / 2) pairs each, stored in groups of 4 panels that take turns pair by pair (few_rows_panels.h
// says why). Pair j of panel p holds W^T rows 2j and 2j + 1 of columns 16p..16p+15 interleaved:
// element 2c + t = W[16p + c, 2j + t] (a zero for t = 1 past an odd K). One pair of a panel is 64
// bytes, one cache line, and seen as 16 32-bit lanes, lane c holds (row 2j, row 2j + 1) of column
// c: a bf16 is the top half of an fp32, so `lane << 16` is row 2j and `lane & 0xffff0000` row 2j + 1
// as fp32, exactly: two integer ops turn a 64-byte load into 32 fp32 weights, where a plain
// (K, 16) layout needs a widening move (one shuffle port) per 16. It is also avx512_bf16's
// vdpbf16ps layout, unused here: that instruction would round x to bf16 as well.
// Accumulation in fp32, x fp32 or bf16 (converted once per call), out in x's dtype (rounded once).
// Reference: few_rows_linear_bf16_ref (python/internlm_fast/ops/inference.py).
// Compiled once per instruction set (isa_compile.h): no include guard; IFAST_ISA_LEVEL selects the
// tiles of each path.

namespace ifast::cpu::IFAST_ISA {
namespace {

using panels::kCols;
// Pairs summed in registers before the sum is added into out: one fp32 chain over all of K (11008
// for InternLM-7B's down projection) errs ~K ulps, several times a blocked GEMM's; two levels of
// 128 + K / 128 terms do not, for one load and store of out per 128 inputs. A block of a group's
// four panels (16 KiB) stays in L1 while a tile that holds fewer panels in registers walks it again.
constexpr int kBlockPairs = 64;

inline int64_t pairs_of(int64_t K) { return (K + 1) / 2; }

// The arguments of one tile call: rows [0, R) of x (fp32, row stride ldx = 2 * pairs, a zero past an
// odd K) against the panels of w, into out (fp32, row stride ldo).
struct Args {
  const float* x;
  int64_t K;
  int64_t ldx;
  const uint16_t* w;
  const float* bias;
  float* out;
  int64_t ldo;

  // x fp32 as it is, bf16 converted once; an odd K padded with a zero column, as the weights are
  at::Tensor bind(const at::Tensor& x_in) {
    at::Tensor xf = x_in.scalar_type() == at::kBFloat16 ? x_in.to(at::kFloat) : x_in;
    K = x_in.size(1);
    if (K & 1) xf = at::constant_pad_nd(xf, {0, 1});
    x = xf.data_ptr<float>();
    ldx = 2 * pairs_of(K);
    return xf;
  }
  Args from_row(int64_t r0) const {
    Args a = *this;
    a.x += r0 * ldx;
    a.out += r0 * ldo;
    return a;
  }
};

#if IFAST_ISA_LEVEL == 0
void tile(const Args& a, int R, int64_t p0, int gs) {
  const int64_t pairs = pairs_of(a.K);
  const uint16_t* w = a.w + p0 * pairs * 2 * kCols;
  for (int q = 0; q < gs; ++q)
    for (int r = 0; r < R; ++r) {
      const float* xr = a.x + r * a.ldx;
      float* o = a.out + r * a.ldo + (p0 + q) * kCols;
      for (int64_t j0 = 0; j0 < pairs; j0 += kBlockPairs) {
        float part[kCols] = {};
        for (int64_t j = j0; j < std::min<int64_t>(pairs, j0 + kBlockPairs); ++j) {
          const uint16_t* line = w + (j * gs + q) * 2 * kCols;
          for (int c = 0; c < kCols; ++c) {
            part[c] += xr[2 * j] * bits_to_float(static_cast<uint32_t>(line[2 * c]) << 16);
            part[c] += xr[2 * j + 1] * bits_to_float(static_cast<uint32_t>(line[2 * c + 1]) << 16);
          }
        }
        for (int c = 0; c < kCols; ++c) o[c] += part[c];
      }
    }
}
#endif

#if IFAST_ISA_LEVEL >= 2

// R rows x P panels q0..q0+P-1 of the group of gs panels at w, pairs [j0, j1), added into out (the
// group's first column); one zmm accumulator per (row, panel): R * P + 2P + 2 <= 32 registers.
template <int R, int P>
inline void block512(const Args& a, const uint16_t* w, int gs, int q0, int64_t j0, int64_t j1, float* out) {
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  __m512 c[R][P];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int q = 0; q < P; ++q) c[r][q] = _mm512_setzero_ps();
  for (int64_t j = j0; j < j1; ++j) {
    __m512 lo[P], hi[P];
    const uint16_t* line = w + (j * gs + q0) * 2 * kCols;
#pragma GCC unroll 16
    for (int q = 0; q < P; ++q) {
      const __m512i v = _mm512_loadu_si512(line + q * 2 * kCols);
      lo[q] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      hi[q] = _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask));
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 x0 = _mm512_set1_ps(a.x[r * a.ldx + 2 * j]);
      const __m512 x1 = _mm512_set1_ps(a.x[r * a.ldx + 2 * j + 1]);
#pragma GCC unroll 16
      for (int q = 0; q < P; ++q) c[r][q] = _mm512_fmadd_ps(x1, hi[q], _mm512_fmadd_ps(x0, lo[q], c[r][q]));
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int q = 0; q < P; ++q) {
      float* o = out + r * a.ldo + (q0 + q) * kCols;
      _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), c[r][q]));
    }
}

// a whole group at every R: 8 panels at one row read 12-15% slower than 4 (in separate streams)
constexpr int panels_per_block(int) { return 4; }

#endif

#if IFAST_ISA_LEVEL == 1

// AVX2: a pair of a panel is two 32-byte halves (columns 0..7 and 8..15), each giving 2 x 8 fp32;
// two ymm accumulators per (row, panel), otherwise as block512. The 4-row tile (one panel) converts
// both halves first and broadcasts each x value once: converting per half re-broadcast x for each,
// 18 loads for 16 FMAs, and ran at about half the FMA rate (1.5-1.8x slower at 4-16 rows from L3).
// Narrower tiles load x per half, which their ratio of FMAs to loads affords (converting first was
// 5-8% slower at 3 rows). With fewer panels in registers than the group holds (2 or
// more rows), a block takes several passes, each reading every 2nd or 4th line, which the hardware
// prefetcher does not follow; so each pass prefetches its own lines of the next block into L2.
// (Prefetching the whole group in the first pass instead reads DRAM in bursts while the
// compute-bound passes after it read L1: 20-40% slower at 4 rows.)
template <int R, int P>
inline void block256(const Args& a, const uint16_t* w, int gs, int q0, int64_t j0, int64_t j1, float* out) {
  const bool fetch = P < gs;
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  __m256 c[R][2 * P];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int h = 0; h < 2 * P; ++h) c[r][h] = _mm256_setzero_ps();
  for (int64_t j = j0; j < j1; ++j) {
    const uint16_t* line = w + (j * gs + q0) * 2 * kCols;
    if (fetch)
#pragma GCC unroll 16
      for (int q = 0; q < P; ++q)
        _mm_prefetch(reinterpret_cast<const char*>(line + (kBlockPairs * gs + q) * 2 * kCols), _MM_HINT_T1);
    if constexpr (R == 4) {
      __m256 lo[2], hi[2];
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + h * kCols));
        lo[h] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        hi[h] = _mm256_castsi256_ps(_mm256_and_si256(v, hi_mask));
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m256 x0 = _mm256_broadcast_ss(a.x + r * a.ldx + 2 * j);
        const __m256 x1 = _mm256_broadcast_ss(a.x + r * a.ldx + 2 * j + 1);
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) c[r][h] = _mm256_fmadd_ps(x1, hi[h], _mm256_fmadd_ps(x0, lo[h], c[r][h]));
      }
    } else {
#pragma GCC unroll 16
      for (int h = 0; h < 2 * P; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + h * kCols));
        const __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        const __m256 hi = _mm256_castsi256_ps(_mm256_and_si256(v, hi_mask));
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r)
          c[r][h] = _mm256_fmadd_ps(_mm256_broadcast_ss(a.x + r * a.ldx + 2 * j + 1), hi,
                                    _mm256_fmadd_ps(_mm256_broadcast_ss(a.x + r * a.ldx + 2 * j), lo, c[r][h]));
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int h = 0; h < 2 * P; ++h) {
      float* o = out + r * a.ldo + q0 * kCols + h * 8;
      _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), c[r][h]));
    }
}

// 2RP accumulators + mask + converted weights (4 at P = 1, else 2) + broadcasts <= 16
constexpr int panels_per_block(int R) { return R == 1 ? 4 : R == 2 ? 2 : 1; }

#endif

#if IFAST_ISA_LEVEL >= 1
void tile(const Args& a, int R, int64_t p0, int gs) {
  const int64_t pairs = pairs_of(a.K);
  const uint16_t* w = a.w + p0 * pairs * 2 * kCols;
  float* out = a.out + p0 * kCols;
  for (int64_t j0 = 0; j0 < pairs; j0 += kBlockPairs) {
    const int64_t j1 = std::min<int64_t>(pairs, j0 + kBlockPairs);
    panels::over_group<panels_per_block>(R, gs, [&](auto r, auto np, int q0) {
#if IFAST_ISA_LEVEL >= 2
      block512<decltype(r)::value, decltype(np)::value>(a, w, gs, q0, j0, j1, out);
#else
      block256<decltype(r)::value, decltype(np)::value>(a, w, gs, q0, j0, j1, out);
#endif
    });
  }
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
  const Args weights{nullptr, 0, 0, reinterpret_cast<const uint16_t*>(panels_w.data_ptr()), nullptr, nullptr, 0};
  return panels::run(x, bias, panels_w.size(0), weights, tile);
}

}  // namespace ifast::cpu::IFAST_ISA
