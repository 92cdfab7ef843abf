// Attention of a few new query tokens against a KV cache (decoding), split over the cache length.
//
// Decoding is bound by reading the cache. In the (batch, cache_len, kv_heads, D) layout one token's
// keys for all heads are one contiguous run, while one head's consecutive tokens are kv_heads * D
// apart (16 KB for 32 heads of 128): walking a head at a time defeats the hardware prefetcher and
// maps the rows onto a single L1 set. So a task walks the cache token by token, all heads at once,
// streaming it front to back exactly once; every head's running softmax (max, sum, output row)
// stays in L1/L2. Tasks split the cache length (so batch 1 keeps every thread busy); each chunk's
// partial softmax is merged at the end. The cache is read in place, never packed or widened.
// Reference: internlm_fast/ops/kvcache.py::flash_attn_with_kvcache_ref.
#include "attention_common.h"

#include <ATen/ops/empty.h>

namespace ifast::cpu::attn {
namespace {

constexpr int kDecodeBlock = 32;  // tokens per online-softmax step

template <typename T>
struct Decode {
  const T *q, *k, *v;
  int64_t q_b, q_t, q_h, k_b, k_t, k_h, v_b, v_t, v_h;  // strides
  const int32_t* lens;
  int Sq, Hq, Hk, D, group, rows;  // rows = Sq * Hq query vectors per sequence: row = t * Hq + h
  int64_t chunk;
  int nchunks;
  float qscale;
  bool causal;
  float* part;  // per task: rows x (D + 2): unnormalised output, then max and sum (log2 units)

  struct State {
    std::vector<float> Q, S, m, l;
  };
  State make_state() const {
    return {std::vector<float>(size_t(rows) * D), std::vector<float>(size_t(rows) * kDecodeBlock),
            std::vector<float>(rows), std::vector<float>(rows)};
  }

  void operator()(int64_t task, State& st) const {
    const int b = int(task / nchunks), c = int(task % nchunks);
    const int lk = lens[b], diag = lk - Sq;
    const int64_t j_begin = c * chunk, j_end = std::min<int64_t>(lk, j_begin + chunk);
    const int64_t ld = D + 2;
    float* O = part + task * rows * ld;
    float *Q = st.Q.data(), *S = st.S.data(), *m = st.m.data(), *l = st.l.data();
    const float qs = qscale;
    for (int t = 0; t < Sq; ++t)
      for (int h = 0; h < Hq; ++h) {
        const T* __restrict src = q + b * q_b + t * q_t + h * q_h;
        float* __restrict dst = Q + int64_t(t * Hq + h) * D;
#pragma omp simd
        for (int d = 0; d < D; ++d) dst[d] = load(src, d) * qs;
      }
    for (int r = 0; r < rows; ++r) std::fill(O + r * ld, O + r * ld + D, 0.f);
    std::fill(m, m + rows, kNegInf);
    std::fill(l, l + rows, 0.f);
    const T* kb = k + b * k_b;
    const T* vb = v + b * v_b;
    for (int64_t j0 = j_begin; j0 < j_end; j0 += kDecodeBlock) {
      const int n = int(std::min<int64_t>(kDecodeBlock, j_end - j0));
      // scores: token-major, so each token's keys (all heads, contiguous) are read once
      for (int j = 0; j < n; ++j)
        for (int hk = 0; hk < Hk; ++hk) {
          const T* __restrict kr = kb + (j0 + j) * k_t + hk * k_h;
          for (int t = 0; t < Sq; ++t)
            for (int g = 0; g < group; ++g) {
              const int r = t * Hq + hk * group + g;
              const float* __restrict qr = Q + int64_t(r) * D;
              float acc = 0.f;
#pragma omp simd reduction(+ : acc)
              for (int d = 0; d < D; ++d) acc += qr[d] * load(kr, d);
              S[r * kDecodeBlock + j] = acc;
            }
        }
      for (int r = 0; r < rows; ++r)
        online_softmax_row(S + r * kDecodeBlock, visible(causal, r / Hq, diag, int(j0), n), n, m[r], l[r],
                           O + r * ld, D);
      // O += P V, token-major again: each value row is read once and added into its heads' rows
      for (int j = 0; j < n; ++j)
        for (int hk = 0; hk < Hk; ++hk) {
          const T* __restrict vr = vb + (j0 + j) * v_t + hk * v_h;
          for (int t = 0; t < Sq; ++t)
            for (int g = 0; g < group; ++g) {
              const int r = t * Hq + hk * group + g;
              const float p = S[r * kDecodeBlock + j];
              if (p == 0.f) continue;
              float* __restrict o = O + r * ld;
#pragma omp simd
              for (int d = 0; d < D; ++d) o[d] += p * load(vr, d);
            }
        }
    }
    for (int r = 0; r < rows; ++r) {
      O[r * ld + D] = m[r];
      O[r * ld + D + 1] = l[r];
    }
  }

