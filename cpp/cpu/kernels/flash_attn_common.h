// Pieces shared by the CPU attention kernels (flash_attn.cpp: blocked forward and backward;
// flash_attn_kvcache.cpp: split-KV decoding): fp32 row views, sequence geometry, task scheduling.
// Part of a kernel body compiled once per instruction set (isa_compile.h): no include guard.

#include "flash_attn_tiles.h"

namespace ifast::cpu::IFAST_ISA::attn {

constexpr int kBlockQ = 128;
// query rows per forward task: 256 at the AVX-512 level halves the times each block of keys and values
// is read and gathered per query row (fp32 forward 3-7% faster on 2 Sapphire-Rapids-class cores; the
// backward keeps 128, where 256 was slower in bf16); AVX2 keeps the 128 it was tuned with
constexpr int kForwardRows = IFAST_ISA_LEVEL >= 2 ? 256 : kBlockQ;
constexpr int kBlockK = 128;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();

// fp32 rows of a (tokens, heads, D) tensor: the tensor itself when it is fp32, else a widened copy.
struct Rows {
  at::Tensor t;
  const float* p;
  int64_t ld_t, ld_h;
  const float* at(int64_t token, int64_t head) const { return p + token * ld_t + head * ld_h; }
};

inline Rows f32_rows(const at::Tensor& x) {
  at::Tensor t = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  return {t, t.const_data_ptr<float>(), t.stride(0), t.stride(1)};
}

// fp32 rows laid out head-major, (heads, tokens, D) contiguous: consecutive tokens of one head are
// D floats apart. In the (tokens, heads, D) layout they are heads * D apart, a multiple of 4 KB for
// 8+ heads of 128, so a block of rows maps onto one L1 set and thrashes it.
inline Rows f32_rows_head_major(const at::Tensor& x) {
  at::Tensor t = x.to(at::kFloat).transpose(0, 1).contiguous();
  return {t, t.const_data_ptr<float>(), t.size(2), t.size(1) * t.size(2)};
}

// Where each sequence's query rows and keys are, in token rows of the (tokens, heads, D) views:
// packed varlen batches (cu_seqlens), or a KV cache whose sequence b starts at row b * cache_len
// and holds cache_seqlens[b] valid keys. Also numbers the key blocks for PackedKeys.
struct Seqs {
  int batch = 0;
  std::vector<int64_t> q0, k0;
  std::vector<int> lq_, lk_;
  std::vector<int64_t> kblock0;
  int64_t nkblocks = 0;

  static Seqs varlen(const at::Tensor& cu_q, const at::Tensor& cu_k) {
    Seqs s;
    const int32_t* cq = cu_q.const_data_ptr<int32_t>();
    const int32_t* ck = cu_k.const_data_ptr<int32_t>();
    s.batch = int(cu_q.numel() - 1);
    for (int b = 0; b < s.batch; ++b) s.add(cq[b], cq[b + 1] - cq[b], ck[b], ck[b + 1] - ck[b]);
    return s.finish();
  }
  // q (batch * seqlen_q rows), cache (batch * cache_len rows), lens int32 (batch,)
  static Seqs cache(int batch, int seqlen_q, int64_t cache_len, const at::Tensor& lens) {
    Seqs s;
    s.batch = batch;
    const int32_t* l = lens.const_data_ptr<int32_t>();
    for (int b = 0; b < batch; ++b) s.add(int64_t(b) * seqlen_q, seqlen_q, b * cache_len, l[b]);
    return s.finish();
  }
  int lq(int b) const { return lq_[b]; }
  int lk(int b) const { return lk_[b]; }

 private:
  void add(int64_t qs, int ql, int64_t ks, int kl) {
    q0.push_back(qs);
    lq_.push_back(ql);
    k0.push_back(ks);
    lk_.push_back(kl);
  }
  Seqs& finish() {
    kblock0.resize(batch + 1);
    for (int b = 0; b < batch; ++b) {
      kblock0[b] = nkblocks;
      nkblocks += (lk(b) + kBlockK - 1) / kBlockK;
    }
    kblock0[batch] = nkblocks;
    return *this;
  }
};

// Runs fn(task_index, state) for every task on all threads, handing tasks out one at a time (tasks
// differ in cost under a causal mask, so a static split would leave a thread idle). `make_state`
// builds each thread's scratch once.
template <typename MakeState, typename Fn>
void run_tasks(int64_t ntasks, MakeState&& make_state, Fn&& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < ntasks;) fn(t, state);
  });
}

