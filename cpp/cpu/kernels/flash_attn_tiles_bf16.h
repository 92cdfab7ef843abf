// bf16 building blocks of the CPU flash attention on CPUs with AVX512-BF16 (the avx512_bf16 level):
// vdpbf16ps multiplies two pairs of bf16 per fp32 lane and adds both products to the lane, so a tile
// does 32 multiply-adds per instruction where an fp32 FMA does 16, and reads half the bytes. Both
// products of a pair are exact in fp32 (8-bit significands), so S = Q K^T and dP = dO V^T lose
// nothing against the widened fp32 path; P and dS are rounded to bf16 before they multiply V, dO, Q
// or K, as flash-attn does on the GPU and as a bf16 reference does (probs.to(bf16) @ v). Every sum
// accumulates in fp32.
//
// On CPUs with AMX the same products go to oneDNN's brgemm through ATen instead (flash_attn_bf16.h),
// on the same packed operands.
//
// Operands are "pair words": two bf16 in one 32-bit word, the one of lower index in the low half,
// as vdpbf16ps pairs them. A product C (+)= A B runs over pairs of its reduction index p:
//   A(r, p) is one word at A[r * ars + p * acs] (broadcast to every lane),
//   B[p][0..W) is a row of W words (the pair (B[2p][c], B[2p+1][c]) in word c).
// So S = Q K^T reads Q's rows as they are (consecutive d pair up) against K packed into panels
// [D/2][32] (pack_k_pairs), and O += P V reads P's rows as words against V's rows interleaved two by
// two (pack_row_pairs). A transposed A (dV += P^T dO, dK += dS^T Q) is written interleaved by rows
// (to_pairs_cols) and read with ars = 1.
// Part of the AVX-512 kernel body (isa_compile.h), compiled with the bf16 dot product on top.

#if IFAST_ISA_LEVEL >= 2

#pragma GCC push_options
IFAST_PRAGMA(GCC target(IFAST_AVX512_BF16_FEATURES))

