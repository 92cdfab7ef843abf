// Flash attention on bf16 inputs with the bf16 dot product (the avx512_bf16 level): the forward and
// backward of flash_attn.h with every product on bf16 operands instead of widened fp32 copies. The
// softmax, its running max and sum, and every accumulator stay fp32; P and dS are rounded to bf16
// before they multiply, as flash-attn does on the GPU. The products run on our AVX512-BF16 tiles
// (flash_attn_tiles_bf16.h), or, on CPUs with AMX, on oneDNN's brgemm through ATen
// (attn_bf16_brgemm(), onednn_gemm.h), which reads the same packed keys and values; it multiplies
// whole blocks (no causal skip inside the diagonal block) and computes dK and dV transposed.
// Part of the AVX-512 kernel body of flash_attn.h, included inside its anonymous namespace (the tiles
// are included at namespace scope, before it).

#if IFAST_ISA_LEVEL >= 2

#pragma GCC push_options
IFAST_PRAGMA(GCC target(IFAST_AVX512_BF16_FEATURES))

// bf16 rows of a (tokens, heads, D) tensor, in place
struct Rows16 {
  at::Tensor t;
  const uint16_t* p;
  int64_t ld_t, ld_h;
  const uint16_t* at(int64_t token, int64_t head) const { return p + token * ld_t + head * ld_h; }
  // as pair words: D and every stride are even, and a bf16 tensor's data is at least 2-byte aligned
  const uint32_t* words(int64_t token, int64_t head) const { return reinterpret_cast<const uint32_t*>(at(token, head)); }
};

inline Rows16 bf16_rows(const at::Tensor& x) {
  return {x, reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>()), x.stride(0), x.stride(1)};
}

// head-major copy (see f32_rows_head_major)
inline Rows16 bf16_rows_head_major(const at::Tensor& x) {
  const at::Tensor t = x.transpose(0, 1).contiguous();
  return {t, reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>()), t.size(2), t.size(1) * t.size(2)};
}

// The bf16 path runs where the CPU has the bf16 dot product and the cap allows it.
inline bool use_bf16_products(const at::Tensor& q) {
  return q.scalar_type() == at::kBFloat16 && cpu_isa() >= Isa::avx512_bf16;
}

// K (or V) in pairs along D, kBlockK keys to a row (S = Q K^T, dP = dO V^T), and V or K interleaved
// two rows by two (O += P V, dQ += dS K): kBlockK * D / 2 words per key block either way.
PackedKeys<uint32_t> pack_pairs_along_d(const Rows16& k, const Seqs& s, int Hk, int D) {
  return pack_blocks<uint32_t>(k, s, Hk, int64_t(kBlockK) * D / 2, [D](const uint16_t* x, int64_t ld, int n,
                                                                       uint32_t* out) {
    bf16::pack_k_pairs(x, ld, n, D, kBlockK, out);
  });
}

PackedKeys<uint32_t> pack_row_pair_blocks(const Rows16& v, const Seqs& s, int Hk, int D) {
  return pack_blocks<uint32_t>(v, s, Hk, int64_t(kBlockK) * D / 2, [D](const uint16_t* x, int64_t ld, int n,
                                                                       uint32_t* out) {
    bf16::pack_row_pairs(x, ld, n, D, out);
  });
}

// C (M x N, ldc) (+)= A B through oneDNN's brgemm: A bf16 rows (lda elements apart), B in pair words
// (K / 2 rows of N, ldb words apart), K even.
inline void bf16_brgemm(int M, int N, int K, const void* A, int64_t lda, const uint32_t* B, int64_t ldb, float* C,
                   int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, static_cast<const at::BFloat16*>(A),
                              reinterpret_cast<const at::BFloat16*>(B), C, true);
}

inline int even(int n) { return (n + 1) / 2 * 2; }