// Causal visibility, bottom-right aligned: query row i sees keys j <= i + diag, diag = lk - lq.
inline int visible(bool causal, int i, int diag, int j0, int n) {
  return causal ? std::clamp(i + diag - j0 + 1, 0, n) : n;
}

// The end of an online-softmax step of one row: the running max m moves to m_new, the output
// accumulator o (D floats) is rescaled to it, and the sum l takes the block's `sum` (of probabilities
// against m_new).
inline void advance_row(float& m, float& l, float m_new, float sum, float* o, int D) {
  const float alpha = exp2_approx(m - m_new);  // 0 when m = -inf
  if (alpha != 1.f) {
#pragma omp simd
    for (int d = 0; d < D; ++d) o[d] *= alpha;
  }
  l = l * alpha + sum;
  m = m_new;
}

// A row's log-sum-exp in natural-log units from its max m and sum l in log2 units; +inf for a row
// that saw no key (l = 0), as flash-attn reports it.
inline float row_lse(float m, float l) { return l > 0.f ? (m + std::log2(l)) * kLn2 : kInf; }

#if IFAST_ISA_LEVEL >= 2
// (GCC 12 takes the _mm512_undefined_ps() operand inside its unmasked AVX-512 intrinsics for an
// uninitialised variable.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
inline __mmask16 lanes(int n) { return n <= 0 ? __mmask16(0) : n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u); }

