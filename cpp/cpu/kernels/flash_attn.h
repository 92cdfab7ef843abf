// Flash attention on the CPU: the tiled online-softmax algorithm (FlashAttention-2), forward and
// backward, over packed sequences (a dense batch is the case of equal lengths).
//
// Forward: one task per (sequence, query head, block of query rows). A task streams the keys in
// blocks: S = Q K^T against K packed into panels, a running max and sum per row (exp2 of
// log2-scaled scores), O += P V. Backward: one task per (sequence, kv head), so dK and dV of a key
// block and dQ of the sequence are private to the task (no atomics, deterministic); P is rebuilt
// from the saved log-sum-exp, never stored. Memory is O(seqlen): no seqlen x seqlen matrix exists.
// All arithmetic is fp32; bf16/fp16 inputs are widened once up front, except bf16 on a CPU with the
// bf16 dot product (flash_attn_bf16.h), which multiplies bf16 operands into fp32 accumulators.
// Reference: internlm_fast/ops/flash_attn.py::attention_ref.
// Compiled once per instruction set (isa_compile.h): no include guard; IFAST_ISA_LEVEL selects the
// vector code of each path.

#include "flash_attn_common.h"
#include "flash_attn_tiles_bf16.h"

namespace ifast::cpu::IFAST_ISA {
namespace {

using namespace attn;

// Every (kv head, key block) packed once by pack(rows, ld, n, out) (n <= kBlockK rows, block_elems
// out), shared by all the query heads of the group and all query blocks: packing per task would redo
// it for each of them. E is the packed element: fp32, or 32-bit bf16 pair words.
template <typename E>
struct PackedKeys {
  at::Tensor buf;
  const E* p;
  int64_t block_elems;
  int64_t nblocks;
  const E* block(int hk, int64_t blk) const { return p + (hk * nblocks + blk) * block_elems; }
};

template <typename E, typename R, typename Pack>
PackedKeys<E> pack_blocks(const R& k, const Seqs& s, int Hk, int64_t block_elems, Pack&& pack) {
  static_assert(sizeof(E) == sizeof(float));
  at::Tensor buf = empty_output({std::max<int64_t>(1, Hk * s.nkblocks * block_elems)}, at::kFloat);
  E* p = reinterpret_cast<E*>(buf.mutable_data_ptr<float>());
  at::parallel_for(0, Hk * s.nkblocks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int hk = int(i / s.nkblocks);
      const int64_t blk = i % s.nkblocks;
      const int b = int(std::upper_bound(s.kblock0.begin(), s.kblock0.end(), blk) - s.kblock0.begin()) - 1;
      const int j0 = int(blk - s.kblock0[b]) * kBlockK;
      pack(k.at(s.k0[b] + j0, hk), k.ld_t, std::min(kBlockK, s.lk(b) - j0), p + i * block_elems);
    }
  });
  return {buf, p, block_elems, s.nkblocks};
}

// K (or V) in kPanel-column fp32 panels (attn::pack_k); kBlockK is a multiple of kPanel
PackedKeys<float> pack_keys(const Rows& k, const Seqs& s, int Hk, int D) {
  return pack_blocks<float>(k, s, Hk, int64_t(kBlockK) * D,
                            [D](const float* x, int64_t ld, int n, float* out) { pack_k(x, ld, n, D, out); });
}

// The forward's tasks, one per (sequence, query head, block of query rows). Tasks of one kv head run
// back to back, so its K panels and V rows stay in the shared cache while both threads work through
// them; within a head the costliest (latest, under a causal mask) query blocks go first, so each
// head's tail is short ones.
struct ForwardTask {
  int b, h, q0;
};

