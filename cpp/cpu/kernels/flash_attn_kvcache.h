// Attention of a few new query tokens against a KV cache (decoding).
//
// Decoding is bound by reading the cache, and at small batch and context by fixed costs, so:
// - A task is (sequence, group of kv heads, chunk of the cache). A long cache is split by length
//   and each task takes every kv head: its keys are whole token rows one after the other, the
//   sequential read DRAM serves fastest. A short one is split by heads, which needs no merge (its
//   time is fixed costs, not reading). With several chunks, each one's partial softmax is merged at
//   the end; with one, a task normalises and writes its output rows itself: one parallel region.
// - The cache is read in place, never packed or widened, a head at a time down each block of
//   kDecodeBlock keys, whose rows (all the task's heads) stay within a few pages; the rows
//   kPrefetchKeys ahead are asked for into L2 meanwhile. A paged cache (block table) is read the
//   same way: a block of keys is cut into runs that do not cross a page, so the scores and P V of a
//   run read one page with fixed strides.
// - Scores of 8 keys at once: eight D-long dot products accumulate side by side (zmm on AVX-512, ymm
//   on AVX2; bf16 and fp16 caches widened in registers) and one transpose-and-add reduces them,
//   instead of a horizontal sum per key; P V keeps a 64-float (AVX-512) or 32-float (AVX2) slice of
//   the output row in registers while it walks the block's values.
// Reference: internlm_fast/ops/flash_attn_kvcache.py::flash_attn_with_kvcache_ref.
// Compiled once per instruction set (isa_compile.h): no include guard; IFAST_ISA_LEVEL selects the
// vector code of each path.

#include "flash_attn_common.h"

namespace ifast::cpu::IFAST_ISA::attn {
namespace {

// Keys per online-softmax step. Each step rescales the output rows once (D multiplies per row against
// kDecodeBlock * D multiply-adds of P V), and a head-by-head walk of a block reads its key rows as that
// many interleaved streams: 16 keys keep those few enough for the prefetchers and the open DRAM pages.
// (With the length split and L2 prefetches, a batch-1 cache larger than L3 went from 44-70% to 80-90%
// of a streaming read's speed on a Zen 4; 64 keys per step gave back most of that.)
constexpr int kDecodeBlock = 16;

// q . k over D, q fp32.
template <typename T>
inline float dot1(const float* q, const T* k, int D) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int d = 0; d < D; ++d) acc += q[d] * load(k, d);
  return acc;
}

#if IFAST_ISA_LEVEL >= 1
// 8 cache values widened to fp32: bf16 is the high half of an fp32, fp16 goes through F16C
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// transpose-and-add: lane i of the result is the sum of a_i's lanes. After two rounds of hadd, lane i
// of each 128-bit half holds a partial sum of key i (low half) or key i + 4 (a4..a7); adding the
// halves finishes every key.
inline __m256 sum8x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
  const __m256 t0 = _mm256_hadd_ps(a0, a1), t1 = _mm256_hadd_ps(a2, a3);
  const __m256 t2 = _mm256_hadd_ps(a4, a5), t3 = _mm256_hadd_ps(a6, a7);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  const __m256 lo = _mm256_permute2f128_ps(u0, u1, 0x20), hi = _mm256_permute2f128_ps(u0, u1, 0x31);
  return _mm256_add_ps(lo, hi);
}
#endif
#if IFAST_ISA_LEVEL >= 2
// (the zero-masked forms: GCC 12's plain ones read an undefined vector and warn of it)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xffff, _mm512_maskz_cvtepu16_epi32(0xffff, h), 16));
}
// two F16C halves: GCC 12's _mm512_cvtph_ps warns of an uninitialised operand of its own
inline __m512 load16(const c10::Half* p) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(load8(p)), load8(p + 8), 1);
}
inline __m256 halves(__m512 a) {
  return _mm256_add_ps(_mm512_maskz_extractf32x8_ps(0xff, a, 0), _mm512_maskz_extractf32x8_ps(0xff, a, 1));
}
#endif

// Asks for rows [0, n) of x (ld apart, `bytes` each) to be brought into L2. A head's keys are
// heads * D apart in the cache, a stride the hardware prefetchers do not follow across pages, so
// without this each key row waits on DRAM. Into L2, not L1: a prefetch into L1 holds one of the
// core's few L1 miss buffers until its line arrives, which capped a core at ~11 GB/s (fp32 and bf16
// caches were read at the same bytes per second on a Zen 4); L2 keeps many more lines in flight.
template <typename T>
inline void prefetch_rows(const T* x, int64_t ld, int n, int bytes) {
  for (int i = 0; i < n; ++i)
    for (int b = 0; b < bytes; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(x + i * ld) + b, 0, 2);
}
constexpr int kPrefetchKeys = 32;  // keys ahead: 2 blocks

