// What the two decode GEMMs on packed low-precision weights (kernels/few_rows_linear_bf16.h,
// kernels/few_rows_linear_int8.h) share around their microkernels: the bias check, and the run over
// panels and rows with fp32 x / bias / out (bf16 ones converted once per call).
#pragma once

#include "common.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <optional>
#include <type_traits>

namespace ifast::cpu::panels {

// Columns per weight panel, and rows of x per microkernel call.
constexpr int kCols = 16;
constexpr int kRows = 4;

// tile(a, R, p0, p1): R <= kRows rows of a.x against panels [p0, p1), into a.out.
template <typename Args>
using TileFn = void (*)(const Args&, int, int64_t, int64_t);

// The tile calls of R rows (1..kRows) over panels [p0, p1): tile(R_, P_, p) for P = panels_at(R)
// panels at a time from panel p, then single panels (R_ and P_ are std::integral_constant, so the tile
// is a template instantiated per shape). The tiles run the CPU's path; this loop only calls them.
template <int (*panels_at)(int), typename Tile>
void over_panels(int R, int64_t p0, int64_t p1, Tile&& tile) {
  auto run = [&](auto r) {
    constexpr int P = panels_at(decltype(r)::value);
    int64_t p = p0;
    for (; p + P <= p1; p += P) tile(r, std::integral_constant<int, P>{}, p);
    for (; p < p1; ++p) tile(r, std::integral_constant<int, 1>{}, p);
  };
  switch (R) {
    case 1: return run(std::integral_constant<int, 1>{});
    case 2: return run(std::integral_constant<int, 2>{});
    case 3: return run(std::integral_constant<int, 3>{});
    default: return run(std::integral_constant<int, 4>{});
  }
}

inline void check_bias(const char* fn, const std::optional<at::Tensor>& bias, int64_t N, const at::Tensor& x) {
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type(),
                fn, ": bias must be contiguous (N,) of x's dtype");
}

// out (M, N = 16 * panels) in x's dtype. `base` carries the weights; Args::bind(x) gives it x as its
// tiles read it (an fp32 copy of bf16 x, or the int8 kernel's 16-bit pairs) and returns the tensor
// that holds that, Args::from_row(r0) moves it to row r0; bias, out and ldo are filled here (an fp32
// copy of a bf16 bias, an fp32 out converted at the end). Threads own whole panels, 8 (128 columns) a
// task at least, and each group of 8 goes through every group of kRows rows, the later groups reading
// the panels from L2.
template <typename Args>
at::Tensor run(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t panels, Args base,
               TileFn<Args> tile) {
  const int64_t M = x.size(0), N = panels * kCols;
  const bool low = x.scalar_type() == at::kBFloat16;
  const at::Tensor held = base.bind(x);
  const at::Tensor bf = bias.has_value() && low ? bias->to(at::kFloat) : bias.value_or(at::Tensor());
  at::Tensor out = at::empty({M, N}, x.options());
  at::Tensor outf = low ? at::empty({M, N}, x.options().dtype(at::kFloat)) : out;
  base.bias = bf.defined() ? bf.data_ptr<float>() : nullptr;
  base.out = outf.data_ptr<float>();
  base.ldo = N;
  c10::BFloat16* ob = low ? out.data_ptr<c10::BFloat16>() : nullptr;
  at::parallel_for(0, panels, 8, [&](int64_t p0, int64_t p1) {
    for (int64_t q0 = p0; q0 < p1; q0 += 8) {
      const int64_t q1 = std::min<int64_t>(p1, q0 + 8);
      for (int64_t r0 = 0; r0 < M; r0 += kRows)
        tile(base.from_row(r0), static_cast<int>(std::min<int64_t>(kRows, M - r0)), q0, q1);
    }
    if (ob != nullptr) {
      const float* of = base.out;
      for (int64_t r = 0; r < M; ++r)
        for (int64_t c = p0 * kCols; c < p1 * kCols; ++c) store(ob, r * N + c, of[r * N + c]);
    }
  });
  return out;
}

}  // namespace ifast::cpu::panels