inline std::vector<ForwardTask> plan_forward(const Seqs& s, int Hq, int group) {
  std::vector<ForwardTask> tasks;
  for (int b = 0; b < s.batch; ++b) {
    const int nq = (s.lq(b) + kForwardRows - 1) / kForwardRows;
    for (int hk = 0; hk < Hq / group; ++hk)
      for (int i = nq - 1; i >= 0; --i)
        for (int g = 0; g < group; ++g) tasks.push_back({b, hk * group + g, i * kForwardRows});
  }
  return tasks;
}

// The end of a forward task: out = O / l for its rows (flash-attn's convention for a row that sees
// no key: output 0, lse +inf), lse = m + log2(l) in natural-log units.
template <typename T>
void finish_forward_rows(const float* Ob, const float* m, const float* l, int rows, int D, int64_t row0, int h,
                         int Hq, int64_t total_q, T* out, float* lse) {
  for (int r = 0; r < rows; ++r) {
    const int64_t row = row0 + r;
    T* o = out + (row * Hq + h) * D;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
#pragma omp simd
    for (int d = 0; d < D; ++d) store(o, d, Ob[r * D + d] * inv);
    lse[h * total_q + row] = row_lse(m[r], l[r]);
  }
}

// The backward's P = exp2(S * c - lse2) and dS = P * (dP - delta) of one tile (rows x n, ld kBlockK),
// in place of the scores S (in P) and dP (in dS); masked entries set to 0 (they were never computed).
inline void softmax_grad_rows(float* P, float* dS, int rows, int n, bool causal, int i0, int diag, int j0, float c,
                              const float* lse, const float* delta, int64_t row0, int h, int Hq, int64_t total_q) {
  for (int r = 0; r < rows; ++r) {
    const int valid = visible(causal, i0 + r, diag, j0, n);
    const float l2 = lse[h * total_q + row0 + r] * kLog2e;
    const float di = delta[(row0 + r) * Hq + h];
    float* pr = P + r * kBlockK;
    float* dsr = dS + r * kBlockK;
    int j = 0;
#if IFAST_ISA_LEVEL == 1
    const __m256 vc = _mm256_set1_ps(c), neg_l2 = _mm256_set1_ps(-l2), vdi = _mm256_set1_ps(di);
    // K vectors of the row from column col: four at a time, then one
    const auto grad = [&](int col, auto vectors) {
      constexpr int K = decltype(vectors)::value;
      __m256 p[K];
#pragma GCC unroll 4
      for (int k = 0; k < K; ++k) p[k] = _mm256_fmadd_ps(_mm256_loadu_ps(pr + col + 8 * k), vc, neg_l2);
      exp2_nonpositive_ymm(p);
#pragma GCC unroll 4
      for (int k = 0; k < K; ++k) {
        _mm256_storeu_ps(pr + col + 8 * k, p[k]);
        _mm256_storeu_ps(dsr + col + 8 * k, _mm256_mul_ps(p[k], _mm256_sub_ps(_mm256_loadu_ps(dsr + col + 8 * k), vdi)));
      }
    };
    for (; j + 32 <= valid; j += 32) grad(j, std::integral_constant<int, 4>{});
    for (; j + 8 <= valid; j += 8) grad(j, std::integral_constant<int, 1>{});
#endif
#pragma omp simd
    for (int jj = j; jj < valid; ++jj) {
      const float p = exp2_approx(pr[jj] * c - l2);
      pr[jj] = p;
      dsr[jj] = p * (dsr[jj] - di);
    }
    std::fill(pr + valid, pr + n, 0.f);
    std::fill(dsr + valid, dsr + n, 0.f);
  }
}

// dK (times the softmax scale) and dV of one key block, fp32 accumulators (n x D) -> the outputs
template <typename T>
void store_dk_dv(const float* dK, const float* dV, int n, int D, int64_t row0, int hk, int Hk, float scale, T* dk,
                 T* dv) {
  for (int r = 0; r < n; ++r) {
    const int64_t row = row0 + r;
    T* dkr = dk + (row * Hk + hk) * D;
    T* dvr = dv + (row * Hk + hk) * D;
#pragma omp simd
    for (int d = 0; d < D; ++d) {
      store(dkr, d, dK[r * D + d] * scale);
      store(dvr, d, dV[r * D + d]);
    }
  }
}

