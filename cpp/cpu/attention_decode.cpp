// Attention of a few new query tokens against a KV cache (decoding), split over the cache length.
//
// Decoding is bound by reading the cache, not by arithmetic, so this path never packs or widens the
// cache up front: each task reads its stretch of K and V once, straight from the cache, and the
// query rows of every head in the GQA group share that read. When (batch x kv heads) is too small
// to keep every thread busy (batch 1, MQA), the cache length is split into chunks, each chunk's
// softmax is computed on its own (max, sum, unnormalised output) and the chunks are merged after.
// Reference: internlm_fast/ops/kvcache.py::flash_attn_with_kvcache_ref.
#include "attention_common.h"

#include <ATen/ops/empty.h>

namespace ifast::cpu::attn {
namespace {

constexpr int kDecodeBlock = 64;  // keys per softmax step inside a chunk

template <typename T>
struct Decode {
  const T *q, *k, *v;
  int64_t q_b, q_t, q_h, k_b, k_t, k_h, v_b, v_t, v_h;  // strides
  const int32_t* lens;
  int Sq, Hq, Hk, D, group, rows;  // rows = Sq * group query vectors per (batch, kv head)
  int64_t chunk;
  int nchunks;
  float qscale;
  bool causal;
  float* part;  // per task: rows x (D + 2): unnormalised output, then max and sum (log2 units)

  struct State {
    std::vector<float> Q, S, Vb;
  };
  State make_state() const {
    return {std::vector<float>(size_t(rows) * D), std::vector<float>(size_t(rows) * kDecodeBlock),
            std::vector<float>(size_t(kDecodeBlock) * D)};
  }

  void operator()(int64_t task, State& st) const {
    const int c = int(task % nchunks);
    const int64_t bh = task / nchunks;
    const int b = int(bh / Hk), hk = int(bh % Hk);
    const int lk = lens[b], diag = lk - Sq;
    const int64_t j_begin = c * chunk, j_end = std::min<int64_t>(lk, j_begin + chunk);
    float* out = part + task * rows * (D + 2);
    float *Q = st.Q.data(), *S = st.S.data();
    // row r = t * group + g: query token t of head hk * group + g
    for (int t = 0; t < Sq; ++t)
      for (int g = 0; g < group; ++g) {
        const T* src = q + b * q_b + t * q_t + (hk * group + g) * q_h;
        float* dst = Q + int64_t(t * group + g) * D;
#pragma omp simd
        for (int d = 0; d < D; ++d) dst[d] = load(src, d) * qscale;
      }
    std::vector<float> m(rows, kNegInf), l(rows, 0.f);
    float* O = out;  // accumulate in place in the partial buffer (stride D + 2)
    for (int r = 0; r < rows; ++r) std::fill(O + int64_t(r) * (D + 2), O + int64_t(r) * (D + 2) + D, 0.f);
    const T* kb = k + b * k_b + hk * k_h;
    const T* vb = v + b * v_b + hk * v_h;
    for (int64_t j0 = j_begin; j0 < j_end; j0 += kDecodeBlock) {
      const int n = int(std::min<int64_t>(kDecodeBlock, j_end - j0));
      for (int j = 0; j < n; ++j) {
        const T* kr = kb + (j0 + j) * k_t;
        for (int r = 0; r < rows; ++r) {
          const float* qr = Q + int64_t(r) * D;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int d = 0; d < D; ++d) acc += qr[d] * load(kr, d);
          S[r * kDecodeBlock + j] = acc;
        }
      }
      for (int r = 0; r < rows; ++r) {
        const int t = r / group;
        float* sr = S + r * kDecodeBlock;
        const int valid = visible(causal, t, diag, int(j0), n);
        const float m_new = row_max(sr, valid, m[r]);
        if (m_new == kNegInf) {
          std::fill(sr, sr + n, 0.f);
          continue;
        }
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < valid; ++j) {
          const float p = exp2_approx(sr[j] - m_new);
          sr[j] = p;
          sum += p;
        }
        std::fill(sr + valid, sr + n, 0.f);
        const float alpha = exp2_approx(m[r] - m_new);
        if (alpha != 1.f) {
          float* o = O + int64_t(r) * (D + 2);
#pragma omp simd
          for (int d = 0; d < D; ++d) o[d] *= alpha;
        }
        l[r] = l[r] * alpha + sum;
        m[r] = m_new;
      }
      if constexpr (std::is_same_v<T, float>) {
        pv_block(S, kDecodeBlock, 1, rows, vb + j0 * v_t, v_t, n, D, O, D + 2);
      } else {
        float* Vb = st.Vb.data();
        for (int j = 0; j < n; ++j) {
          const T* vr = vb + (j0 + j) * v_t;
#pragma omp simd
          for (int d = 0; d < D; ++d) Vb[j * D + d] = load(vr, d);
        }
        pv_block(S, kDecodeBlock, 1, rows, Vb, D, n, D, O, D + 2);
      }
    }
    for (int r = 0; r < rows; ++r) {
      O[int64_t(r) * (D + 2) + D] = m[r];
      O[int64_t(r) * (D + 2) + D + 1] = l[r];
    }
  }

  // Combines the chunks of one (batch, kv head): out = sum_c 2^(m_c - M) O_c / sum_c 2^(m_c - M) l_c.
  void merge(int64_t bh, T* outp, float* lse) const {
    const int b = int(bh / Hk), hk = int(bh % Hk);
    const float* first = part + bh * nchunks * rows * (D + 2);
    std::vector<float> acc(D);
    for (int r = 0; r < rows; ++r) {
      const int t = r / group, h = hk * group + r % group;
      float M = kNegInf;
      for (int c = 0; c < nchunks; ++c) M = std::max(M, first[(int64_t(c) * rows + r) * (D + 2) + D]);
      std::fill(acc.begin(), acc.end(), 0.f);
      float L = 0.f;
      if (M != kNegInf)
        for (int c = 0; c < nchunks; ++c) {
          const float* o = first + (int64_t(c) * rows + r) * (D + 2);
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
  // enough chunks that every thread has ~4 tasks, none shorter than 256 keys
  const int64_t want = 4 * int64_t(at::get_num_threads());
  const int64_t per_bh = std::max<int64_t>(1, (want + int64_t(B) * Hk - 1) / (int64_t(B) * Hk));
  const int64_t chunk = std::max<int64_t>(256, (max_len + per_bh - 1) / per_bh);
  const int nchunks = int(std::max<int64_t>(1, (max_len + chunk - 1) / chunk));
  const int rows = Sq * group;
  const int64_t ntasks = int64_t(B) * Hk * nchunks;
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
      at::parallel_for(0, int64_t(B) * Hk, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) dec.merge(i, o, ls);
      });
    }
  });
}

}  // namespace ifast::cpu::attn
