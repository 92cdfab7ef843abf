// What the two decode GEMMs on packed low-precision weights (kernels/few_rows_linear_bf16.h,
// kernels/few_rows_linear_int8.h) share around their microkernels: the panel layout, the bias check,
// and the run over groups of panels and rows with fp32 x / bias / out (bf16 ones converted once per
// call).
#pragma once

#include "common.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <type_traits>

namespace ifast::cpu::panels {

// Columns per weight panel, panels per group, and rows of x per microkernel call.
//
// Groups: the panels are stored in groups of kGroupPanels (the last group may hold fewer), and within
// a group the panels take turns pair by pair: line (j, q) of the group starting at panel p0 holding
// gs panels lies at line p0 * pairs + j * gs + q. A thread walks its groups one after the other, so it
// reads its weights as one sequential stream, which a core's hardware prefetcher follows at full
// speed; four panels side by side in separate streams read at 75-85% of a torch.sum of one buffer on
// a Zen 4 whose DRAM gave 45-57 GB/s, against 90-100% for the same tile on one stream.
constexpr int kCols = 16;
constexpr int kGroupPanels = 4;
constexpr int kRows = 4;

// f(std::integral_constant<int, n>{}) for 1 <= n <= 4: the tiles are templates instantiated per
// row count and panel count.
template <typename F>
inline void with_count(int n, F&& f) {
  switch (n) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

// block(R_, P_, q0) over the panels [0, gs) of one group in steps of P = min(panels_at(R), panels
// left): how many panels a tile holds in registers depends on the rows (AVX2 has 16 registers).
template <int (*panels_at)(int), typename Block>
void over_group(int R, int gs, Block&& block) {
  with_count(R, [&](auto r) {
    constexpr int P = panels_at(decltype(r)::value);
    for (int q0 = 0; q0 < gs; q0 += P)
      with_count(std::min(P, gs - q0), [&](auto np) { block(r, np, q0); });
  });
}

inline void check_bias(const char* fn, const std::optional<at::Tensor>& bias, int64_t N, const at::Tensor& x) {
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type(),
                fn, ": bias must be contiguous (N,) of x's dtype");
}

// out[r][c] = bias[c] or 0 for M rows and the 16 * gs columns from panel p0 on: the tiles add into out.
template <typename Args>
void init_out(const Args& a, int64_t M, int64_t p0, int gs) {
  for (int64_t r = 0; r < M; ++r) {
    float* o = a.out + r * a.ldo + p0 * kCols;
    for (int c = 0; c < gs * kCols; ++c) o[c] = a.bias ? a.bias[p0 * kCols + c] : 0.f;
  }
}

// tile(a, R, p0, gs): R <= kRows rows of a.x against the group of gs panels starting at panel p0,
// added into a.out (which run sets to the bias first).
template <typename Args>
using TileFn = void (*)(const Args&, int, int64_t, int);

// out (M, N = 16 * panels) in x's dtype. `base` carries the weights; Args::bind(x) gives it x as its
// tiles read it (an fp32 copy of bf16 x, or the int8 kernel's 16-bit pairs) and returns the tensor
// that holds that, Args::from_row(r0) moves it to row r0; bias, out and ldo are filled here (an fp32
// copy of a bf16 bias, an fp32 out converted at the end). Each group goes through every block of
// kRows rows, the later blocks reading its panels from L2.
//
// Threads take runs of groups from a shared counter, about 8 runs per thread, rather than one equal
// share each: on a shared host one core often streams slower than the other, and with fixed shares
// the faster thread waited at the end for 5-10% of a decode step (2 threads, Zen 4, InternLM-7B
// shapes).
template <typename Args>
at::Tensor run(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t panels, Args base,
               TileFn<Args> tile) {
  const int64_t M = x.size(0), N = panels * kCols, groups = (panels + kGroupPanels - 1) / kGroupPanels;
  const bool low = x.scalar_type() == at::kBFloat16;
  const at::Tensor held = base.bind(x);
  const at::Tensor bf = bias.has_value() && low ? bias->to(at::kFloat) : bias.value_or(at::Tensor());
  at::Tensor out = at::empty({M, N}, x.options());
  at::Tensor outf = low ? at::empty({M, N}, x.options().dtype(at::kFloat)) : out;
  base.bias = bf.defined() ? bf.data_ptr<float>() : nullptr;
  base.out = outf.data_ptr<float>();
  base.ldo = N;
  c10::BFloat16* ob = low ? out.data_ptr<c10::BFloat16>() : nullptr;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (groups + 1) / 2);
  const int64_t run_groups = std::max<int64_t>(2, groups / (8 * threads));
  const int64_t runs = (groups + run_groups - 1) / run_groups;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::max<int64_t>(threads, 1), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < runs; i = next++) {
      const int64_t g0 = i * run_groups, g1 = std::min(groups, g0 + run_groups);
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t p0 = g * kGroupPanels;
        const int gs = static_cast<int>(std::min<int64_t>(kGroupPanels, panels - p0));
        init_out(base, M, p0, gs);
        for (int64_t r0 = 0; r0 < M; r0 += kRows)
          tile(base.from_row(r0), static_cast<int>(std::min<int64_t>(kRows, M - r0)), p0, gs);
      }
      if (ob != nullptr) {
        const float* of = base.out;
        const int64_t c0 = g0 * kGroupPanels * kCols, c1 = std::min<int64_t>(N, g1 * kGroupPanels * kCols);
        for (int64_t r = 0; r < M; ++r)
          for (int64_t c = c0; c < c1; ++c) store(ob, r * N + c, of[r * N + c]);
      }
    }
  });
  return out;
}

}  // namespace ifast::cpu::panels
