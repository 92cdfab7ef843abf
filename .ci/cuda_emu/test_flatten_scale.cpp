// Checks flatten_scale.cu's launcher (every dtype pair, tensors of unequal sizes including empty ones,
// blocks past the end of small tensors, padding left untouched) against the same arithmetic on
// the host: one product in fp32 (fp64 for fp64), one rounding to the output type, so bit-exact.
#define EMU_MAIN
#include "test_common.h"

#include <algorithm>

static void run(DType st, DType dt, double scale, unsigned seed) {
  std::mt19937 g(seed);
  std::normal_distribution<double> nd;
  const std::vector<int64_t> sizes = {5, 0, 1000, 1, 257, 0, 33};
  std::vector<std::vector<char>> srcs;
  std::vector<int64_t> desc;
  int64_t total = 0, max_numel = 0;
  for (int64_t n : sizes) {
    srcs.emplace_back(std::max<int64_t>(n, 1) * esize(st));
    for (int64_t i = 0; i < n; ++i) setv(st, srcs.back().data(), i, 3 * nd(g));
    desc.insert(desc.end(), {reinterpret_cast<int64_t>(srcs.back().data()), total, n});
    total += n;
    max_numel = std::max(max_numel, n);
  }
  const int64_t pad = 7;
  std::vector<char> out((total + pad) * esize(dt)), want((total + pad) * esize(dt));
  for (int64_t i = 0; i < total + pad; ++i) { setv(dt, out.data(), i, -1.0); setv(dt, want.data(), i, -1.0); }
  int64_t o = 0;
  for (size_t t = 0; t < sizes.size(); ++t)
    for (int64_t i = 0; i < sizes[t]; ++i, ++o) {
      const double x = getv(st, srcs[t].data(), i);
      setv(dt, want.data(), o, st == DType::kFloat64 ? x * scale : (double)((float)x * (float)scale));
    }
  FlattenScaleArgs a{};
  a.src_type = st;
  a.dst_type = dt;
  a.desc = desc.data();
  a.n = (int64_t)sizes.size();
  a.max_numel = max_numel;
  a.out = out.data();
  a.scale = scale;
  flatten_scale_launch(a, nullptr);
  const bool ok = std::memcmp(out.data(), want.data(), out.size()) == 0;
  if (!ok) ++failures;
  printf("%s  src %zu bytes -> dst %zu bytes, scale %g\n", ok ? "ok  " : "FAIL", esize(st), esize(dt), scale);
}

int main() {
  using D = DType;
  unsigned seed = 1;
  for (double scale : {1.0, 0.5, 1.0 / 3}) {
    run(D::kFloat32, D::kFloat32, scale, seed++);
    run(D::kFloat64, D::kFloat64, scale, seed++);
    run(D::kBFloat16, D::kBFloat16, scale, seed++);
    run(D::kFloat16, D::kFloat16, scale, seed++);
    run(D::kBFloat16, D::kFloat32, scale, seed++);
    run(D::kFloat16, D::kFloat32, scale, seed++);
  }
  printf("%s: %d failures\n", failures ? "FAILED" : "PASSED", failures);
  return failures != 0;
}
