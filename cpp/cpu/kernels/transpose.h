// out (C, R) = x (R, C)^T for fp32, the transposed operand a oneDNN GEMM of the linear layers'
// backward takes contiguous (ops.linear's weight gradient: X^T or dY^T of 2048 tokens). torch's
// copy of a transposed view moves 2.4-5 GB/s there (a (2048, 256) operand 0.9 ms on 2 Zen 4 cores,
// 16 of them a tiny-model training step); this kernel goes by 8 x 8 blocks transposed in registers,
// in tiles of 32 x 64 that keep both sides' lines in L1 and write whole output lines.
// Reference: x.t().contiguous() (exact: only moves values).
// Compiled once per instruction set (isa_compile.h): no include guard.

namespace ifast::cpu::IFAST_ISA {
namespace {

constexpr int64_t kTileRows = 32;  // input rows per tile: two whole output lines per column
constexpr int64_t kTileCols = 64;

#if IFAST_ISA_LEVEL >= 1
// the 8 x 8 block at in (row stride ldi) into out (row stride ldo), transposed: unpack pairs of rows,
// shuffle pairs of pairs, then swap 128-bit halves
inline void block8(const float* in, int64_t ldi, float* out, int64_t ldo) {
  __m256 r[8], t[8], s[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + i * ldi);
#pragma GCC unroll 4
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 2
  for (int i = 0; i < 8; i += 4) {
    s[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(out + i * ldo, _mm256_permute2f128_ps(s[i], s[i + 4], 0x20));
    _mm256_storeu_ps(out + (i + 4) * ldo, _mm256_permute2f128_ps(s[i], s[i + 4], 0x31));
  }
}
#endif

// rows [r0, r1) x columns [c0, c1) of x into out
void tile(const float* x, int64_t ldx, float* out, int64_t ldo, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  int64_t r8 = r0, c8 = c0;
#if IFAST_ISA_LEVEL >= 1
  r8 = r0 + (r1 - r0) / 8 * 8, c8 = c0 + (c1 - c0) / 8 * 8;
  for (int64_t r = r0; r < r8; r += 8)
    for (int64_t c = c0; c < c8; c += 8) block8(x + r * ldx + c, ldx, out + c * ldo + r, ldo);
#endif
  // what the blocks leave: the columns past the last block, then the rows past it
  for (int64_t c = c8; c < c1; ++c)
    for (int64_t r = r0; r < r1; ++r) out[c * ldo + r] = x[r * ldx + c];
  for (int64_t c = c0; c < c8; ++c)
    for (int64_t r = r8; r < r1; ++r) out[c * ldo + r] = x[r * ldx + c];
}

}  // namespace

void transpose_fp32_into(const at::Tensor& x, const at::Tensor& out) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
                    "transpose_fp32: x must be a 2-D fp32 CPU tensor, got ", x.sizes(), " ", x.scalar_type(), " on ",
                    x.device());
  const int64_t R = x.size(0), C = x.size(1);
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == C && out.size(1) == R && out.is_contiguous() &&
                        out.scalar_type() == at::kFloat && out.device().is_cpu(),
                    "transpose_fp32: out must be a contiguous fp32 CPU tensor of x's shape transposed, (", C, ", ", R,
                    "), got ", out.sizes());
  if (R == 0 || C == 0) return;
  const at::Tensor xc = x.stride(1) == 1 && x.stride(0) >= C ? x : x.contiguous();
  const float* src = xc.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  const int64_t ldx = xc.stride(0), row_tiles = (R + kTileRows - 1) / kTileRows,
                col_tiles = (C + kTileCols - 1) / kTileCols;
  at::parallel_for(0, row_tiles * col_tiles, 16, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int64_t r0 = i / col_tiles * kTileRows, c0 = i % col_tiles * kTileCols;
      tile(src, ldx, dst, R, r0, std::min(R, r0 + kTileRows), c0, std::min(C, c0 + kTileCols));
    }
  });
}

}  // namespace ifast::cpu::IFAST_ISA
