// Register-tiled fp32 building blocks of the CPU flash attention: S = Q K^T on a packed K panel,
// O += P V, and exp2 over a row. AVX2/FMA where the compiler targets it (-march=native on the
// build machine), a plain loop elsewhere; both compute the same sums in the same order per lane.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define IFAST_ATTN_AVX2 1
#endif

namespace ifast::cpu::attn {

// Key columns per packed panel: two 8-float vectors, so a 6-row tile keeps 12 accumulators, two
// panel vectors and one broadcast in the 16 ymm registers.
constexpr int kPanel = 16;
constexpr int kTileRows = 6;

// Packs rows [0, n) of K (row stride ldk, D floats each) into panels of kPanel columns:
// out[p][d][c] = K[p*kPanel + c][d], zero for c beyond n. Reading K once per block and the
// panel being contiguous in the inner loop is what lets the QK^T tile stream at full FMA rate.
inline void pack_k(const float* K, int64_t ldk, int n, int D, float* out) {
  const int panels = (n + kPanel - 1) / kPanel;
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

// S[r][0..16) = sum_d Q[r][d] * panel[d][0..16) for R rows. The accumulators are named variables,
// not an array: GCC keeps an array of __m256 on the stack and stores it every iteration, which
// halves the FMA rate (the store port saturates).
template <int R>
inline void qk_tile(const float* Q, int64_t ldq, const float* panel, int D, float* S, int64_t lds) {
#ifdef IFAST_ATTN_AVX2
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int d = 0; d < D; ++d) {
    const __m256 b0 = _mm256_loadu_ps(panel + d * kPanel);
    const __m256 b1 = _mm256_loadu_ps(panel + d * kPanel + 8);
#define IFAST_QK_ROW(r)                                          \
  if constexpr (R > r) {                                         \
    const __m256 a = _mm256_broadcast_ss(Q + r * ldq + d);       \
    c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0);                   \
    c##r##1 = _mm256_fmadd_ps(a, b1, c##r##1);                   \
  }
    IFAST_QK_ROW(0) IFAST_QK_ROW(1) IFAST_QK_ROW(2) IFAST_QK_ROW(3) IFAST_QK_ROW(4) IFAST_QK_ROW(5)
#undef IFAST_QK_ROW
  }
#define IFAST_QK_STORE(r)                                        \
  if constexpr (R > r) {                                         \
    _mm256_storeu_ps(S + r * lds, c##r##0);                      \
    _mm256_storeu_ps(S + r * lds + 8, c##r##1);                  \
  }
  IFAST_QK_STORE(0) IFAST_QK_STORE(1) IFAST_QK_STORE(2) IFAST_QK_STORE(3) IFAST_QK_STORE(4) IFAST_QK_STORE(5)
#undef IFAST_QK_STORE
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
    const float* q = Q + r * ldq;
    float* s = S + r * lds + p * kPanel;
    switch (rows - r) {
      case 5: qk_tile<5>(q, ldq, panel, D, s, lds); break;
      case 4: qk_tile<4>(q, ldq, panel, D, s, lds); break;
      case 3: qk_tile<3>(q, ldq, panel, D, s, lds); break;
      case 2: qk_tile<2>(q, ldq, panel, D, s, lds); break;
      case 1: qk_tile<1>(q, ldq, panel, D, s, lds); break;
      default: break;
    }
  }
}

// O[r][c0..c0+8*NV) += sum_j P[r][j] * V[j][c0..], R rows, NV (1 or 2) 8-float vectors. Named
// accumulators for the same reason as qk_tile.
template <int R, int NV>
inline void pv_tile(const float* P, int64_t rs, int64_t cs, const float* V, int64_t ldv, int n, float* O, int64_t ldo) {
#ifdef IFAST_ATTN_AVX2
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
#define IFAST_PV_LOAD(r)                                              \
  if constexpr (R > r) {                                              \
    c##r##0 = _mm256_loadu_ps(O + r * ldo);                           \
    if constexpr (NV > 1) c##r##1 = _mm256_loadu_ps(O + r * ldo + 8); \
  }
  IFAST_PV_LOAD(0) IFAST_PV_LOAD(1) IFAST_PV_LOAD(2) IFAST_PV_LOAD(3) IFAST_PV_LOAD(4) IFAST_PV_LOAD(5)
#undef IFAST_PV_LOAD
  for (int j = 0; j < n; ++j) {
    const __m256 b0 = _mm256_loadu_ps(V + j * ldv);
    const __m256 b1 = NV > 1 ? _mm256_loadu_ps(V + j * ldv + 8) : b0;
#define IFAST_PV_ROW(r)                                                   \
  if constexpr (R > r) {                                                  \
    const __m256 a = _mm256_broadcast_ss(P + r * rs + j * cs);            \
    c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0);                            \
    if constexpr (NV > 1) c##r##1 = _mm256_fmadd_ps(a, b1, c##r##1);      \
  }
    IFAST_PV_ROW(0) IFAST_PV_ROW(1) IFAST_PV_ROW(2) IFAST_PV_ROW(3) IFAST_PV_ROW(4) IFAST_PV_ROW(5)
#undef IFAST_PV_ROW
  }
#define IFAST_PV_STORE(r)                                              \
  if constexpr (R > r) {                                               \
    _mm256_storeu_ps(O + r * ldo, c##r##0);                            \
    if constexpr (NV > 1) _mm256_storeu_ps(O + r * ldo + 8, c##r##1);  \
  }
  IFAST_PV_STORE(0) IFAST_PV_STORE(1) IFAST_PV_STORE(2) IFAST_PV_STORE(3) IFAST_PV_STORE(4) IFAST_PV_STORE(5)
#undef IFAST_PV_STORE
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
  int c = 0;
  for (; c + 16 <= D; c += 16) pv_tile<R, 2>(P, rs, cs, V + c, ldv, n, O + c, ldo);
  if (c < D) pv_tile<R, 1>(P, rs, cs, V + c, ldv, n, O + c, ldo);  // D is a multiple of 8
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
  switch (rows - r) {
    case 5: pv_tile_rows<5>(P, rs, cs, r, V, ldv, n, D, O, ldo, causal_off, causal_lo); break;
    case 4: pv_tile_rows<4>(P, rs, cs, r, V, ldv, n, D, O, ldo, causal_off, causal_lo); break;
    case 3: pv_tile_rows<3>(P, rs, cs, r, V, ldv, n, D, O, ldo, causal_off, causal_lo); break;
    case 2: pv_tile_rows<2>(P, rs, cs, r, V, ldv, n, D, O, ldo, causal_off, causal_lo); break;
    case 1: pv_tile_rows<1>(P, rs, cs, r, V, ldv, n, D, O, ldo, causal_off, causal_lo); break;
    default: break;
  }
}

// max(init, x[0..n)), NaN entries ignored (a NaN score still poisons the row through exp2).
// Explicit vectors: GCC leaves a float max reduction scalar, a 4-cycle dependency per element.
inline float row_max(const float* x, int n, float init) {
  int i = 0;
  float m = init;
#ifdef IFAST_ATTN_AVX2
  if (n >= 32) {
    __m256 a0 = _mm256_set1_ps(init), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 32 <= n; i += 32) {
      a0 = _mm256_max_ps(_mm256_loadu_ps(x + i), a0);
      a1 = _mm256_max_ps(_mm256_loadu_ps(x + i + 8), a1);
      a2 = _mm256_max_ps(_mm256_loadu_ps(x + i + 16), a2);
      a3 = _mm256_max_ps(_mm256_loadu_ps(x + i + 24), a3);
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

// 2^x, branch-free and vectorisable: x = n + f, |f| <= 1/2, 2^f by a degree-6 polynomial.
// Inputs below -126 give ~0 (exactly what a masked score needs), NaN stays NaN.
inline float exp2_approx(float x) {
  x = x < -126.f ? -126.f : x;
  x = x > 127.f ? 127.f : x;
  const float n = __builtin_nearbyintf(x);
  const float f = x - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;
  uint32_t bits = static_cast<uint32_t>(e) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

}  // namespace ifast::cpu::attn
