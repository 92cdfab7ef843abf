// Register-tiled fp32 building blocks of the CPU flash attention: S = Q K^T on a packed K panel,
// O += P V, and exp2 over a row. Three paths, one per instruction set: AVX-512 (32 zmm registers,
// 16 floats each: 12-row tiles over 32-column panels), AVX2 + FMA (16 ymm: 6 rows over 16 columns)
// and plain loops; within a path every lane sums in the same order.
// Part of a kernel body compiled once per instruction set (isa_compile.h): no include guard.

#include <type_traits>

namespace ifast::cpu::IFAST_ISA::attn {

#if IFAST_ISA_LEVEL >= 2
// Two 16-float vectors per panel row: a 12-row tile keeps 24 accumulators, two panel vectors and
// one broadcast in the 32 zmm registers, and streams 24 FMAs per 2 panel loads.
constexpr int kPanel = 32;
constexpr int kTileRows = 12;
#else
// Two 8-float vectors: a 6-row tile keeps 12 accumulators, two panel vectors and one broadcast in
// the 16 ymm registers.
constexpr int kPanel = 16;
constexpr int kTileRows = 6;
#endif

// f(std::integral_constant<int, left>) for 1 <= left <= R: the last, partial tile of a block.
template <int R, typename F>
inline void with_rows_left(int left, F&& f) {
  if constexpr (R >= 1) {
    if (left == R)
      f(std::integral_constant<int, R>{});
    else
      with_rows_left<R - 1>(left, f);
  }
}

// Packs rows [0, n) of K (row stride ldk, D floats each) into panels of kPanel columns:
// out[p][d][c] = K[p*kPanel + c][d], zero for c beyond n. Reading K once per block and the
// panel being contiguous in the inner loop is what lets the QK^T tile stream at full FMA rate.
#if IFAST_ISA_LEVEL >= 2
// (GCC 12 takes the unpacks' _mm512_undefined_epi32() operand for an uninitialised variable.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// Transposes a 16 x 16 block of 32-bit words held as 16 rows: r[i] lane j becomes r[j] lane i.
inline void transpose16_epi32(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int p = 0; p < 8; ++p) {  // lanes of rows 2p, 2p + 1 interleaved
    a[2 * p] = _mm512_unpacklo_epi32(r[2 * p], r[2 * p + 1]);
    a[2 * p + 1] = _mm512_unpackhi_epi32(r[2 * p], r[2 * p + 1]);
  }
  for (int q = 0; q < 4; ++q) {  // b[4q + j], 128-bit lane L: column 4L + j of rows 4q..4q+3
    b[4 * q] = _mm512_unpacklo_epi64(a[4 * q], a[4 * q + 2]);
    b[4 * q + 1] = _mm512_unpackhi_epi64(a[4 * q], a[4 * q + 2]);
    b[4 * q + 2] = _mm512_unpacklo_epi64(a[4 * q + 1], a[4 * q + 3]);
    b[4 * q + 3] = _mm512_unpackhi_epi64(a[4 * q + 1], a[4 * q + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // gather lane L of b[j], b[4 + j], b[8 + j], b[12 + j] into row 4L + j
    const __m512i t0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88), u0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xdd);
    const __m512i t1 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88), u1 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xdd);
    r[j] = _mm512_shuffle_i32x4(t0, t1, 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t0, t1, 0xdd);
    r[4 + j] = _mm512_shuffle_i32x4(u0, u1, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(u0, u1, 0xdd);
  }
}
#pragma GCC diagnostic pop
#endif

inline void pack_k(const float* K, int64_t ldk, int n, int D, float* out) {
  const int panels = (n + kPanel - 1) / kPanel;
#if IFAST_ISA_LEVEL >= 2
  if (D % 16 == 0) {  // 16 x 16 transposes
    __m512i r[16];
    for (int p = 0; p < panels; ++p)
      for (int c0 = 0; c0 < kPanel; c0 += 16)
        for (int d0 = 0; d0 < D; d0 += 16) {
          for (int i = 0; i < 16; ++i) {
            const int j = p * kPanel + c0 + i;
            r[i] = j < n ? _mm512_loadu_si512(K + j * ldk + d0) : _mm512_setzero_si512();
          }
          transpose16_epi32(r);
          for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + (int64_t(p) * D + d0 + i) * kPanel + c0, r[i]);
        }
    return;
  }