namespace ifast::cpu::IFAST_ISA::attn::bf16 {

// Two 16-word vectors per row of B, 12 rows: 24 accumulators, two B vectors and one broadcast in the
// 32 zmm registers, as the fp32 tiles.
constexpr int kPanel = 32;
constexpr int kTileRows = 12;

inline uint32_t load_word(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

inline __m512bh as_bh(__m512i x) { return reinterpret_cast<__m512bh>(x); }

inline __mmask16 first_lanes(int n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u); }

// C[r][0..16 * NV) (+)= scale * sum_{p < np} A(r, p) . B[p] for R rows; the last of the NV vectors
// keeps its first `tail` lanes only.
template <int R, int NV, bool kAccumulate>
inline void dp_tile(const uint32_t* A, int64_t ars, int64_t acs, const uint32_t* B, int64_t ldb, int np, float* C,
                    int64_t ldc, int tail, float scale) {
  const __mmask16 m0 = NV > 1 ? __mmask16(0xffff) : first_lanes(tail);
  const __mmask16 m1 = first_lanes(tail);
#define IFAST_DECL(r) __m512 c##r##_0 = _mm512_setzero_ps(), c##r##_1 = c##r##_0;
  IFAST_ROWS12(IFAST_DECL)
#undef IFAST_DECL
  if constexpr (kAccumulate) {
#define IFAST_LOAD(r)                                                              \
  if constexpr (R > r) {                                                           \
    c##r##_0 = _mm512_maskz_loadu_ps(m0, C + r * ldc);                              \
    if constexpr (NV > 1) c##r##_1 = _mm512_maskz_loadu_ps(m1, C + r * ldc + 16);   \
  }
    IFAST_ROWS12(IFAST_LOAD)
#undef IFAST_LOAD
  }
  for (int p = 0; p < np; ++p) {
    const __m512bh b0 = as_bh(_mm512_maskz_loadu_epi32(m0, B + p * ldb));
    const __m512bh b1 = NV > 1 ? as_bh(_mm512_maskz_loadu_epi32(m1, B + p * ldb + 16)) : b0;
#define IFAST_ROW(r)                                                           \
  if constexpr (R > r) {                                                       \
    const __m512bh a = as_bh(_mm512_set1_epi32(int(A[r * ars + p * acs])));    \
    c##r##_0 = _mm512_dpbf16_ps(c##r##_0, a, b0);                              \
    if constexpr (NV > 1) c##r##_1 = _mm512_dpbf16_ps(c##r##_1, a, b1);        \
  }
    IFAST_ROWS12(IFAST_ROW)
#undef IFAST_ROW
  }
  const __m512 s = _mm512_set1_ps(scale);
#define IFAST_STORE(r)                                                                             \
  if constexpr (R > r) {                                                                           \
    if constexpr (!kAccumulate) c##r##_0 = _mm512_mul_ps(c##r##_0, s), c##r##_1 = _mm512_mul_ps(c##r##_1, s); \
    _mm512_mask_storeu_ps(C + r * ldc, m0, c##r##_0);                                              \
    if constexpr (NV > 1) _mm512_mask_storeu_ps(C + r * ldc + 16, m1, c##r##_1);                   \
  }
  IFAST_ROWS12(IFAST_STORE)
#undef IFAST_STORE
}

// (GCC 12 takes the unpacks' _mm512_undefined_epi32() operand for an uninitialised variable.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// Packs keys [0, n) of K (bf16 rows ldk apart, D each) as pairs along D, `width` keys to a row:
// out[d / 2][c] = (K[c][d], K[c][d + 1]), zero for c >= n. This is B of S = Q K^T in the pair-word
// layout below, and oneDNN's VNNI layout for the same product (brgemm); the tiles read it 32 keys
// (one panel) at a time. A transpose of words, 16 x 16 blocks at a time (width is a multiple of 16).
inline void pack_k_pairs(const uint16_t* K, int64_t ldk, int n, int D, int width, uint32_t* out) {
  const int words = D / 2;
  __m512i r[16];
  for (int c0 = 0; c0 < width; c0 += 16)
    for (int w0 = 0; w0 < words; w0 += 16) {
      const __mmask16 m = first_lanes(words - w0);
      for (int i = 0; i < 16; ++i)
        r[i] = c0 + i < n ? _mm512_maskz_loadu_epi32(m, K + (c0 + i) * ldk + 2 * w0) : _mm512_setzero_si512();
      transpose16_epi32(r);
      for (int i = 0; i < std::min(16, words - w0); ++i) _mm512_storeu_si512(out + int64_t(w0 + i) * width + c0, r[i]);
    }
}
#pragma GCC diagnostic pop

// Interleaves rows [0, n) of X (bf16 rows ldx apart, D each) two by two:
// out[p][d] = (X[2p][d], X[2p + 1][d]) for p < ceil(n / 2), a missing last row read as zero.
inline void pack_row_pairs(const uint16_t* X, int64_t ldx, int n, int D, uint32_t* out) {
  // word i of the result takes element i of the first row and element i of the second (index 32 + i)
  alignas(64) static constexpr uint16_t lo[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i idx_lo = _mm512_load_si512(lo);
  const __m512i idx_hi = _mm512_add_epi16(idx_lo, _mm512_set1_epi16(16));
  for (int p = 0; p < (n + 1) / 2; ++p) {
    const uint16_t* x0 = X + 2 * p * ldx;
    const bool has1 = 2 * p + 1 < n;
    uint32_t* dst = out + int64_t(p) * D;
    for (int d = 0; d < D; d += 32) {
      const __mmask32 m = D - d >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << (D - d)) - 1u);
      const __m512i a = _mm512_maskz_loadu_epi16(m, x0 + d);
      const __m512i b = has1 ? _mm512_maskz_loadu_epi16(m, x0 + ldx + d) : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(dst + d, first_lanes(D - d), _mm512_permutex2var_epi16(a, idx_lo, b));
      if (D - d > 16) _mm512_mask_storeu_epi32(dst + d + 16, first_lanes(D - d - 16), _mm512_permutex2var_epi16(a, idx_hi, b));
    }
  }
}

// Rounds rows of fp32 S to bf16 pair words: dst[r][w] = (S[r][2w], S[r][2w + 1]) for w < ceil(n / 2),
// columns from n on read as zero.
inline void to_pairs_rows(const float* S, int64_t lds, int rows, int n, uint32_t* dst, int64_t ldd) {
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < n; j += 32) {
      const __m512 a = _mm512_maskz_loadu_ps(first_lanes(n - j), S + r * lds + j);
      const __m512 b = n - j > 16 ? _mm512_maskz_loadu_ps(first_lanes(n - j - 16), S + r * lds + j + 16) : _mm512_setzero_ps();
      _mm512_mask_storeu_epi32(dst + r * ldd + j / 2, first_lanes((n - j + 1) / 2),
                               reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a)));
    }
}