// dQ of a sequence's rows for the query heads of kv head hk: fp32 [row][head of group][D] -> dq
template <typename T>
void store_dq(const float* dQ, int lq, int group, int D, int64_t row0, int hk, int Hq, float scale, T* dq) {
  for (int i = 0; i < lq; ++i)
    for (int hh = 0; hh < group; ++hh) {
      T* dqr = dq + ((row0 + i) * Hq + hk * group + hh) * D;
      const float* src = dQ + (int64_t(i) * group + hh) * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) store(dqr, d, src[d] * scale);
    }
}

template <typename T>
struct Forward {
  const Rows &q, &v;
  const PackedKeys<float>& kp;
  const Seqs& s;
  int D, Hq, group;
  float qscale;
  bool causal;
  T* out;
  float* lse;
  int64_t total_q;
  std::vector<ForwardTask> tasks;

  struct State {
    std::vector<float> Qb, Ob, S, m, l, Vb;
  };
  State make_state() const {
    return {std::vector<float>(kForwardRows * D), std::vector<float>(kForwardRows * D),
            std::vector<float>(kForwardRows * kBlockK), std::vector<float>(kForwardRows),
            std::vector<float>(kForwardRows), std::vector<float>(kBlockK * D)};
  }

  void operator()(int64_t t, State& st) const {
    const auto [b, h, q0] = tasks[t];
    const int hk = h / group, lq = s.lq(b), lk = s.lk(b), diag = lk - lq;
    const int rows = std::min(kForwardRows, lq - q0);
    const int kv_end = causal ? std::clamp(q0 + rows + diag, 0, lk) : lk;
    float *Qb = st.Qb.data(), *Ob = st.Ob.data(), *S = st.S.data(), *m = st.m.data(), *l = st.l.data();
    const float qs = qscale;  // a local: through `this` it would be reloaded after every store
    for (int r = 0; r < rows; ++r) {
      const float* __restrict src = q.at(s.q0[b] + q0 + r, h);
      float* __restrict dst = Qb + r * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) dst[d] = src[d] * qs;
    }
    std::fill(Ob, Ob + rows * D, 0.f);
    std::fill(m, m + rows, kNegInf);
    std::fill(l, l + rows, 0.f);
    const int64_t blk0 = s.kblock0[b];
    for (int j0 = 0; j0 < kv_end; j0 += kBlockK) {
      const int n = std::min(kBlockK, kv_end - j0);
      const int off = causal ? q0 + diag - j0 : kNoMask;  // row r sees columns c <= r + off
      qk_block(Qb, D, rows, kp.block(hk, blk0 + j0 / kBlockK), n, D, S, kBlockK, off);
      for (int r = 0; r < rows; ++r)
        online_softmax_row(S + r * kBlockK, visible(causal, q0 + r, diag, j0, n), n, m[r], l[r], Ob + r * D, D);
      // V rows are heads * D apart in the input; P V walks them once per 16 columns, so gather them
      // into a contiguous block first (see f32_rows_head_major for why the stride hurts)
      float* Vb = st.Vb.data();
      for (int j = 0; j < n; ++j) std::memcpy(Vb + j * D, v.at(s.k0[b] + j0 + j, hk), sizeof(float) * D);
      pv_block(S, kBlockK, 1, rows, Vb, D, n, D, Ob, D, off);
    }
    finish_forward_rows(Ob, m, l, rows, D, s.q0[b] + q0, h, Hq, total_q, out, lse);
  }
};

template <typename T>
struct Backward {
  const Rows &q, &k, &dout;
  const PackedKeys<float> &kp, &vp;
  const Seqs& s;
  const float* lse;    // (Hq, total_q)
  const float* delta;  // (total_q, Hq): rowsum(dout * out)
  int D, Hq, Hk, group;
  float scale;
  bool causal;
  int64_t total_q;
  T *dq, *dk, *dv;