#pragma GCC diagnostic push  // GCC 12's unmasked AVX-512 intrinsics (flash_attn_common.h says why)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// online_softmax_row for the bf16 products, in one pass over a row of scores held in registers: the
// scores in log2 units are s[j] * c, and the probabilities go out rounded to bf16 into p[0, even(n))
// (zero past `valid`), the A operand of O += P V, instead of back into s. n <= kBlockK.
inline void softmax_row_bf16(const float* s, int valid, int n, float c, float& m, float& l, float* o, int D,
                             uint16_t* p) {
  constexpr int kVecs = kBlockK / 16;
  static_assert(kBlockK % 32 == 0);
  __m512 x[kVecs];
  __m512 mx = _mm512_set1_ps(m);
#pragma GCC unroll 8
  for (int i = 0; i < kVecs; ++i) {
    const __mmask16 k = lanes(valid - 16 * i);
    x[i] = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + 16 * i), _mm512_set1_ps(c));
    mx = _mm512_mask_max_ps(mx, k, x[i], mx);  // a NaN score is skipped, as row_max does
  }
  const float m_new = hmax(mx);
  const int words = (n + 1) / 2;
  if (m_new == kNegInf) {
    for (int w = 0; w < words; w += 16)
      _mm512_mask_storeu_epi32(p + 2 * w, lanes(words - w), _mm512_setzero_si512());
    return;
  }
  const __m512 neg_m = _mm512_set1_ps(-m_new);
  __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int i = 0; i < kVecs; i += 2) {
    if (16 * i >= n) break;
    const __m512 a = _mm512_maskz_mov_ps(lanes(valid - 16 * i), exp2_nonpositive<4>(_mm512_add_ps(x[i], neg_m)));
    const __m512 b = _mm512_maskz_mov_ps(lanes(valid - 16 * i - 16), exp2_nonpositive<4>(_mm512_add_ps(x[i + 1], neg_m)));
    sum = _mm512_add_ps(sum, _mm512_add_ps(a, b));
    _mm512_mask_storeu_epi32(p + 16 * i, lanes(words - 8 * i), reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a)));
  }
  advance_row(m, l, m_new, hsum(sum), o, D);
}
#pragma GCC diagnostic pop

// finish_forward_rows for bf16 outputs, rounded 16 at a time (vcvtneps2bf16: to nearest even, as
// the scalar store, but a denormal result flushes to zero)
inline void finish_forward_rows_bf16(const float* Ob, const float* m, const float* l, int rows, int D, int64_t row0,
                                     int h, int Hq, int64_t total_q, at::BFloat16* out, float* lse) {
  for (int r = 0; r < rows; ++r) {
    const int64_t row = row0 + r;
    auto* o = reinterpret_cast<uint16_t*>(out + (row * Hq + h) * D);
    const __m512 inv = _mm512_set1_ps(l[r] > 0.f ? 1.f / l[r] : 0.f);
    for (int d = 0; d < D; d += 16) {
      const __mmask16 k = lanes(D - d);
      const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, Ob + r * D + d), inv);
      _mm256_mask_storeu_epi16(o + d, k, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
    }
    lse[h * total_q + row] = row_lse(m[r], l[r]);
  }
}

struct ForwardBf16 {
  const Rows16& q;
  const PackedKeys<uint32_t>&kp, &vp;  // K pairs along D, V row pairs
  const Seqs& s;
  int D, Hq, group;
  float qscale;
  bool causal;
  at::BFloat16* out;
  float* lse;
  int64_t total_q;
  std::vector<ForwardTask> tasks;
  bool brgemm;

  struct State {
    std::vector<uint16_t> Qb;
    std::vector<uint32_t> Pw;
    std::vector<float> Ob, S, m, l;
  };
  State make_state() const {
    return {std::vector<uint16_t>(kForwardRows * D), std::vector<uint32_t>(kForwardRows * kBlockK / 2),
            std::vector<float>(kForwardRows * D), std::vector<float>(kForwardRows * kBlockK),
            std::vector<float>(kForwardRows), std::vector<float>(kForwardRows)};
  }