// Rounds S to bf16 interleaved by rows, the layout a transposed A reads with ars = 1:
// dst[p][c] = (S[2p][c], S[2p + 1][c]) for p < ceil(rows / 2), c < n, a missing last row read as zero.
inline void to_pairs_cols(const float* S, int64_t lds, int rows, int n, uint32_t* dst, int64_t ldd) {
  // cvtne2ps_pbh(b, a) holds a's 16 values then b's; word i takes a[i] and b[i]
  alignas(64) static constexpr uint16_t order[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                     8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(order);
  for (int p = 0; p < (rows + 1) / 2; ++p) {
    const float* s0 = S + 2 * p * lds;
    const bool has1 = 2 * p + 1 < rows;
    for (int c = 0; c < n; c += 16) {
      const __mmask16 m = first_lanes(n - c);
      const __m512 a = _mm512_maskz_loadu_ps(m, s0 + c);
      const __m512 b = has1 ? _mm512_maskz_loadu_ps(m, s0 + lds + c) : _mm512_setzero_ps();
      const __m512i ab = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
      _mm512_mask_storeu_epi32(dst + p * ldd + c, m, _mm512_permutexvar_epi16(idx, ab));
    }
  }
}

// S (rows x ncols, ncols rounded up to kPanel) = scale * Q K^T: Q's bf16 rows ldq apart (as words),
// K packed by pack_k_pairs, rows ldk words apart. Causal skip as attn::qk_block's.
inline void qk_block(const uint32_t* Q, int64_t ldq, int rows, const uint32_t* packed, int64_t ldk, int ncols, int D,
                     float* S, int64_t lds, float scale, int causal_off = kNoMask) {
  const int panels = (ncols + kPanel - 1) / kPanel, words = D / 2;
  for (int p = 0; p < panels; ++p) {
    const uint32_t* panel = packed + p * kPanel;
    int r = std::max(0, std::min(rows, p * kPanel - causal_off));
    for (; r + kTileRows <= rows; r += kTileRows)
      dp_tile<kTileRows, 2, false>(Q + r * ldq, ldq, 1, panel, ldk, words, S + r * lds + p * kPanel, lds, 16, scale);
    with_rows_left<kTileRows - 1>(rows - r, [&](auto left) {
      dp_tile<decltype(left)::value, 2, false>(Q + r * ldq, ldq, 1, panel, ldk, words, S + r * lds + p * kPanel, lds,
                                              16, scale);
    });
  }
}

// Transposes rows [0, n) of X (bf16 rows ldx apart, D each): out[d][i] = X[i][d] for i < width, zero
// for i >= n. A of dV^T = dO^T P and dK^T = Q^T dS in oneDNN's layout (plain rows).
inline void transpose_rows(const uint16_t* X, int64_t ldx, int n, int D, int width, uint16_t* out) {
  for (int d = 0; d < D; ++d)
    for (int i = 0; i < width; ++i) out[int64_t(d) * width + i] = i < n ? X[i * ldx + d] : uint16_t(0);
}

// O (rows x D) += A B over a reduction index j < n: A(r, j / 2) words as dp_tile reads them, B the
// pairs of rows of pack_row_pairs (D words each). A(r, j) is zero for j > r + causal_off and for
// j < r + causal_lo, so a tile of rows runs over the pairs its rows can see (attn::pv_block).
template <int R>
inline void pv_tile_rows(const uint32_t* A, int64_t ars, int64_t acs, int r, const uint32_t* B, int n, int D, float* O,
                         int64_t ldo, int causal_off, int causal_lo) {
  const int p0 = std::clamp(r + causal_lo, 0, n) / 2;
  const int p1 = (std::max(0, std::min(n, r + R + causal_off)) + 1) / 2;
  if (p1 <= p0) return;
  const uint32_t* a = A + r * ars + p0 * acs;
  const uint32_t* b = B + int64_t(p0) * D;
  float* o = O + r * ldo;
  int c = 0;
  for (; c + 32 <= D; c += 32) dp_tile<R, 2, true>(a, ars, acs, b + c, D, p1 - p0, o + c, ldo, 16, 1.f);
  if (c + 16 < D) dp_tile<R, 2, true>(a, ars, acs, b + c, D, p1 - p0, o + c, ldo, D - c - 16, 1.f);
  else if (c < D) dp_tile<R, 1, true>(a, ars, acs, b + c, D, p1 - p0, o + c, ldo, D - c, 1.f);
}

inline void pv_block(const uint32_t* A, int64_t ars, int64_t acs, int rows, const uint32_t* B, int n, int D, float* O,
                     int64_t ldo, int causal_off = kNoMask, int causal_lo = -kNoMask) {
  int r = 0;
  for (; r + kTileRows <= rows; r += kTileRows)
    pv_tile_rows<kTileRows>(A, ars, acs, r, B, n, D, O, ldo, causal_off, causal_lo);
  with_rows_left<kTileRows - 1>(rows - r, [&](auto left) {
    pv_tile_rows<decltype(left)::value>(A, ars, acs, r, B, n, D, O, ldo, causal_off, causal_lo);
  });
}

}  // namespace ifast::cpu::IFAST_ISA::attn::bf16

#pragma GCC pop_options

#endif
