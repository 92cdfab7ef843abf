// Checks rms_norm.cu's launchers (both kernels, every dtype pair, vector and scalar paths,
// grid-stride loops, the dweight workspace spill) against a double-precision reference.
#define EMU_MAIN
#include "test_common.h"

#include <algorithm>
#include <cmath>

static double tol_of(DType t) {
  return t == DType::kFloat64 ? 1e-11 : t == DType::kFloat32 ? 2e-5 : t == DType::kBFloat16 ? 1.6e-2 : 2e-3;
}

static void check(const char* what, const std::string& tag, double got, double want, double tol, double scale) {
  if (!(std::fabs(got - want) <= tol * (std::fabs(want) + scale))) {
    if (failures < 20) printf("FAIL %s %s: got %.8g want %.8g\n", tag.c_str(), what, got, want);
    ++failures;
  }
}

static void run(DType xt, DType wt, DType dwt, int64_t rows, int64_t H, bool res, bool dres, bool misalign, unsigned seed) {
  const int failures_before = failures;
  std::mt19937 g(seed);
  std::normal_distribution<double> nd;
  const size_t xs = esize(xt), ws = esize(wt), n = rows * H;
  const size_t off = misalign ? xs : 0;
  Buf x(n * xs, off), r(n * xs, 0), w(H * ws, 0), y(n * xs, 0), ro(n * xs, 0), dy(n * xs, 0), dr(n * xs, off), dx(n * xs, 0), dw(H * esize(dwt), 0);
  const DType at = xt == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
  Buf rstd(rows * esize(at) + 8, 0);
  for (size_t i = 0; i < n; ++i) { setv(xt, x.p, i, nd(g)); setv(xt, r.p, i, nd(g)); setv(xt, dy.p, i, nd(g)); setv(xt, dr.p, i, nd(g)); }
  for (int64_t i = 0; i < H; ++i) setv(wt, w.p, i, 1 + 0.3 * nd(g));
  const double eps = 1e-6;
  RmsNormFwdArgs f{xt, wt, x.p, res ? r.p : nullptr, w.p, y.p, res ? ro.p : nullptr, rstd.p, rows, H, eps};
  rms_norm_fwd_launch(f, nullptr);
  std::string tag = std::string(nm(xt)) + "/" + nm(wt) + "/" + nm(dwt) + " rows=" + std::to_string(rows) + " H=" + std::to_string(H) +
                    (res ? " res" : "") + (dres ? " dres" : "") + (misalign ? " misaligned" : "");
  const double tol = tol_of(xt);
  std::vector<double> s(n);
  std::vector<double> rs(rows);
  for (int64_t row = 0; row < rows; ++row) {
    double ss = 0;
    for (int64_t i = 0; i < H; ++i) {
      size_t k = row * H + i;
      double v = getv(xt, x.p, k);
      if (res) {
        double sum = getv(xt, x.p, k) + getv(xt, r.p, k);
        Buf tmp(16, 0); setv(xt, tmp.p, 0, sum); v = getv(xt, tmp.p, 0);  // rounded like the kernel
        check("res_out", tag, getv(xt, ro.p, k), v, 0, 0);
      }
      s[k] = v; ss += v * v;
    }
    rs[row] = 1 / std::sqrt(ss / H + eps);
    check("rstd", tag, getv(at, rstd.p, row), rs[row], at == DType::kFloat64 ? 1e-13 : 1e-5, 0);
    for (int64_t i = 0; i < H; ++i) check("y", tag, getv(xt, y.p, row * H + i), s[row * H + i] * rs[row] * getv(wt, w.p, i), tol, 0.05);
  }
  // backward on the sum (what autograd saves), with the kernel's rstd
  RmsNormBwdArgs b{xt, wt, dwt, dy.p, res ? ro.p : x.p, w.p, rstd.p, dres ? dr.p : nullptr, dx.p, dw.p, rows, H};
  const int64_t P = rms_norm_bwd_workspace_rows(b);
  std::vector<double> wsp(std::max<int64_t>(1, P * H));  // 8-byte elements cover fp32 and fp64
  memset(wsp.data(), 0xab, wsp.size() * 8);
  rms_norm_bwd_launch(b, wsp.data(), nullptr);
  std::vector<double> dwr(H, 0.0);
  for (int64_t row = 0; row < rows; ++row) {
    double rsr = getv(at, rstd.p, row), dot = 0;
    for (int64_t i = 0; i < H; ++i) { size_t k = row * H + i; dot += getv(xt, dy.p, k) * getv(wt, w.p, i) * s[k]; dwr[i] += getv(xt, dy.p, k) * s[k] * rsr; }
    double c = dot * rsr * rsr / H;
    for (int64_t i = 0; i < H; ++i) {
      size_t k = row * H + i;
      double want = rsr * (getv(xt, dy.p, k) * getv(wt, w.p, i) - s[k] * c) + (dres ? getv(xt, dr.p, k) : 0);
      check("dx", tag, getv(xt, dx.p, k), want, tol, 0.1);
    }
  }
  const double dwtol = std::max(tol_of(dwt), tol_of(xt) == 1e-11 ? 1e-11 : 2e-5);
  for (int64_t i = 0; i < H; ++i) check("dw", tag, getv(dwt, dw.p, i), dwr[i], dwtol, std::sqrt((double)rows));
  printf("%s  %s  (%lld partial rows)\n", failures == failures_before ? "ok  " : "FAIL", tag.c_str(), (long long)P);
}