  // Combines the chunks of sequence b for query rows [r0, r1):
  // out = sum_c 2^(m_c - M) O_c / sum_c 2^(m_c - M) l_c.
  void merge(int b, int r0, int r1, T* outp, float* lse) const {
    const int64_t ld = D + 2;
    const float* first = part + int64_t(b) * nchunks * rows * ld;
    std::vector<float> acc(D);
    for (int r = r0; r < r1; ++r) {
      const int t = r / Hq, h = r % Hq;
      float M = kNegInf;
      for (int c = 0; c < nchunks; ++c) M = std::max(M, first[(int64_t(c) * rows + r) * ld + D]);
      std::fill(acc.begin(), acc.end(), 0.f);
      float L = 0.f;
      if (M != kNegInf)
        for (int c = 0; c < nchunks; ++c) {
          const float* o = first + (int64_t(c) * rows + r) * ld;
          if (o[D] == kNegInf) continue;
          const float w = exp2_approx(o[D] - M);
          L += w * o[D + 1];
#pragma omp simd
          for (int d = 0; d < D; ++d) acc[d] += w * o[d];
        }
      const float inv = L > 0.f ? 1.f / L : 0.f;
      T* dst = outp + ((int64_t(b) * Sq + t) * Hq + h) * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) store(dst, d, acc[d] * inv);
      lse[(int64_t(b) * Hq + h) * Sq + t] = L > 0.f ? (M + std::log2(L)) * kLn2 : kInf;
    }
  }
};

}  // namespace

void decode_splitkv(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& lens, double softmax_scale, bool causal, at::Tensor& out, at::Tensor& lse) {
  const int B = int(q.size(0)), Sq = int(q.size(1)), Hq = int(q.size(2)), D = int(q.size(3));
  const int Hk = int(k_cache.size(2)), group = Hq / Hk;
  const int32_t* l = lens.const_data_ptr<int32_t>();
  int max_len = 0;
  for (int b = 0; b < B; ++b) max_len = std::max(max_len, l[b]);
  // about 4 tasks per thread over the whole batch, none shorter than 256 tokens
  const int64_t want = 4 * int64_t(at::get_num_threads());
  const int64_t per_seq = std::max<int64_t>(1, (want + B - 1) / B);
  const int64_t chunk = std::max<int64_t>(256, (max_len + per_seq - 1) / per_seq);
  const int nchunks = int(std::max<int64_t>(1, (max_len + chunk - 1) / chunk));
  const int rows = Sq * Hq;
  const int64_t ntasks = int64_t(B) * nchunks;
  at::Tensor part = at::empty({ntasks * rows * (D + 2)}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "flash_attn_with_kvcache", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "flash_attn_with_kvcache: fp64 is not supported by the cpu backend");
    } else {
      Decode<scalar_t> dec{q.const_data_ptr<scalar_t>(), k_cache.const_data_ptr<scalar_t>(),
                           v_cache.const_data_ptr<scalar_t>(), q.stride(0), q.stride(1), q.stride(2),
                           k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
                           v_cache.stride(1), v_cache.stride(2), l, Sq, Hq, Hk, D, group, rows, chunk, nchunks,
                           float(softmax_scale) * kLog2e, causal, part.mutable_data_ptr<float>()};
      run_tasks(ntasks, [&] { return dec.make_state(); }, [&](int64_t t, auto& st) { dec(t, st); });
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      float* ls = lse.mutable_data_ptr<float>();
      // merge in pieces of 8 query rows per sequence, so a single sequence still uses every thread
      const int pieces = (rows + 7) / 8;
      at::parallel_for(0, int64_t(B) * pieces, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int b = int(i / pieces), r0 = int(i % pieces) * 8;
          dec.merge(b, r0, std::min(rows, r0 + 8), o, ls);
        }
      });
    }
  });
}

}  // namespace ifast::cpu::attn