// s[i] = q . k[i * ldk] for i < 8, q fp32: eight D-long dot products side by side, one reduction.
template <typename T>
inline void dot8(const float* q, const T* k, int64_t ldk, int D, float* s) {
#if IFAST_ISA_LEVEL >= 2
  if (D % 16 == 0) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int d = 0; d < D; d += 16) {
      const __m512 qv = _mm512_loadu_ps(q + d);
      a0 = _mm512_fmadd_ps(qv, load16(k + d), a0);
      a1 = _mm512_fmadd_ps(qv, load16(k + ldk + d), a1);
      a2 = _mm512_fmadd_ps(qv, load16(k + 2 * ldk + d), a2);
      a3 = _mm512_fmadd_ps(qv, load16(k + 3 * ldk + d), a3);
      a4 = _mm512_fmadd_ps(qv, load16(k + 4 * ldk + d), a4);
      a5 = _mm512_fmadd_ps(qv, load16(k + 5 * ldk + d), a5);
      a6 = _mm512_fmadd_ps(qv, load16(k + 6 * ldk + d), a6);
      a7 = _mm512_fmadd_ps(qv, load16(k + 7 * ldk + d), a7);
    }
    _mm256_storeu_ps(s, sum8x8(halves(a0), halves(a1), halves(a2), halves(a3), halves(a4), halves(a5), halves(a6),
                               halves(a7)));
    return;
  }
#endif
#if IFAST_ISA_LEVEL >= 1
  if (D % 8 == 0) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      a0 = _mm256_fmadd_ps(qv, load8(k + d), a0);
      a1 = _mm256_fmadd_ps(qv, load8(k + ldk + d), a1);
      a2 = _mm256_fmadd_ps(qv, load8(k + 2 * ldk + d), a2);
      a3 = _mm256_fmadd_ps(qv, load8(k + 3 * ldk + d), a3);
      a4 = _mm256_fmadd_ps(qv, load8(k + 4 * ldk + d), a4);
      a5 = _mm256_fmadd_ps(qv, load8(k + 5 * ldk + d), a5);
      a6 = _mm256_fmadd_ps(qv, load8(k + 6 * ldk + d), a6);
      a7 = _mm256_fmadd_ps(qv, load8(k + 7 * ldk + d), a7);
    }
    _mm256_storeu_ps(s, sum8x8(a0, a1, a2, a3, a4, a5, a6, a7));
    return;
  }
#endif
  for (int i = 0; i < 8; ++i) s[i] = dot1(q, k + i * ldk, D);
}

// o[0..D) += sum_j p[j] * v[j * ldv][0..D) over n values: a slice of the output row stays in
// registers while the values stream past (64 floats on AVX-512, 32 on AVX2).
template <typename T>
inline void add_pv(const float* p, const T* v, int64_t ldv, int n, float* o, int D) {
  int d = 0;
#if IFAST_ISA_LEVEL >= 2
  for (; d + 64 <= D; d += 64) {
    __m512 o0 = _mm512_loadu_ps(o + d), o1 = _mm512_loadu_ps(o + d + 16);
    __m512 o2 = _mm512_loadu_ps(o + d + 32), o3 = _mm512_loadu_ps(o + d + 48);
    for (int j = 0; j < n; ++j) {
      const T* vr = v + j * ldv + d;
      const __m512 pj = _mm512_set1_ps(p[j]);
      o0 = _mm512_fmadd_ps(pj, load16(vr), o0);
      o1 = _mm512_fmadd_ps(pj, load16(vr + 16), o1);
      o2 = _mm512_fmadd_ps(pj, load16(vr + 32), o2);
      o3 = _mm512_fmadd_ps(pj, load16(vr + 48), o3);
    }
    _mm512_storeu_ps(o + d, o0);
    _mm512_storeu_ps(o + d + 16, o1);
    _mm512_storeu_ps(o + d + 32, o2);
    _mm512_storeu_ps(o + d + 48, o3);
  }
#endif
#if IFAST_ISA_LEVEL >= 1
  for (; d + 32 <= D; d += 32) {
    __m256 o0 = _mm256_loadu_ps(o + d), o1 = _mm256_loadu_ps(o + d + 8);
    __m256 o2 = _mm256_loadu_ps(o + d + 16), o3 = _mm256_loadu_ps(o + d + 24);
    for (int j = 0; j < n; ++j) {
      const T* vr = v + j * ldv + d;
      const __m256 pj = _mm256_broadcast_ss(p + j);
      o0 = _mm256_fmadd_ps(pj, load8(vr), o0);
      o1 = _mm256_fmadd_ps(pj, load8(vr + 8), o1);
      o2 = _mm256_fmadd_ps(pj, load8(vr + 16), o2);
      o3 = _mm256_fmadd_ps(pj, load8(vr + 24), o3);
    }
    _mm256_storeu_ps(o + d, o0);
    _mm256_storeu_ps(o + d + 8, o1);
    _mm256_storeu_ps(o + d + 16, o2);
    _mm256_storeu_ps(o + d + 24, o3);
  }
  for (; d + 8 <= D; d += 8) {
    __m256 o0 = _mm256_loadu_ps(o + d);
    for (int j = 0; j < n; ++j) o0 = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j), load8(v + j * ldv + d), o0);
    _mm256_storeu_ps(o + d, o0);
  }