  void operator()(int64_t t, State& st) const {
    const auto [b, h, q0] = tasks[t];
    const int hk = h / group, lq = s.lq(b), lk = s.lk(b), diag = lk - lq;
    const int rows = std::min(kForwardRows, lq - q0);
    const int kv_end = causal ? std::clamp(q0 + rows + diag, 0, lk) : lk;
    float *Ob = st.Ob.data(), *S = st.S.data(), *m = st.m.data(), *l = st.l.data();
    uint32_t* Pw = st.Pw.data();
    // the query rows, contiguous (heads * D apart in the input, a stride that thrashes L1)
    uint16_t* Qb = st.Qb.data();
    for (int r = 0; r < rows; ++r) std::memcpy(Qb + r * D, q.at(s.q0[b] + q0 + r, h), sizeof(uint16_t) * D);
    const uint32_t* Qw = reinterpret_cast<const uint32_t*>(Qb);
    std::fill(Ob, Ob + rows * D, 0.f);
    std::fill(m, m + rows, kNegInf);
    std::fill(l, l + rows, 0.f);
    const int64_t blk0 = s.kblock0[b];
    for (int j0 = 0; j0 < kv_end; j0 += kBlockK) {
      const int n = std::min(kBlockK, kv_end - j0);
      const int off = causal ? q0 + diag - j0 : kNoMask;
      const int64_t blk = blk0 + j0 / kBlockK;
      if (brgemm)
        bf16_brgemm(rows, n, D, Qb, D, kp.block(hk, blk), kBlockK, S, kBlockK, false);
      else
        bf16::qk_block(Qw, D / 2, rows, kp.block(hk, blk), kBlockK, n, D, S, kBlockK, 1.f, off);
      for (int r = 0; r < rows; ++r)
        softmax_row_bf16(S + r * kBlockK, visible(causal, q0 + r, diag, j0, n), n, qscale, m[r], l[r], Ob + r * D, D,
                         reinterpret_cast<uint16_t*>(Pw) + r * kBlockK);
      if (brgemm)
        bf16_brgemm(rows, D, even(n), Pw, kBlockK, vp.block(hk, blk), D, Ob, D, true);
      else
        bf16::pv_block(Pw, kBlockK / 2, 1, rows, vp.block(hk, blk), n, D, Ob, D, off);
    }
    if (brgemm) at::native::cpublas::brgemm_release(true);
    finish_forward_rows_bf16(Ob, m, l, rows, D, s.q0[b] + q0, h, Hq, total_q, out, lse);
  }
};

struct BackwardBf16 {
  const Rows16 &q, &dout;                      // head-major
  const PackedKeys<uint32_t>&kp, &vp, &krows;  // K and V pairs along D, K row pairs
  const Seqs& s;
  const float* lse;
  const float* delta;
  int D, Hq, Hk, group;
  float scale;
  bool causal;
  int64_t total_q;
  at::BFloat16 *dq, *dk, *dv;
  bool brgemm;

  struct State {
    std::vector<float> P, dS, dK, dV, dQ, dKt, dVt;
    std::vector<uint32_t> PT, dST, dSw;
    std::vector<uint16_t> Qx, dOx;  // Q and dO per query block: row pairs (tiles) or transposed (brgemm)
  };
  State make_state() const {
    const size_t tile = kBlockQ * kBlockK, tile_words = tile / 2, kd = size_t(kBlockK) * D;
    return {std::vector<float>(tile),       std::vector<float>(tile),
            std::vector<float>(kd),         std::vector<float>(kd),
            {},                             std::vector<float>(brgemm ? kd : 0),
            std::vector<float>(brgemm ? kd : 0), std::vector<uint32_t>(tile_words),
            std::vector<uint32_t>(tile_words), std::vector<uint32_t>(tile_words),
            {},                             {}};
  }

