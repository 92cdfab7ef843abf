// out (M, N) = x (M, K) @ W (K, N) [+ bias] for the few rows of a decode step (M <= ~16), fp32,
// with W stored once, at load time, as column panels: panels (N / 16, K, 16), panel p holding
// columns 16p..16p+15 of W row after row. MKL handles such a GEMM badly: it repacks the weights on
// every call and runs short M on one thread, so a batch-8 step costs several times a batch-1 step
// although both stream the same weights from memory. Here each thread owns whole panels; a
// microkernel keeps R rows x 16P columns of accumulators in registers and streams P panels,
// contiguous, once per 8 rows on AVX-512, 6 on AVX2 (from L2 after the first).
// Reference: torch.addmm(bias, x, W).
// Compiled once per instruction set (isa_compile.h): no include guard; IFAST_ISA_LEVEL selects the
// vector code of each path.

namespace ifast::cpu::IFAST_ISA {
namespace {

constexpr int kCols = 16;  // columns per panel: one AVX-512 register, two AVX2 ones
#if IFAST_ISA_LEVEL >= 2
// rows per microkernel call: 8 rows x 3 panels = 24 accumulators + 3 panel loads + 1 broadcast of the
// 32 zmm registers, so a batch-8 decode step reads each panel once
constexpr int kRows = 8;
#else
constexpr int kRows = 6;  // 12 accumulators + 2 panel loads + 1 broadcast of the 16 ymm registers
#endif
// Panel rows (64 B, one cache line each) prefetched ahead of the one being multiplied: into L2
// kPrefetchL2Rows ahead, then into L1 kPrefetchRows ahead. The hardware prefetcher alone leaves a
// batch-1 decode step waiting on memory. A prefetch into L1 holds one of the core's few L1 miss
// buffers until its line arrives, which caps how many lines a core has in flight from DRAM; into L2
// alone, the loads of many rows wait on L2 instead. Both, on 2 Zen 4 cores at the tiny preset's
// shapes with the weights cold: 0.75-0.93x the time of the L1 prefetch alone (1, 4 and 8 rows,
// AVX-512), 0.77-0.97x at 1-4 rows of the AVX2 tiles, 1.0-1.05x at 8 (compute-bound there).
constexpr int kPrefetchRows = 32, kPrefetchL2Rows = 64;

// the prefetches of a panel's row k (panel: the panel's first row), at both leads above
inline void prefetch_ahead(const float* panel, int64_t k) {
  _mm_prefetch(reinterpret_cast<const char*>(panel + (k + kPrefetchL2Rows) * kCols), _MM_HINT_T1);
  _mm_prefetch(reinterpret_cast<const char*>(panel + (k + kPrefetchRows) * kCols), _MM_HINT_T0);
}

// out[r][0..16P) = bias + sum_k x[r][k] * w_p[k][0..16) for R rows and P adjacent panels (w_p =
// w + p * K * 16). Each accumulator is one FMA chain; a chain waits out the FMA latency (4-5 cycles)
// between its steps, so at most two FMAs issue per cycle only with 8+ chains: few rows take several
// panels at once (R * 2P chains; R * 2P + 2P + 1 <= 16 ymm registers). The arrays are fully unrolled
// by the compiler into registers (checked: no stack traffic in the loop).
template <int R, int P>
inline void tile(const float* x, int64_t K, const float* w, const float* bias, float* out, int64_t ldo) {
#if IFAST_ISA_LEVEL >= 2
  __m512 c[R][P];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) {
    const __m512 z = bias ? _mm512_loadu_ps(bias + p * kCols) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) c[r][p] = z;
  }
  const int64_t ldp = K * kCols;
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[P];
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {
      b[p] = _mm512_loadu_ps(w + p * ldp + k * kCols);
      prefetch_ahead(w + p * ldp, k);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * K + k]);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) c[r][p] = _mm512_fmadd_ps(a, b[p], c[r][p]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) _mm512_storeu_ps(out + r * ldo + p * kCols, c[r][p]);
#elif IFAST_ISA_LEVEL >= 1
  __m256 c[R][2 * P];