#endif
  for (int j = 0; j < n; ++j) {
    const T* __restrict vr = v + j * ldv;
    const float pj = p[j];
#pragma omp simd
    for (int c = d; c < D; ++c) o[c] += pj * load(vr, c);
  }
}

template <typename T>
struct Decode {
  const T *q, *k, *v;
  int64_t q_b, q_t, q_h, k_b, k_t, k_h, v_b, v_t, v_h;  // strides
  const int32_t* lens;
  const int32_t* table;  // paged: (B, table_ld) page ids; nullptr: sequence b is page b
  int64_t table_ld, page;  // page: tokens per page (unpaged: larger than any cache)
  int Sq, Hq, Hk, D, group;
  int heads_per, hsplit;  // kv heads per task, tasks per sequence and chunk
  int64_t chunk;
  int nchunks;
  float qscale;  // softmax scale in log2 units
  bool causal;
  T* out;       // (B, Sq, Hq, D)
  float* lse;   // (B, Hq, Sq)
  float* part;  // nchunks > 1: per task, its rows x (D + 2): unnormalised output, max, sum (log2 units)

  int max_rows() const { return Sq * heads_per * group; }
  // The kv heads [hk0, hk1) of head group hs, and its query rows: row = t * nq + (h - hq0) for the
  // query heads [hq0, hq0 + nq).
  struct Heads {
    int hk0, hk1, hq0, nq, rows;
  };
  Heads heads(int hs) const {
    const int hk0 = hs * heads_per, hk1 = std::min(Hk, hk0 + heads_per);
    return {hk0, hk1, hk0 * group, (hk1 - hk0) * group, Sq * (hk1 - hk0) * group};
  }

  // out[b, t, h] = o / sum and its lse, from an output row accumulated against max mx (log2 units)
  void write_row(int b, int t, int h, const float* o, float mx, float sum) const {
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    T* dst = out + ((int64_t(b) * Sq + t) * Hq + h) * D;
#pragma omp simd
    for (int d = 0; d < D; ++d) store(dst, d, o[d] * inv);
    lse[(int64_t(b) * Hq + h) * Sq + t] = row_lse(mx, sum);
  }

  // Keys [j0, j0 + n) of sequence b as runs within one page each: run u covers keys
  // j0 + first .. j0 + first + n - 1, stored from row `row` of page `page`.
  struct Run {
    int64_t page, row;
    int first, n;
  };
  int split_runs(int b, int64_t j0, int n, Run* runs) const {
    int count = 0;
    for (int first = 0; first < n;) {
      const int64_t j = j0 + first, row = j % page;
      const int len = int(std::min<int64_t>(n - first, page - row));
      runs[count++] = {table ? int64_t(table[b * table_ld + j / page]) : int64_t(b), row, first, len};
      first += len;
    }
    return count;
  }

  struct State {
    std::vector<float> Q, S, O, m, l;
  };
  State make_state() const {
    const size_t r = size_t(max_rows());
    return {std::vector<float>(r * D), std::vector<float>(r * kDecodeBlock), std::vector<float>(r * D),
            std::vector<float>(r), std::vector<float>(r)};
  }