// horizontal max and sum of 16 lanes (GCC 12's _mm512_reduce_* warn as above)
inline __m128 halve_to_128(__m512 v, __m256 (*op)(__m256, __m256), __m128 (*op4)(__m128, __m128)) {
  const __m256 a = op(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 b = op4(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  b = op4(b, _mm_movehl_ps(b, b));
  return op4(b, _mm_movehdup_ps(b));
}
inline float hmax(__m512 v) { return _mm_cvtss_f32(halve_to_128(v, _mm256_max_ps, _mm_max_ps)); }
inline float hsum(__m512 v) { return _mm_cvtss_f32(halve_to_128(v, _mm256_add_ps, _mm_add_ps)); }

// 2^x on 16 lanes for x <= 0 (a score less its row's max): 2^round(x) by scalef (which underflows to
// 0 below -149 by itself) times a polynomial in the remainder, of degree 6 (exp2_approx's, for fp32
// probabilities) or 4 (relative error 5.2e-6, for probabilities rounded to bf16 at 3.9e-3). NaN stays
// NaN (max returns its second operand when either is NaN).
template <int kDegree>
inline __m512 exp2_nonpositive(__m512 x) {
  static_assert(kDegree == 4 || kDegree == 6);
  // highest power first, down to the constant 1
  const float* c6 = kExp2Poly6;
  constexpr float c4[] = {9.627114423652851e-3f, 5.598684558650195e-2f, 2.402331796970809e-1f, 6.931088582133003e-1f,
                          1.f};
  const float* c = kDegree == 6 ? c6 : c4;
  x = _mm512_max_ps(_mm512_set1_ps(-150.f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(c[0]);
#pragma GCC unroll 6
  for (int i = 1; i <= kDegree; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(p, n);
}

// online_softmax_row below for a row of at most kBlockK scores, held in zmm registers between the
// pass that finds the max and the one that exponentiates (GCC vectorises the plain loops at ymm
// width, and in two passes over memory).
inline void online_softmax_row_zmm(float* s, int valid, int n, float& m, float& l, float* o, int D) {
  constexpr int kVecs = kBlockK / 16;
  __m512 x[kVecs];
  __m512 mx = _mm512_set1_ps(m);
#pragma GCC unroll 8
  for (int i = 0; i < kVecs; ++i) {
    const __mmask16 k = lanes(valid - 16 * i);
    x[i] = _mm512_maskz_loadu_ps(k, s + 16 * i);
    mx = _mm512_mask_max_ps(mx, k, x[i], mx);  // a NaN score is skipped, as row_max does
  }
  const float m_new = hmax(mx);
  if (m_new == kNegInf) {
    std::fill(s, s + n, 0.f);
    return;
  }
  const __m512 neg_m = _mm512_set1_ps(-m_new);
  __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int i = 0; i < kVecs; ++i) {
    if (16 * i >= n) break;
    const __m512 p = _mm512_maskz_mov_ps(lanes(valid - 16 * i), exp2_nonpositive<6>(_mm512_add_ps(x[i], neg_m)));
    sum = _mm512_add_ps(sum, p);
    _mm512_mask_storeu_ps(s + 16 * i, lanes(n - 16 * i), p);
  }
  advance_row(m, l, m_new, hsum(sum), o, D);
}
#pragma GCC diagnostic pop
#endif

// One online-softmax step of one query row over a block of scores s[0..n) in log2 units, of which
// the first `valid` are visible: s becomes the unnormalised probabilities (zero past `valid`), the
// running max m and sum l advance, and the row's output accumulator o (D floats) is rescaled to the
// new max. A row that has seen no visible score yet is left at m = -inf, l = 0.
inline void online_softmax_row(float* s, int valid, int n, float& m, float& l, float* o, int D) {
#if IFAST_ISA_LEVEL >= 2
  if (n <= kBlockK) return online_softmax_row_zmm(s, valid, n, m, l, o, D);
#endif
  const float m_new = row_max(s, valid, m);
  if (m_new == kNegInf) {
    std::fill(s, s + n, 0.f);
    return;
  }
#if IFAST_ISA_LEVEL == 1
  const __m256 neg_m = _mm256_set1_ps(-m_new);
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  int j = 0;
  for (; j + 32 <= valid; j += 32) {
    __m256 p[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) p[k] = _mm256_add_ps(_mm256_loadu_ps(s + j + 8 * k), neg_m);
    exp2_nonpositive_ymm(p);
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      _mm256_storeu_ps(s + j + 8 * k, p[k]);
      acc[k & 1] = _mm256_add_ps(acc[k & 1], p[k]);
    }
  }
  for (; j < valid; j += 8) {  // the rest a vector at a time, lanes past `valid` zero
    const __m256 keep = _mm256_castsi256_ps(first_lanes_ymm(valid - j));
    __m256 p[1] = {_mm256_add_ps(_mm256_maskload_ps(s + j, _mm256_castps_si256(keep)), neg_m)};
    exp2_nonpositive_ymm(p);
    p[0] = _mm256_and_ps(p[0], keep);
    _mm256_storeu_ps(s + j, p[0]);  // j < valid <= n <= the row's length, and rows are padded to 8
    acc[0] = _mm256_add_ps(acc[0], p[0]);
  }
  if (j < n) std::fill(s + j, s + n, 0.f);
  const __m256 t = _mm256_add_ps(acc[0], acc[1]);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  advance_row(m, l, m_new, _mm_cvtss_f32(h), o, D);
#else
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < valid; ++j) {
    const float p = exp2_approx(s[j] - m_new);
    s[j] = p;
    sum += p;
  }
  std::fill(s + valid, s + n, 0.f);
  advance_row(m, l, m_new, sum, o, D);
#endif
}

// Decoding path (flash_attn_kvcache.cpp): q (B, Sq, Hq, D) against caches (B, cache_len, Hk, D), or
// pages (num_blocks, block_size, Hk, D) through block_table (B, max_blocks), holding lens[b] valid
// keys; writes out (B, Sq, Hq, D) and lse (B, Hq, Sq). Arguments checked by the caller.
void decode_splitkv(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& lens, const std::optional<at::Tensor>& block_table, double softmax_scale,
                    bool causal, at::Tensor& out, at::Tensor& lse);

}  // namespace ifast::cpu::IFAST_ISA::attn