#endif
  for (int p = 0; p < panels; ++p) {
    float* dst = out + static_cast<int64_t>(p) * D * kPanel;
    for (int c = 0; c < kPanel; ++c) {
      const int j = p * kPanel + c;
      if (j < n) {
        const float* src = K + j * ldk;
        for (int d = 0; d < D; ++d) dst[d * kPanel + c] = src[d];
      } else {
        for (int d = 0; d < D; ++d) dst[d * kPanel + c] = 0.f;
      }
    }
  }
}

// The accumulators are named variables, not arrays: GCC keeps an array of vectors on the stack and
// stores it every iteration, which halves the FMA rate (the store port saturates).
#define IFAST_ROWS6(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define IFAST_ROWS12(X) IFAST_ROWS6(X) X(6) X(7) X(8) X(9) X(10) X(11)

// S[r][0..kPanel) = sum_d Q[r][d] * panel[d][0..kPanel) for R <= kTileRows rows.
template <int R>
inline void qk_tile(const float* Q, int64_t ldq, const float* panel, int D, float* S, int64_t lds) {
#if IFAST_ISA_LEVEL >= 2
#define IFAST_DECL(r) __m512 c##r##_0 = _mm512_setzero_ps(), c##r##_1 = c##r##_0;
  IFAST_ROWS12(IFAST_DECL)
#undef IFAST_DECL
  for (int d = 0; d < D; ++d) {
    const __m512 b0 = _mm512_loadu_ps(panel + d * kPanel);
    const __m512 b1 = _mm512_loadu_ps(panel + d * kPanel + 16);
#define IFAST_ROW(r)                                     \
  if constexpr (R > r) {                                 \
    const __m512 a = _mm512_set1_ps(Q[r * ldq + d]);     \
    c##r##_0 = _mm512_fmadd_ps(a, b0, c##r##_0);         \
    c##r##_1 = _mm512_fmadd_ps(a, b1, c##r##_1);         \
  }
    IFAST_ROWS12(IFAST_ROW)
#undef IFAST_ROW
  }
#define IFAST_STORE(r)                                   \
  if constexpr (R > r) {                                 \
    _mm512_storeu_ps(S + r * lds, c##r##_0);             \
    _mm512_storeu_ps(S + r * lds + 16, c##r##_1);        \
  }
  IFAST_ROWS12(IFAST_STORE)
#undef IFAST_STORE
#elif IFAST_ISA_LEVEL >= 1
#define IFAST_DECL(r) __m256 c##r##_0 = _mm256_setzero_ps(), c##r##_1 = c##r##_0;
  IFAST_ROWS6(IFAST_DECL)
#undef IFAST_DECL
  for (int d = 0; d < D; ++d) {
    const __m256 b0 = _mm256_loadu_ps(panel + d * kPanel);
    const __m256 b1 = _mm256_loadu_ps(panel + d * kPanel + 8);
#define IFAST_ROW(r)                                     \
  if constexpr (R > r) {                                 \
    const __m256 a = _mm256_broadcast_ss(Q + r * ldq + d); \
    c##r##_0 = _mm256_fmadd_ps(a, b0, c##r##_0);         \
    c##r##_1 = _mm256_fmadd_ps(a, b1, c##r##_1);         \
  }
    IFAST_ROWS6(IFAST_ROW)
#undef IFAST_ROW
  }
#define IFAST_STORE(r)                                   \
  if constexpr (R > r) {                                 \
    _mm256_storeu_ps(S + r * lds, c##r##_0);             \
    _mm256_storeu_ps(S + r * lds + 8, c##r##_1);         \
  }
  IFAST_ROWS6(IFAST_STORE)
#undef IFAST_STORE
#else
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kPanel; ++c) {
      float s = 0.f;
      for (int d = 0; d < D; ++d) s += Q[r * ldq + d] * panel[d * kPanel + c];
      S[r * lds + c] = s;
    }
#endif
}

// No causal limit (see qk_block / pv_block).
constexpr int kNoMask = 1 << 29;

// S (rows x ncols, ncols rounded up to kPanel) = Q (rows x D) K^T from the packed panels.
// causal_off: row r needs only columns c <= r + causal_off; a panel is skipped for the rows that
// see none of it (on the causal diagonal that is half the block).
inline void qk_block(const float* Q, int64_t ldq, int rows, const float* packed, int ncols, int D, float* S,
                     int64_t lds, int causal_off = kNoMask) {
  const int panels = (ncols + kPanel - 1) / kPanel;
  for (int p = 0; p < panels; ++p) {
    const float* panel = packed + static_cast<int64_t>(p) * D * kPanel;
    int r = std::max(0, std::min(rows, p * kPanel - causal_off));  // first row that sees column p*kPanel
    for (; r + kTileRows <= rows; r += kTileRows)
      qk_tile<kTileRows>(Q + r * ldq, ldq, panel, D, S + r * lds + p * kPanel, lds);
    with_rows_left<kTileRows - 1>(rows - r, [&](auto left) {
      qk_tile<decltype(left)::value>(Q + r * ldq, ldq, panel, D, S + r * lds + p * kPanel, lds);
    });
  }
}

// O[r][0..W) += sum_j P[r][j] * V[j][0..W) for R rows, W = NV vectors (the last one only its
// first `tail` floats on AVX-512, where D = 8 mod 16 leaves half a vector).
template <int R, int NV>
inline void pv_tile(const float* P, int64_t rs, int64_t cs, const float* V, int64_t ldv, int n, float* O, int64_t ldo,
                    [[maybe_unused]] int tail) {
#if IFAST_ISA_LEVEL >= 2
  const __mmask16 m1 = NV > 1 ? __mmask16((1u << tail) - 1u) : __mmask16(0xffff);
  const __mmask16 m0 = NV > 1 ? __mmask16(0xffff) : __mmask16((1u << tail) - 1u);
#define IFAST_DECL(r) __m512 c##r##_0, c##r##_1;
  IFAST_ROWS12(IFAST_DECL)
#undef IFAST_DECL
#define IFAST_LOAD(r)                                                              \
  if constexpr (R > r) {                                                           \
    c##r##_0 = _mm512_maskz_loadu_ps(m0, O + r * ldo);                              \
    if constexpr (NV > 1) c##r##_1 = _mm512_maskz_loadu_ps(m1, O + r * ldo + 16);   \
  }
  IFAST_ROWS12(IFAST_LOAD)
#undef IFAST_LOAD
  for (int j = 0; j < n; ++j) {
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, V + j * ldv);
    const __m512 b1 = NV > 1 ? _mm512_maskz_loadu_ps(m1, V + j * ldv + 16) : b0;
#define IFAST_ROW(r)                                                     \
  if constexpr (R > r) {                                                 \
    const __m512 a = _mm512_set1_ps(P[r * rs + j * cs]);                 \
    c##r##_0 = _mm512_fmadd_ps(a, b0, c##r##_0);                         \
    if constexpr (NV > 1) c##r##_1 = _mm512_fmadd_ps(a, b1, c##r##_1);   \
  }
    IFAST_ROWS12(IFAST_ROW)
#undef IFAST_ROW
  }
#define IFAST_STORE(r)                                                             \
  if constexpr (R > r) {                                                           \
    _mm512_mask_storeu_ps(O + r * ldo, m0, c##r##_0);                               \
    if constexpr (NV > 1) _mm512_mask_storeu_ps(O + r * ldo + 16, m1, c##r##_1);    \
  }
  IFAST_ROWS12(IFAST_STORE)
#undef IFAST_STORE
#elif IFAST_ISA_LEVEL >= 1
#define IFAST_DECL(r) __m256 c##r##_0, c##r##_1;
  IFAST_ROWS6(IFAST_DECL)
#undef IFAST_DECL
#define IFAST_LOAD(r)                                                 \
  if constexpr (R > r) {                                              \
    c##r##_0 = _mm256_loadu_ps(O + r * ldo);                          \
    if constexpr (NV > 1) c##r##_1 = _mm256_loadu_ps(O + r * ldo + 8); \
  }
  IFAST_ROWS6(IFAST_LOAD)
#undef IFAST_LOAD
  for (int j = 0; j < n; ++j) {
    const __m256 b0 = _mm256_loadu_ps(V + j * ldv);
    const __m256 b1 = NV > 1 ? _mm256_loadu_ps(V + j * ldv + 8) : b0;
#define IFAST_ROW(r)                                                   \
  if constexpr (R > r) {                                               \
    const __m256 a = _mm256_broadcast_ss(P + r * rs + j * cs);         \
    c##r##_0 = _mm256_fmadd_ps(a, b0, c##r##_0);                       \
    if constexpr (NV > 1) c##r##_1 = _mm256_fmadd_ps(a, b1, c##r##_1); \
  }
    IFAST_ROWS6(IFAST_ROW)
#undef IFAST_ROW
  }
#define IFAST_STORE(r)                                                 \
  if constexpr (R > r) {                                               \
    _mm256_storeu_ps(O + r * ldo, c##r##_0);                           \
    if constexpr (NV > 1) _mm256_storeu_ps(O + r * ldo + 8, c##r##_1); \
  }
  IFAST_ROWS6(IFAST_STORE)
#undef IFAST_STORE
#else
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 8 * NV; ++c) {
      float s = O[r * ldo + c];
      for (int j = 0; j < n; ++j) s += P[r * rs + j * cs] * V[j * ldv + c];
      O[r * ldo + c] = s;
    }
#endif
}

template <int R>
inline void pv_rows(const float* P, int64_t rs, int64_t cs, const float* V, int64_t ldv, int n, int D, float* O,
                    int64_t ldo) {
  // D is a multiple of 8
#if IFAST_ISA_LEVEL >= 2
  int c = 0;
  for (; c + 32 <= D; c += 32) pv_tile<R, 2>(P, rs, cs, V + c, ldv, n, O + c, ldo, 16);
  if (c + 16 < D) pv_tile<R, 2>(P, rs, cs, V + c, ldv, n, O + c, ldo, D - c - 16);
  else if (c < D) pv_tile<R, 1>(P, rs, cs, V + c, ldv, n, O + c, ldo, D - c);
#else
  int c = 0;
  for (; c + 16 <= D; c += 16) pv_tile<R, 2>(P, rs, cs, V + c, ldv, n, O + c, ldo, 8);
  if (c < D) pv_tile<R, 1>(P, rs, cs, V + c, ldv, n, O + c, ldo, 8);
#endif
}

// O (rows x D) += P (rows x n) V (n x D). P's element (r, j) is at P[r * rs + j * cs], so a
// transposed P (rs = 1, cs = ld) costs nothing extra: it is only ever broadcast. V rows are ldv
// apart and read in place (no packing). Causal limits let a row tile skip P's zeros: P[r][j] is zero
// for j > r + causal_off (forward, dQ) and for j < r + causal_lo (the transposed products of the
// backward, dK and dV), so a tile of rows runs from its first row's first to its last row's last
// nonzero column.
template <int R>
inline void pv_tile_rows(const float* P, int64_t rs, int64_t cs, int r, const float* V, int64_t ldv, int n, int D,
                         float* O, int64_t ldo, int causal_off, int causal_lo) {
  const int j0 = std::clamp(r + causal_lo, 0, n);
  const int j1 = std::max(0, std::min(n, r + R + causal_off));  // last row r + R - 1 sees j <= r + R - 1 + off
  if (j1 > j0) pv_rows<R>(P + r * rs + j0 * cs, rs, cs, V + j0 * ldv, ldv, j1 - j0, D, O + r * ldo, ldo);
}

inline void pv_block(const float* P, int64_t rs, int64_t cs, int rows, const float* V, int64_t ldv, int n, int D,
                     float* O, int64_t ldo, int causal_off = kNoMask, int causal_lo = -kNoMask) {
  int r = 0;
  for (; r + kTileRows <= rows; r += kTileRows)
    pv_tile_rows<kTileRows>(P, rs, cs, r, V, ldv, n, D, O, ldo, causal_off, causal_lo);
  with_rows_left<kTileRows - 1>(rows - r, [&](auto left) {
    pv_tile_rows<decltype(left)::value>(P, rs, cs, r, V, ldv, n, D, O, ldo, causal_off, causal_lo);
  });
}

// max(init, x[0..n)), NaN entries ignored (a NaN score still poisons the row through exp2).
// Explicit vectors: GCC leaves a float max reduction scalar, a 4-cycle dependency per element.
inline float row_max(const float* x, int n, float init) {
  int i = 0;
  float m = init;
#if IFAST_ISA_LEVEL >= 1
  if (n >= 8) {
    __m256 a0 = _mm256_set1_ps(init), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 32 <= n; i += 32) {
      a0 = _mm256_max_ps(_mm256_loadu_ps(x + i), a0);
      a1 = _mm256_max_ps(_mm256_loadu_ps(x + i + 8), a1);
      a2 = _mm256_max_ps(_mm256_loadu_ps(x + i + 16), a2);
      a3 = _mm256_max_ps(_mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8) a1 = _mm256_max_ps(_mm256_loadu_ps(x + i), a1);
    if (i < n) {  // the last n - i elements: the vector ending at x[n - 1], seen twice where it overlaps
      a2 = _mm256_max_ps(_mm256_loadu_ps(x + n - 8), a2);
      i = n;
    }
    a0 = _mm256_max_ps(_mm256_max_ps(a0, a1), _mm256_max_ps(a2, a3));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    m = _mm_cvtss_f32(h);
  }
#endif
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// The degree-6 polynomial of 2^f on |f| <= 1/2, highest power first, down to the constant 1: every
// fp32 exp2 of the attention kernels (scalar, ymm and zmm) evaluates this one.
constexpr float kExp2Poly6[] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                                5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f,
                                1.f};

// 2^x, branch-free and vectorisable: x = n + f, |f| <= 1/2, 2^f by a degree-6 polynomial.
// Inputs below -126 give ~0 (exactly what a masked score needs), NaN stays NaN.
inline float exp2_approx(float x) {
  x = x < -126.f ? -126.f : x;
  x = x > 127.f ? 127.f : x;
  const float n = __builtin_nearbyintf(x);
  const float f = x - n;
  float p = kExp2Poly6[0];
#pragma GCC unroll 6
  for (int i = 1; i <= 6; ++i) p = p * f + kExp2Poly6[i];
  const int32_t e = static_cast<int32_t>(n) + 127;
  uint32_t bits = static_cast<uint32_t>(e) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

#if IFAST_ISA_LEVEL == 1
// exp2_approx on 8 lanes of x <= 0 (no upper clamp), the same arithmetic, for K vectors at once: the
// K polynomial chains are written step by step side by side. One chain is ~40 cycles of dependent
// ymm ops; Zen 1's FP scheduler holds little more than one, so evaluated a vector at a time the
// exp2 of a softmax row ran at a third of its throughput (37% of the matmul time of a d = 32 forward
// where its op count says 12%).
template <int K>
inline void exp2_nonpositive_ymm(__m256 (&x)[K]) {
  const float* c = kExp2Poly6;
  __m256 f[K], p[K];
  __m256i e[K];
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k) {
    // max returns its second operand when either is NaN: a NaN stays NaN
    const __m256 xc = _mm256_max_ps(_mm256_set1_ps(-126.f), x[k]);
    const __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    f[k] = _mm256_sub_ps(xc, n);
    e[k] = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    p[k] = _mm256_set1_ps(c[0]);
  }
#pragma GCC unroll 6
  for (int i = 1; i <= 6; ++i) {
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) p[k] = _mm256_fmadd_ps(p[k], f[k], _mm256_set1_ps(c[i]));
  }
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k) x[k] = _mm256_mul_ps(p[k], _mm256_castsi256_ps(e[k]));
}

// All-ones in the first n (0..8) lanes.
inline __m256i first_lanes_ymm(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

}  // namespace ifast::cpu::IFAST_ISA::attn