  void operator()(int64_t task, State& st) const {
    const int c = int(task % nchunks), hs = int(task / nchunks % hsplit), b = int(task / nchunks / hsplit);
    const auto [hk0, hk1, hq0, nq, rows] = heads(hs);
    const int lk = lens[b], diag = lk - Sq;
    const int64_t j_begin = c * chunk, j_end = std::min<int64_t>(lk, j_begin + chunk);
    float *Q = st.Q.data(), *S = st.S.data(), *O = st.O.data(), *m = st.m.data(), *l = st.l.data();
    for (int t = 0; t < Sq; ++t)
      for (int i = 0; i < nq; ++i) {
        const T* __restrict src = q + b * q_b + t * q_t + (hq0 + i) * q_h;
        float* __restrict dst = Q + int64_t(t * nq + i) * D;
#pragma omp simd
        for (int d = 0; d < D; ++d) dst[d] = load(src, d) * qscale;
      }
    std::fill(O, O + int64_t(rows) * D, 0.f);
    std::fill(m, m + rows, kNegInf);
    std::fill(l, l + rows, 0.f);
    Run runs[kDecodeBlock];
    // The prefetches below run kPrefetchKeys ahead of the keys being read, so the first ones are asked
    // for here, keys and values: in a short cache they are much of the task (batch 8 of 81-192 keys
    // after a 64 MB read, alternating in one process: 4-5% shorter on 1 or 2 threads; leading by
    // more keys gained nothing more)
    const int64_t j_lead = std::min<int64_t>(j_end, j_begin + kPrefetchKeys);
    for (int64_t j0 = j_begin; j0 < j_lead; j0 += kDecodeBlock) {
      const int nruns = split_runs(b, j0, int(std::min<int64_t>(kDecodeBlock, j_lead - j0)), runs);
      for (int u = 0; u < nruns; ++u)
        for (int hk = hk0; hk < hk1; ++hk) {
          prefetch_rows(k + runs[u].page * k_b + runs[u].row * k_t + hk * k_h, k_t, runs[u].n, D * int(sizeof(T)));
          prefetch_rows(v + runs[u].page * v_b + runs[u].row * v_t + hk * v_h, v_t, runs[u].n, D * int(sizeof(T)));
        }
    }
    for (int64_t j0 = j_begin; j0 < j_end; j0 += kDecodeBlock) {
      const int n = int(std::min<int64_t>(kDecodeBlock, j_end - j0));
      const int nruns = split_runs(b, j0, n, runs);
      for (int hk = hk0; hk < hk1; ++hk)
        for (int u = 0; u < nruns; ++u) {
          const Run& run = runs[u];
          const T* kh = k + run.page * k_b + run.row * k_t + hk * k_h;
          const T* vh = v + run.page * v_b + run.row * v_t + hk * v_h;
          for (int t = 0; t < Sq; ++t)
            for (int g = 0; g < group; ++g) {
              const int r = t * nq + (hk - hk0) * group + g;
              const float* qr = Q + int64_t(r) * D;
              float* s = S + r * kDecodeBlock + run.first;
              int j = 0;
              for (; j + 8 <= run.n; j += 8) {
                if (t == 0 && g == 0) {
                  prefetch_rows(kh + (j + kPrefetchKeys) * k_t, k_t, 8, D * int(sizeof(T)));
                  // and the values these keys weigh, in flight before P V of the block reads them
                  prefetch_rows(vh + j * v_t, v_t, 8, D * int(sizeof(T)));
                }
                dot8(qr, kh + j * k_t, k_t, D, s + j);
              }
              for (; j < run.n; ++j) s[j] = dot1(qr, kh + j * k_t, D);
            }
        }
      for (int r = 0; r < rows; ++r)
        online_softmax_row(S + r * kDecodeBlock, visible(causal, r / nq, diag, int(j0), n), n, m[r], l[r],
                           O + int64_t(r) * D, D);
      for (int hk = hk0; hk < hk1; ++hk)
        for (int u = 0; u < nruns; ++u) {
          const Run& run = runs[u];
          const T* vh = v + run.page * v_b + run.row * v_t + hk * v_h;
          for (int t = 0; t < Sq; ++t)
            for (int g = 0; g < group; ++g) {
              const int r = t * nq + (hk - hk0) * group + g;
              add_pv(S + r * kDecodeBlock + run.first, vh, v_t, run.n, O + int64_t(r) * D, D);
            }
        }
    }
    if (nchunks == 1) {
      for (int r = 0; r < rows; ++r) write_row(b, r / nq, hq0 + r % nq, O + int64_t(r) * D, m[r], l[r]);
      return;
    }
    const int64_t ld = D + 2;
    float* P = part + task * int64_t(max_rows()) * ld;
    for (int r = 0; r < rows; ++r) {
      std::copy(O + int64_t(r) * D, O + int64_t(r + 1) * D, P + r * ld);
      P[r * ld + D] = m[r];
      P[r * ld + D + 1] = l[r];
    }
  }

