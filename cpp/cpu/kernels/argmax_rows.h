// The index of each row's largest value, (rows, V) fp32 -> (rows,) int64: greedy decoding's token
// choice. torch.argmax runs a scalar loop on the CPU, which at a batch of 8 costs as much as a
// layer's attention; two vector passes over each row are an order of magnitude cheaper.
// Same answer as torch.argmax: the first index of the maximum, or of the first NaN if there is one.
// Reference: torch.argmax(x, dim=-1).
// Compiled once per instruction set (isa_compile.h): no include guard; IFAST_ISA_LEVEL selects the
// vector code of each path.

namespace ifast::cpu::IFAST_ISA {
namespace {

// Pass 1: the maximum, and whether a NaN occurs (then the answer is the first NaN).
// Pass 2: the first index holding the maximum.
int64_t argmax_row(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  bool nan = false;
  int64_t i = 0;
#if IFAST_ISA_LEVEL >= 1
  if (n >= 32) {
    __m256 m0 = _mm256_set1_ps(m), m1 = m0, m2 = m0, m3 = m0;
    __m256 bad = _mm256_setzero_ps();
    for (; i + 32 <= n; i += 32) {
      const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
      const __m256 c = _mm256_loadu_ps(x + i + 16), d = _mm256_loadu_ps(x + i + 24);
      bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q), _mm256_cmp_ps(c, d, _CMP_UNORD_Q)));
      m0 = _mm256_max_ps(m0, a);
      m1 = _mm256_max_ps(m1, b);
      m2 = _mm256_max_ps(m2, c);
      m3 = _mm256_max_ps(m3, d);
    }
    nan = _mm256_movemask_ps(bad) != 0;
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
    m = *std::max_element(lanes, lanes + 8);
  }
#endif
  for (; i < n; ++i) {
    nan |= std::isnan(x[i]);
    m = x[i] > m ? x[i] : m;
  }
  if (nan) {
    for (int64_t j = 0; j < n; ++j)
      if (std::isnan(x[j])) return j;
  }
  i = 0;
#if IFAST_ISA_LEVEL >= 1
  const __m256 mv = _mm256_set1_ps(m);
  for (; i + 8 <= n; i += 8) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), mv, _CMP_EQ_OQ));
    if (mask) return i + __builtin_ctz(unsigned(mask));
  }
#endif
  for (; i < n; ++i)
    if (x[i] == m) return i;
  return 0;  // n == 0 is refused before; every value -inf is found above
}

}  // namespace

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "argmax_rows: x must be (rows, V) with V > 0, got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              "argmax_rows: x must be a CPU fp32 tensor with contiguous rows");
  const int64_t rows = x.size(0), n = x.size(1), ld = x.stride(0);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* xp = x.const_data_ptr<float>();
  int64_t* op = out.mutable_data_ptr<int64_t>();
  // a thread per ~64k values at least: below that, waking a second thread costs more than it saves
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / n);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) op[r] = argmax_row(xp + r * ld, n);
  });
  return out;
}

}  // namespace ifast::cpu::IFAST_ISA