  void operator()(int64_t t, State& st) const {
    const int b = int(t / Hk), hk = int(t % Hk);
    const int lq = s.lq(b), lk = s.lk(b), diag = lk - lq;
    const float c = scale * kLog2e;
    float *P = st.P.data(), *dS = st.dS.data(), *dK = st.dK.data(), *dV = st.dV.data();
    float *dKt = st.dKt.data(), *dVt = st.dVt.data();
    uint32_t *PT = st.PT.data(), *dST = st.dST.data(), *dSw = st.dSw.data();
    st.dQ.assign(size_t(lq) * group * D, 0.f);
    float* dQ = st.dQ.data();
    // Q and dO of the group's heads per query block, once per task, for dK and dV of every key block:
    // interleaved two rows by two (B of dK += dS^T Q, dV += P^T dO on the tiles), or transposed (A of
    // dK^T = Q^T dS, dV^T = dO^T P on brgemm); kBlockQ * D bf16 per block either way
    const int nqb = (lq + kBlockQ - 1) / kBlockQ;
    const int64_t qblock = int64_t(kBlockQ) * D;
    st.Qx.resize(size_t(group) * nqb * qblock);
    st.dOx.resize(st.Qx.size());
    for (int hh = 0; hh < group; ++hh)
      for (int i = 0; i < nqb; ++i) {
        const int64_t row0 = s.q0[b] + int64_t(i) * kBlockQ, at = (int64_t(hh) * nqb + i) * qblock;
        const int rows = std::min(kBlockQ, lq - i * kBlockQ), h = hk * group + hh;
        uint16_t *qx = st.Qx.data() + at, *dox = st.dOx.data() + at;
        if (brgemm) {
          bf16::transpose_rows(q.at(row0, h), q.ld_t, rows, D, kBlockQ, qx);
          bf16::transpose_rows(dout.at(row0, h), dout.ld_t, rows, D, kBlockQ, dox);
        } else {
          bf16::pack_row_pairs(q.at(row0, h), q.ld_t, rows, D, reinterpret_cast<uint32_t*>(qx));
          bf16::pack_row_pairs(dout.at(row0, h), dout.ld_t, rows, D, reinterpret_cast<uint32_t*>(dox));
        }
      }
    const int64_t blk0 = s.kblock0[b];
    for (int j0 = 0; j0 < lk; j0 += kBlockK) {
      const int n = std::min(kBlockK, lk - j0);
      const int64_t blk = blk0 + j0 / kBlockK;
      float *dKacc = brgemm ? dKt : dK, *dVacc = brgemm ? dVt : dV;  // (D, kBlockK) or (n, D)
      std::fill(dKacc, dKacc + (brgemm ? int64_t(D) * kBlockK : int64_t(n) * D), 0.f);
      std::fill(dVacc, dVacc + (brgemm ? int64_t(D) * kBlockK : int64_t(n) * D), 0.f);
      const int i_lo = causal ? std::clamp(j0 - diag, 0, lq) : 0;
      for (int hh = 0; hh < group; ++hh) {
        const int h = hk * group + hh;
        for (int i0 = i_lo / kBlockQ * kBlockQ; i0 < lq; i0 += kBlockQ) {
          const int rows = std::min(kBlockQ, lq - i0);
          const int64_t row0 = s.q0[b] + i0;
          const int64_t at = (int64_t(hh) * nqb + i0 / kBlockQ) * qblock;
          const int off = causal ? i0 + diag - j0 : kNoMask;
          float* dQi = dQ + (int64_t(i0) * group + hh) * D;
          if (brgemm) {
            bf16_brgemm(rows, n, D, q.at(row0, h), q.ld_t, kp.block(hk, blk), kBlockK, P, kBlockK, false);
            bf16_brgemm(rows, n, D, dout.at(row0, h), dout.ld_t, vp.block(hk, blk), kBlockK, dS, kBlockK, false);
          } else {
            bf16::qk_block(q.words(row0, h), q.ld_t / 2, rows, kp.block(hk, blk), kBlockK, n, D, P, kBlockK, 1.f, off);
            bf16::qk_block(dout.words(row0, h), dout.ld_t / 2, rows, vp.block(hk, blk), kBlockK, n, D, dS, kBlockK,
                           1.f, off);
          }
          softmax_grad_rows(P, dS, rows, n, causal, i0, diag, j0, c, lse, delta, row0, h, Hq, total_q);
          bf16::to_pairs_cols(P, kBlockK, rows, n, PT, kBlockK);
          bf16::to_pairs_cols(dS, kBlockK, rows, n, dST, kBlockK);
          bf16::to_pairs_rows(dS, kBlockK, rows, n, dSw, kBlockK / 2);
          if (brgemm) {
            bf16_brgemm(D, n, even(rows), st.dOx.data() + at, kBlockQ, PT, kBlockK, dVt, kBlockK, true);  // dV^T += dO^T P
            bf16_brgemm(D, n, even(rows), st.Qx.data() + at, kBlockQ, dST, kBlockK, dKt, kBlockK, true);  // dK^T += Q^T dS
            bf16_brgemm(rows, D, even(n), dSw, kBlockK, krows.block(hk, blk), D, dQi, int64_t(group) * D, true);
          } else {
            const uint32_t* dop = reinterpret_cast<const uint32_t*>(st.dOx.data() + at);
            const uint32_t* qp = reinterpret_cast<const uint32_t*>(st.Qx.data() + at);
            bf16::pv_block(PT, 1, kBlockK, n, dop, rows, D, dV, D, kNoMask, -off);  // dV += P^T dO
            bf16::pv_block(dST, 1, kBlockK, n, qp, rows, D, dK, D, kNoMask, -off);  // dK += dS^T Q
            bf16::pv_block(dSw, kBlockK / 2, 1, rows, krows.block(hk, blk), n, D, dQi, int64_t(group) * D,
                           off);  // dQ += dS K
          }
        }
      }
      if (brgemm)
        for (int r = 0; r < n; ++r)
          for (int d = 0; d < D; ++d) {
            dK[r * D + d] = dKt[d * kBlockK + r];
            dV[r * D + d] = dVt[d * kBlockK + r];
          }
      store_dk_dv(dK, dV, n, D, s.k0[b] + j0, hk, Hk, scale, dk, dv);
    }
    if (brgemm) at::native::cpublas::brgemm_release(true);
    store_dq(dQ, lq, group, D, s.q0[b], hk, Hq, scale, dq);
  }
};

#pragma GCC pop_options

#endif