  // Combines the chunks of sequence b, kv-head group hs, for its query rows [r0, r1):
  // out = sum_c 2^(m_c - M) O_c / sum_c 2^(m_c - M) l_c.
  void merge(int b, int hs, int r0, int r1) const {
    const int64_t ld = D + 2;
    const Heads hd = heads(hs);
    const float* first = part + (int64_t(b) * hsplit + hs) * nchunks * max_rows() * ld;
    std::vector<float> acc(D);
    for (int r = r0; r < r1; ++r) {
      float M = kNegInf;
      for (int c = 0; c < nchunks; ++c) M = std::max(M, first[(int64_t(c) * max_rows() + r) * ld + D]);
      std::fill(acc.begin(), acc.end(), 0.f);
      float L = 0.f;
      if (M != kNegInf)
        for (int c = 0; c < nchunks; ++c) {
          const float* o = first + (int64_t(c) * max_rows() + r) * ld;
          if (o[D] == kNegInf) continue;
          const float w = exp2_approx(o[D] - M);
          L += w * o[D + 1];
#pragma omp simd
          for (int d = 0; d < D; ++d) acc[d] += w * o[d];
        }
      write_row(b, r / hd.nq, hd.hq0 + r % hd.nq, acc.data(), M, L);
    }
  }
};

}  // namespace

void decode_splitkv(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& lens, const std::optional<at::Tensor>& block_table, double softmax_scale,
                    bool causal, at::Tensor& out, at::Tensor& lse) {
  const int B = int(q.size(0)), Sq = int(q.size(1)), Hq = int(q.size(2)), D = int(q.size(3));
  const int Hk = int(k_cache.size(2)), group = Hq / Hk;
  const int32_t* l = lens.const_data_ptr<int32_t>();
  int max_len = 0;
  for (int b = 0; b < B; ++b) max_len = std::max(max_len, l[b]);
  // about 2 tasks per thread (none on one thread), in chunks of at least kMinChunk keys: by length
  // alone where every sequence's share of the tasks gets that many keys (whole token rows: see the
  // top), else kv heads first, then the length
  constexpr int64_t kMinChunk = 256;
  const int threads = at::get_num_threads();
  const int64_t want = threads > 1 ? 2 * int64_t(threads) : 1, seq_share = (want + B - 1) / B;
  const bool by_length = max_len >= seq_share * kMinChunk;
  int hsplit = by_length ? 1 : int(std::min<int64_t>(Hk, seq_share));
  const int heads_per = (Hk + hsplit - 1) / hsplit;
  hsplit = (Hk + heads_per - 1) / heads_per;
  const int64_t per_seq = std::max<int64_t>(1, (want + int64_t(B) * hsplit - 1) / (int64_t(B) * hsplit));
  const int64_t chunk = std::max<int64_t>(kMinChunk, (max_len + per_seq - 1) / per_seq);
  const int nchunks = int(std::max<int64_t>(1, (max_len + chunk - 1) / chunk));
  const int64_t ntasks = int64_t(B) * hsplit * nchunks;
  const int max_rows = Sq * heads_per * group;
  at::Tensor part;
  if (nchunks > 1) part = at::empty({ntasks * max_rows * (D + 2)}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "flash_attn_with_kvcache", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "flash_attn_with_kvcache: fp64 is not supported by the cpu backend");
    } else {
      Decode<scalar_t> dec{q.const_data_ptr<scalar_t>(),
                           k_cache.const_data_ptr<scalar_t>(),
                           v_cache.const_data_ptr<scalar_t>(),
                           q.stride(0), q.stride(1), q.stride(2),
                           k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                           v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                           l,
                           block_table ? block_table->const_data_ptr<int32_t>() : nullptr,
                           block_table ? block_table->stride(0) : 0,
                           block_table ? k_cache.size(1) : std::numeric_limits<int64_t>::max(),
                           Sq, Hq, Hk, D, group, heads_per, hsplit, chunk, nchunks,
                           float(softmax_scale) * kLog2e, causal,
                           out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>(),
                           nchunks > 1 ? part.mutable_data_ptr<float>() : nullptr};
      run_tasks(ntasks, [&] { return dec.make_state(); }, [&](int64_t t, auto& st) { dec(t, st); });
      if (nchunks == 1) return;
      // merge in pieces of 8 query rows, so a single sequence still uses every thread
      const int pieces = (max_rows + 7) / 8;
      at::parallel_for(0, int64_t(B) * hsplit * pieces, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int piece = int(i % pieces), hs = int(i / pieces % hsplit), b = int(i / pieces / hsplit);
          const int rows = dec.heads(hs).rows, r0 = piece * 8;
          if (r0 < rows) dec.merge(b, hs, r0, std::min(rows, r0 + 8));
        }
      });
    }
  });
}

}  // namespace ifast::cpu::IFAST_ISA::attn