int main() {
  using D = DType;
  unsigned seed = 1;
  // small H: warp per row, 8 rows a block, grid-stride with idle row groups
  run(D::kFloat32, D::kFloat32, D::kFloat32, 100, 64, false, false, false, seed++);
  run(D::kFloat32, D::kFloat32, D::kFloat32, 100, 64, true, true, false, seed++);
  run(D::kFloat32, D::kFloat32, D::kFloat32, 37, 97, true, true, false, seed++);       // scalar path (97 % 4)
  run(D::kFloat32, D::kFloat32, D::kFloat32, 37, 96, true, true, true, seed++);        // scalar path (misaligned)
  run(D::kBFloat16, D::kBFloat16, D::kBFloat16, 19, 1000, true, true, false, seed++);  // G = 32, R = 8
  run(D::kBFloat16, D::kFloat32, D::kFloat32, 5, 4096, true, false, false, seed++);    // G = 128, fp32 weight
  run(D::kBFloat16, D::kFloat32, D::kBFloat16, 5, 4096, false, true, false, seed++);
  run(D::kFloat16, D::kFloat16, D::kFloat16, 7, 2048, false, false, false, seed++);
  run(D::kFloat16, D::kFloat32, D::kFloat32, 7, 4095, true, true, false, seed++);      // scalar, G = 512
  run(D::kFloat64, D::kFloat64, D::kFloat64, 9, 130, true, true, false, seed++);
  run(D::kFloat64, D::kFloat64, D::kFloat64, 9, 131, false, false, false, seed++);
  run(D::kFloat32, D::kFloat32, D::kFloat32, 3, 20000, true, true, false, seed++);     // vec, K > KREG: workspace spill
  run(D::kFloat32, D::kFloat32, D::kFloat32, 3, 16385, false, false, false, seed++);   // scalar, K > KREG
  run(D::kBFloat16, D::kBFloat16, D::kBFloat16, 1, 1, true, true, false, seed++);
  run(D::kFloat32, D::kFloat32, D::kFloat32, 600, 8, false, true, false, seed++);      // many rows per row group
  emu::num_sms = 1;
  run(D::kBFloat16, D::kBFloat16, D::kFloat32, 50, 512, true, true, false, seed++);    // one SM: long grid-stride
  printf("%s: %d failures\n", failures ? "FAILED" : "PASSED", failures);
  return failures != 0;
}
