// out (M, N) = x (M, K) @ W (K, N) [+ bias] for the few rows of a decode step (M <= ~16), fp32,
// with W stored once, at load time, as column panels: panels (N / 16, K, 16), panel p holding
// columns 16p..16p+15 of W row after row. MKL handles such a GEMM badly: it repacks the weights on
// every call and runs short M on one thread, so a batch-8 step cost ~3.5x a batch-1 step although
// both stream the same weights from memory (21 MB per step for the tiny preset). Here each thread
// owns whole panels; a microkernel keeps R x 16 accumulators in registers and streams its panel,
// contiguous, once per 6 rows (from cache after the first). Reference: torch.addmm(bias, x, W).
#include "common.h"
#include "ops_cpu.h"

#include <ATen/ops/empty.h>

#include <algorithm>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define IFAST_FEW_ROWS_AVX2 1
#endif

namespace ifast::cpu {
namespace {

constexpr int kCols = 16;  // columns per panel: two AVX2 registers
constexpr int kRows = 6;   // rows per microkernel call: 12 accumulators + 2 panel loads + 1 broadcast

// out[r][0..16) = bias[0..16) + sum_k x[r][k] * w[k][0..16) for R rows; named accumulators, as in
// attention_tiles.h, so GCC keeps them in registers.
template <int R>
inline void tile(const float* x, int64_t K, const float* w, int64_t ldw, const float* bias, float* out, int64_t ldo) {
#ifdef IFAST_FEW_ROWS_AVX2
  const __m256 z0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 z1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
  __m256 c00 = z0, c01 = z1, c10 = z0, c11 = z1, c20 = z0, c21 = z1;
  __m256 c30 = z0, c31 = z1, c40 = z0, c41 = z1, c50 = z0, c51 = z1;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(w + k * ldw);
    const __m256 b1 = _mm256_loadu_ps(w + k * ldw + 8);
#define IFAST_FR_ROW(r)                                   \
  if constexpr (R > r) {                                  \
    const __m256 a = _mm256_broadcast_ss(x + r * K + k);  \
    c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0);            \
    c##r##1 = _mm256_fmadd_ps(a, b1, c##r##1);            \
  }
    IFAST_FR_ROW(0) IFAST_FR_ROW(1) IFAST_FR_ROW(2) IFAST_FR_ROW(3) IFAST_FR_ROW(4) IFAST_FR_ROW(5)
#undef IFAST_FR_ROW
  }
#define IFAST_FR_STORE(r)                          \
  if constexpr (R > r) {                           \
    _mm256_storeu_ps(out + r * ldo, c##r##0);      \
    _mm256_storeu_ps(out + r * ldo + 8, c##r##1);  \
  }
  IFAST_FR_STORE(0) IFAST_FR_STORE(1) IFAST_FR_STORE(2) IFAST_FR_STORE(3) IFAST_FR_STORE(4) IFAST_FR_STORE(5)
#undef IFAST_FR_STORE
#else
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kCols; ++c) {
      float s = bias ? bias[c] : 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[r * K + k] * w[k * ldw + c];
      out[r * ldo + c] = s;
    }
#endif
}

template <int R>
void rows(const float* x, int64_t K, const float* panel, const float* bias, float* out, int64_t ldo) {
  tile<R>(x, K, panel, kCols, bias, out, ldo);
}

using RowsFn = void (*)(const float*, int64_t, const float*, const float*, float*, int64_t);
constexpr RowsFn kRowsFn[kRows + 1] = {nullptr, rows<1>, rows<2>, rows<3>, rows<4>, rows<5>, rows<6>};

}  // namespace

at::Tensor few_rows_linear(const at::Tensor& x, const at::Tensor& panels_w, const c10::optional<at::Tensor>& bias) {
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
  // 8 panels (128 columns) a task at least: fewer would cost more in scheduling than they compute
  at::parallel_for(0, panels, 8, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kCols;
      for (int64_t r0 = 0; r0 < M; r0 += kRows) {
        const int64_t r = std::min<int64_t>(kRows, M - r0);
        kRowsFn[r](xp + r0 * K, K, wp + p * K * kCols, bp ? bp + n0 : nullptr, op + r0 * N + n0, N);
      }
    }
  });
  return out;
}

}  // namespace ifast::cpu
