// Pieces shared by the CPU attention kernels (flash_attn.cpp: blocked forward and backward;
// flash_attn_kvcache.cpp: split-KV decoding): fp32 row views, sequence geometry, task scheduling.
// Part of a kernel body compiled once per instruction set (isa_compile.h): no include guard.

#include "flash_attn_tiles.h"

namespace ifast::cpu::IFAST_ISA::attn {

constexpr int kBlockQ = 128;
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

// One online-softmax step of one query row over a block of scores s[0..n) in log2 units, of which
// the first `valid` are visible: s becomes the unnormalised probabilities (zero past `valid`), the
// running max m and sum l advance, and the row's output accumulator o (D floats) is rescaled to the
// new max. A row that has seen no visible score yet is left at m = -inf, l = 0.
inline void online_softmax_row(float* s, int valid, int n, float& m, float& l, float* o, int D) {
  const float m_new = row_max(s, valid, m);
  if (m_new == kNegInf) {
    std::fill(s, s + n, 0.f);
    return;
  }
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < valid; ++j) {
    const float p = exp2_approx(s[j] - m_new);
    s[j] = p;
    sum += p;
  }
  std::fill(s + valid, s + n, 0.f);
  const float alpha = exp2_approx(m - m_new);  // 0 when m = -inf
  if (alpha != 1.f) {
#pragma omp simd
    for (int d = 0; d < D; ++d) o[d] *= alpha;
  }
  l = l * alpha + sum;
  m = m_new;
}

// Decoding path (flash_attn_kvcache.cpp): q (B, Sq, Hq, D) against caches (B, cache_len, Hk, D), or
// pages (num_blocks, block_size, Hk, D) through block_table (B, max_blocks), holding lens[b] valid
// keys; writes out (B, Sq, Hq, D) and lse (B, Hq, Sq). Arguments checked by the caller.
void decode_splitkv(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& lens, const std::optional<at::Tensor>& block_table, double softmax_scale,
                    bool causal, at::Tensor& out, at::Tensor& lse);

}  // namespace ifast::cpu::IFAST_ISA::attn