  struct State {
    std::vector<float> P, dS, dK, dV, dQ;
  };
  State make_state() const {
    return {std::vector<float>(kBlockQ * kBlockK), std::vector<float>(kBlockQ * kBlockK),
            std::vector<float>(kBlockK * D), std::vector<float>(kBlockK * D), {}};
  }

  void operator()(int64_t t, State& st) const {
    const int b = int(t / Hk), hk = int(t % Hk);
    const int lq = s.lq(b), lk = s.lk(b), diag = lk - lq;
    const float c = scale * kLog2e;
    float *P = st.P.data(), *dS = st.dS.data(), *dK = st.dK.data(), *dV = st.dV.data();
    st.dQ.assign(size_t(lq) * group * D, 0.f);  // [row][head of group][D]
    float* dQ = st.dQ.data();
    const int64_t blk0 = s.kblock0[b];
    for (int j0 = 0; j0 < lk; j0 += kBlockK) {
      const int n = std::min(kBlockK, lk - j0);
      std::fill(dK, dK + n * D, 0.f);
      std::fill(dV, dV + n * D, 0.f);
      const float* Kj = k.at(s.k0[b] + j0, hk);
      const float* Kpanels = kp.block(hk, blk0 + j0 / kBlockK);
      const float* Vpanels = vp.block(hk, blk0 + j0 / kBlockK);
      // the first query row that sees key j0
      const int i_lo = causal ? std::clamp(j0 - diag, 0, lq) : 0;
      for (int hh = 0; hh < group; ++hh) {
        const int h = hk * group + hh;
        for (int i0 = i_lo / kBlockQ * kBlockQ; i0 < lq; i0 += kBlockQ) {
          const int rows = std::min(kBlockQ, lq - i0);
          const int64_t row0 = s.q0[b] + i0;
          const float* Qi = q.at(row0, h);
          const float* dOi = dout.at(row0, h);
          // row r of the tile sees keys c <= r + off: on the diagonal tile half of every product is
          // masked and skipped (the masked scores are never read; their P and dS are set to 0)
          const int off = causal ? i0 + diag - j0 : kNoMask;
          qk_block(Qi, q.ld_t, rows, Kpanels, n, D, P, kBlockK, off);
          qk_block(dOi, dout.ld_t, rows, Vpanels, n, D, dS, kBlockK, off);  // dP = dO V^T
          softmax_grad_rows(P, dS, rows, n, causal, i0, diag, j0, c, lse, delta, row0, h, Hq, total_q);
          // transposed, key c gets contributions from query rows r >= c - off only
          pv_block(P, 1, kBlockK, n, dOi, dout.ld_t, rows, D, dV, D, kNoMask, -off);  // dV += P^T dO
          pv_block(dS, 1, kBlockK, n, Qi, q.ld_t, rows, D, dK, D, kNoMask, -off);     // dK += dS^T Q
          pv_block(dS, kBlockK, 1, rows, Kj, k.ld_t, n, D, dQ + (int64_t(i0) * group + hh) * D,
                   int64_t(group) * D, off);  // dQ += dS K
        }
      }
      store_dk_dv(dK, dV, n, D, s.k0[b] + j0, hk, Hk, scale, dk, dv);
    }
    store_dq(dQ, lq, group, D, s.q0[b], hk, Hq, scale, dq);
  }
};

#include "flash_attn_bf16.h"