#pragma GCC unroll 16
  for (int j = 0; j < 2 * P; ++j) {
    const __m256 z = bias ? _mm256_loadu_ps(bias + j * 8) : _mm256_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) c[r][j] = z;
  }
  const int64_t ldp = K * kCols;  // floats from one panel to the next
  for (int64_t k = 0; k < K; ++k) {
    __m256 b[2 * P];
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {
      b[2 * p] = _mm256_loadu_ps(w + p * ldp + k * kCols);
      b[2 * p + 1] = _mm256_loadu_ps(w + p * ldp + k * kCols + 8);
      prefetch_ahead(w + p * ldp, k);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * K + k);
#pragma GCC unroll 16
      for (int j = 0; j < 2 * P; ++j) c[r][j] = _mm256_fmadd_ps(a, b[j], c[r][j]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {
      _mm256_storeu_ps(out + r * ldo + p * kCols, c[r][2 * p]);
      _mm256_storeu_ps(out + r * ldo + p * kCols + 8, c[r][2 * p + 1]);
    }
#else
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kCols * P; ++c) {
      const int p = c / kCols, cc = c % kCols;
      float s = bias ? bias[c] : 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[r * K + k] * w[p * K * kCols + k * kCols + cc];
      out[r * ldo + c] = s;
    }
#endif
}

// Panels taken at once for R rows (see tile): enough FMA chains to hide the latency, within the
// registers (AVX-512: R * P + P + 1 <= 32; AVX2: 2 R P + 2 P + 1 <= 16).
#if IFAST_ISA_LEVEL >= 2
constexpr int panels_at_once(int R) { return R <= 4 ? 4 : 3; }
#else
constexpr int panels_at_once(int R) { return R == 1 ? 4 : R <= 3 ? 2 : 1; }
#endif

// Rows [0, R) of x times panels [p0, p1): groups of panels_at_once(R), then single panels.
template <int R>
void rows(const float* x, int64_t K, const float* w, int64_t p0, int64_t p1, const float* bias, float* out,
          int64_t ldo) {
  constexpr int P = panels_at_once(R);
  int64_t p = p0;
  for (; p + P <= p1; p += P)
    tile<R, P>(x, K, w + p * K * kCols, bias ? bias + p * kCols : nullptr, out + p * kCols, ldo);
  for (; p < p1; ++p) tile<R, 1>(x, K, w + p * K * kCols, bias ? bias + p * kCols : nullptr, out + p * kCols, ldo);
}

using RowsFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, const float*, float*, int64_t);
#if IFAST_ISA_LEVEL >= 2
constexpr RowsFn kRowsFn[kRows + 1] = {nullptr, rows<1>, rows<2>, rows<3>, rows<4>, rows<5>, rows<6>, rows<7>, rows<8>};
#else
constexpr RowsFn kRowsFn[kRows + 1] = {nullptr, rows<1>, rows<2>, rows<3>, rows<4>, rows<5>, rows<6>};
#endif

}  // namespace

at::Tensor few_rows_linear(const at::Tensor& x, const at::Tensor& panels_w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && panels_w.dim() == 3 && panels_w.size(2) == kCols && x.size(1) == panels_w.size(1),
              "few_rows_linear: x (M, K) and the weight panels (N / 16, K, 16) must agree on K");
  TORCH_CHECK(x.is_contiguous() && panels_w.is_contiguous(), "few_rows_linear: x and the panels must be contiguous");
  TORCH_CHECK(x.device().is_cpu() && panels_w.device().is_cpu(), "few_rows_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && panels_w.scalar_type() == at::kFloat, "few_rows_linear: fp32 only");
  const int64_t M = x.size(0), K = x.size(1), panels = panels_w.size(0), N = panels * kCols;
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type(),
                "few_rows_linear: bias must be contiguous (N,) of x's dtype");
  at::Tensor out = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = panels_w.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  // 8 panels (128 columns) a task at least: fewer would cost more in scheduling than they compute.
  // 12 panels at a time (a multiple of every panels_at_once) go through every group of rows, the later
  // groups reading them from L2.
  at::parallel_for(0, panels, 8, [&](int64_t p0, int64_t p1) {
    for (int64_t q0 = p0; q0 < p1; q0 += 12) {
      const int64_t q1 = std::min<int64_t>(p1, q0 + 12);
      for (int64_t r0 = 0; r0 < M; r0 += kRows) {
        const int64_t r = std::min<int64_t>(kRows, M - r0);
        kRowsFn[r](xp + r0 * K, K, wp, q0, q1, bp, op + r0 * N, N);
      }
    }
  });
  return out;
}

}  // namespace ifast::cpu::IFAST_ISA