// The blocked forward over the sequences s: q, k, v (tokens, heads, D) rows, out (total_q, Hq, D) and
// lse (Hq, total_q). flash_attn_fwd and a KV-cache prefill (flash_attn_kvcache_fwd) both run it.
template <typename T>
void run_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Seqs& s, double softmax_scale,
                 bool causal, at::Tensor& out, at::Tensor& lse) {
  const int Hq = int(q.size(1)), Hk = int(k.size(1)), D = int(q.size(2));
  const Rows qf = f32_rows(q), kf = f32_rows(k), vf = f32_rows(v);
  const PackedKeys<float> kp = pack_keys(kf, s, Hk, D);
  Forward<T> fwd{qf, vf, kp, s, D, Hq, Hq / Hk, float(softmax_scale) * kLog2e, causal,
                 out.mutable_data_ptr<T>(), lse.mutable_data_ptr<float>(), q.size(0), plan_forward(s, Hq, Hq / Hk)};
  run_tasks(int64_t(fwd.tasks.size()), [&] { return fwd.make_state(); }, [&](int64_t t, auto& st) { fwd(t, st); });
}

#if IFAST_ISA_LEVEL >= 2
// run_forward on the bf16 products (use_bf16_products)
void run_forward_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Seqs& s,
                      double softmax_scale, bool causal, at::Tensor& out, at::Tensor& lse) {
  const int Hq = int(q.size(1)), Hk = int(k.size(1)), D = int(q.size(2));
  const Rows16 q16 = bf16_rows(q), k16 = bf16_rows(k), v16 = bf16_rows(v);
  const PackedKeys<uint32_t> kp = pack_pairs_along_d(k16, s, Hk, D), vp = pack_row_pair_blocks(v16, s, Hk, D);
  ForwardBf16 fwd{q16, kp, vp, s, D, Hq, Hq / Hk, float(softmax_scale) * kLog2e, causal,
                  out.mutable_data_ptr<at::BFloat16>(), lse.mutable_data_ptr<float>(), q.size(0),
                  plan_forward(s, Hq, Hq / Hk), attn_bf16_brgemm()};
  run_tasks(int64_t(fwd.tasks.size()), [&] { return fwd.make_state(); }, [&](int64_t t, auto& st) { fwd(t, st); });
}
#endif

void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                const at::Tensor& cu_k) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "flash_attn: q, k, v must be (tokens, heads, D)");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "flash_attn: last dim must be contiguous");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(2) == k.size(2) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "flash_attn: shapes");
  TORCH_CHECK(q.size(2) % 8 == 0, "flash_attn: head_dim must be a multiple of 8");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "flash_attn: dtypes");
  TORCH_CHECK(cu_q.scalar_type() == at::kInt && cu_k.scalar_type() == at::kInt && cu_q.is_contiguous() &&
                  cu_k.is_contiguous() && cu_q.numel() == cu_k.numel() && cu_q.numel() >= 1,
              "flash_attn: cu_seqlens");
}

#define IFAST_DISPATCH_ATTN(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, [&] { \
    if constexpr (std::is_same_v<scalar_t, double>) {                         \
      TORCH_CHECK(false, NAME ": fp64 is not supported by the cpu backend"); \
    } else {                                                                  \
      __VA_ARGS__();                                                          \
    }                                                                         \
  })

}  // namespace

std::vector<at::Tensor> flash_attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                       double softmax_scale, bool causal) {
  check_args(q, k, v, cu_seqlens_q, cu_seqlens_k);
  const int64_t total_q = q.size(0);
  const int Hq = int(q.size(1)), D = int(q.size(2));
  at::Tensor out = empty_output({total_q, Hq, D}, q.scalar_type());
  at::Tensor lse = at::empty({Hq, total_q}, q.options().dtype(at::kFloat));
  const Seqs s = Seqs::varlen(cu_seqlens_q, cu_seqlens_k);
#if IFAST_ISA_LEVEL >= 2
  if (use_bf16_products(q)) {
    run_forward_bf16(q, k, v, s, softmax_scale, causal, out, lse);
    return {out, lse};
  }
#endif
  IFAST_DISPATCH_ATTN(q.scalar_type(), "flash_attn_fwd",
                      [&] { run_forward<scalar_t>(q, k, v, s, softmax_scale, causal, out, lse); });
  return {out, lse};
}

std::vector<at::Tensor> flash_attn_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                       const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                       double softmax_scale, bool causal) {
  check_args(q, k, v, cu_seqlens_q, cu_seqlens_k);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes() && dout.stride(2) == 1,
              "flash_attn_bwd: dout and out must match q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.size(0) == q.size(0 + 1) &&
                  lse.size(1) == q.size(0),
              "flash_attn_bwd: lse must be fp32 (heads, total_q)");
  const int64_t total_q = q.size(0);
  const int Hq = int(q.size(1)), Hk = int(k.size(1)), D = int(q.size(2));
  const Seqs s = Seqs::varlen(cu_seqlens_q, cu_seqlens_k);
  // delta_i = sum_d dO_i * O_i, the softmax-backward correction of row i: (total_q, Hq)
  at::Tensor delta = at::mul(dout.to(at::kFloat), out.to(at::kFloat)).sum(-1).contiguous();
  at::Tensor dq = empty_output(q.sizes(), q.scalar_type());
  at::Tensor dk = empty_output(k.sizes(), k.scalar_type());
  at::Tensor dv = empty_output(v.sizes(), v.scalar_type());
#if IFAST_ISA_LEVEL >= 2
  if (use_bf16_products(q)) {
    const Rows16 q16 = bf16_rows_head_major(q), d16 = bf16_rows_head_major(dout), k16 = bf16_rows(k),
                 v16 = bf16_rows(v);
    const PackedKeys<uint32_t> kp = pack_pairs_along_d(k16, s, Hk, D), vp = pack_pairs_along_d(v16, s, Hk, D),
                               krows = pack_row_pair_blocks(k16, s, Hk, D);
    BackwardBf16 bwd{q16, d16, kp, vp, krows, s, lse.const_data_ptr<float>(), delta.const_data_ptr<float>(),
                     D, Hq, Hk, Hq / Hk, float(softmax_scale), causal, total_q,
                     dq.mutable_data_ptr<at::BFloat16>(), dk.mutable_data_ptr<at::BFloat16>(),
                     dv.mutable_data_ptr<at::BFloat16>(), attn_bf16_brgemm()};
    run_tasks(int64_t(s.batch) * Hk, [&] { return bwd.make_state(); }, [&](int64_t t, auto& st) { bwd(t, st); });
    return {dq, dk, dv};
  }
#endif
  // head-major fp32 copies: the backward walks each head's rows of q, k, v and dout many times
  const Rows qf = f32_rows_head_major(q), kf = f32_rows_head_major(k), vf = f32_rows_head_major(v),
             df = f32_rows_head_major(dout);
  const PackedKeys<float> kp = pack_keys(kf, s, Hk, D), vp = pack_keys(vf, s, Hk, D);
  IFAST_DISPATCH_ATTN(q.scalar_type(), "flash_attn_bwd", [&] {
    Backward<scalar_t> bwd{qf, kf, df, kp, vp, s, lse.const_data_ptr<float>(), delta.const_data_ptr<float>(),
                           D, Hq, Hk, Hq / Hk, float(softmax_scale), causal, total_q,
                           dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(),
                           dv.mutable_data_ptr<scalar_t>()};
    run_tasks(int64_t(s.batch) * Hk, [&] { return bwd.make_state(); }, [&](int64_t t, auto& st) { bwd(t, st); });
  });
  return {dq, dk, dv};
}

std::vector<at::Tensor> flash_attn_kvcache_fwd(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                               const std::optional<at::Tensor>& block_table,
                                               double softmax_scale, bool causal) {
  const bool paged = block_table.has_value();
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  (paged || q.size(0) == k_cache.size(0)) && q.size(3) == k_cache.size(3) && q.size(3) % 8 == 0 &&
                  k_cache.size(2) > 0 && q.size(2) % k_cache.size(2) == 0,
              "flash_attn_with_kvcache: shapes");
  TORCH_CHECK(q.stride(3) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "flash_attn_with_kvcache: last dim must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "flash_attn_with_kvcache: dtypes");
  TORCH_CHECK(cache_lens.scalar_type() == at::kInt && cache_lens.is_contiguous() &&
                  cache_lens.numel() == q.size(0),
              "flash_attn_with_kvcache: cache_seqlens");
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  if (paged) {
    // the pages a sequence reads must exist: a stray id would read outside the pool
    const at::Tensor& table = *block_table;
    TORCH_CHECK(table.scalar_type() == at::kInt && table.dim() == 2 && table.size(0) == B &&
                    (table.stride(1) == 1 || table.size(1) <= 1),
                "flash_attn_with_kvcache: block_table must be int32 (batch, max_blocks) with a contiguous last dim");
    const int64_t page = k_cache.size(1), pages = k_cache.size(0), ld = table.stride(0);
    const int32_t* ids = table.const_data_ptr<int32_t>();
    const int32_t* lens = cache_lens.const_data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(lens[b] >= 0 && lens[b] <= table.size(1) * page,
                  "flash_attn_with_kvcache: cache_seqlens exceeds the block table's capacity");
      for (int64_t i = 0; i < (lens[b] + page - 1) / page; ++i)
        TORCH_CHECK(ids[b * ld + i] >= 0 && ids[b * ld + i] < pages,
                    "flash_attn_with_kvcache: block_table holds a block id outside the cache");
    }
  }
  at::Tensor out = empty_output({B, Sq, Hq, D}, q.scalar_type());
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  // a few query tokens: bound by reading the cache, so read it in place (decode_splitkv); a long
  // chunk of new tokens (prefill into a cache): the blocked kernel, whose packing pays off
  if (Sq <= 16) {
    decode_splitkv(q, k_cache, v_cache, cache_lens, block_table, softmax_scale, causal, out, lse);
    return {out, lse};
  }
  if (paged) {  // the blocked kernel packs the keys anyway: gather each sequence's pages first
    const at::Tensor ids = block_table->clamp(0, k_cache.size(0) - 1).reshape({-1}).to(at::kLong);
    auto gather = [&](const at::Tensor& pool) {
      return pool.index_select(0, ids).view({B, -1, pool.size(2), pool.size(3)});
    };
    return flash_attn_kvcache_fwd(q, gather(k_cache), gather(v_cache), cache_lens, std::nullopt, softmax_scale,
                                  causal);
  }
  const int64_t Sc = k_cache.size(1);
  auto rows_view = [](const at::Tensor& t) {  // (B, S, H, D) -> (B*S, H, D), copying only if it must
    const at::Tensor c = t.stride(0) == t.size(1) * t.stride(1) ? t : t.contiguous();
    return c.as_strided({c.size(0) * c.size(1), c.size(2), c.size(3)}, {c.stride(1), c.stride(2), 1});
  };
  const Seqs s = Seqs::cache(int(B), int(Sq), Sc, cache_lens);
  at::Tensor lse_rows = at::empty({Hq, B * Sq}, q.options().dtype(at::kFloat));
  const at::Tensor qr = rows_view(q), kr = rows_view(k_cache), vr = rows_view(v_cache);
#if IFAST_ISA_LEVEL >= 2
  if (use_bf16_products(q))
    run_forward_bf16(qr, kr, vr, s, softmax_scale, causal, out, lse_rows);
  else
#endif
    IFAST_DISPATCH_ATTN(q.scalar_type(), "flash_attn_with_kvcache",
                        [&] { run_forward<scalar_t>(qr, kr, vr, s, softmax_scale, causal, out, lse_rows); });
  lse.copy_(lse_rows.view({Hq, B, Sq}).transpose(0, 1));
  return {out, lse};
}

}  // namespace ifast::cpu::IFAST_ISA
