// Checks swiglu.cu's launchers against a double-precision reference: forward and backward, gate
// and up as the halves of a packed (rows, 2F) tensor or as separate row-strided tensors, the packed
// (rows, 2F) gradient, the vector and the element path, every dtype, the limits (silu(-inf) = 0,
// silu(+inf) = inf with gradient 1, NaN stays NaN, gates past the +-80 clamps) and both grid-stride
// loops. A result may differ from the exact value by one rounding to the storage type plus a few
// ulps of the accumulation type. For fp32 data the sigmoid must also be the CPU kernel's to the bit:
// cpu_fast_exp below is cpp/cpu/common.h's fast_exp, verbatim (a copy: common.h includes ATen
// headers, and these tests build without torch).
#define EMU_MAIN
#include "test_common.h"

#include <algorithm>
#include <cmath>
#include <limits>

static float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static float select_bits(bool c, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return bits_to_float((float_to_bits(a) & m) | (float_to_bits(b) & ~m));
}
static float cpu_fast_exp(float x) {
  x = select_bits(x < -87.3f, -87.3f, x);
  x = select_bits(x > 88.7f, 88.7f, x);
  float n = std::nearbyint(x * 1.44269504088896341f);
  float r = std::fma(n, -0.693145751953125f, x);
  r = std::fma(n, -1.428606765330187045e-06f, r);
  float p = 1.3981999507e-3f;
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r + 1.0f);
  int32_t e = static_cast<int32_t>(n) + 127;
  return p * bits_to_float(static_cast<uint32_t>(e) << 23);
}

// a gate value: mostly normal, sometimes one of the limits
static double gate_value(std::mt19937& g, bool specials) {
  std::normal_distribution<double> nd;
  if (specials && std::uniform_int_distribution<int>(0, 9)(g) == 0) {
    const double inf = std::numeric_limits<double>::infinity();
    const double sp[] = {-inf, inf, std::nan(""), -100, 100, -80.5, -79.5, 85, 0.0, -0.0, -30, 30};
    return sp[std::uniform_int_distribution<int>(0, 11)(g)];
  }
  return 3 * nd(g);
}

static bool close(double got, double want, double ut, double err) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= 1.001 * ut * std::fabs(want) + err;
}

// rows x F operands; gate/up: halves of one (rows, 2F) buffer (packed) or two (rows, F + pad)
// buffers; elem_off shifts every operand off 16-byte alignment.
static void run(DType t, int64_t rows, int64_t F, bool packed, int64_t pad, int64_t elem_off, bool specials,
                unsigned seed, const char* note, bool sweep = false) {
  const int before = failures;
  std::mt19937 g(seed);
  std::normal_distribution<double> nd;
  const size_t es = esize(t);
  const int64_t gs = packed ? 2 * F : F + pad, us = gs;
  Buf gbuf((elem_off + rows * gs + 8) * es), ubuf((elem_off + rows * us + 8) * es);
  char* gp = gbuf.p + elem_off * es;
  char* up = packed ? gp + F * es : ubuf.p + elem_off * es;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < F; ++i) {
      // sweep: gates evenly over [-90, 90], across both clamps
      const double x = sweep ? -90 + 180.0 * (r * F + i) / std::max<int64_t>(1, rows * F - 1) : gate_value(g, specials);
      setv(t, gp, r * gs + i, x);
      setv(t, up, r * us + i, nd(g));
    }
  Buf ob((elem_off + rows * F + 8) * es), db((elem_off + rows * F + 8) * es);
  char* outp = ob.p + elem_off * es;
  char* dp = db.p + elem_off * es;
  for (int64_t i = 0; i < rows * F; ++i) setv(t, dp, i, nd(g));
  const int64_t os = packed ? 2 * F : F;
  Buf dgb((elem_off + rows * os + 8) * es), dub((elem_off + rows * F + 8) * es);
  char* dgp = dgb.p + elem_off * es;
  char* dup = packed ? dgp + F * es : dub.p + elem_off * es;
  const std::vector<char> out0(ob.raw), dg0(dgb.raw), du0(dub.raw);

  SwigluFwdArgs f{};
  f.type = t;
  f.gate = gp;
  f.up = up;
  f.out = outp;
  f.gate_stride = gs;
  f.up_stride = us;
  f.rows = rows;
  f.F = F;
  swiglu_fwd_launch(f, nullptr);
  SwigluBwdArgs b{};
  b.type = t;
  b.dout = dp;
  b.gate = gp;
  b.up = up;
  b.dgate = dgp;
  b.dup = dup;
  b.gate_stride = gs;
  b.up_stride = us;
  b.grad_stride = os;
  b.rows = rows;
  b.F = F;
  swiglu_bwd_launch(b, nullptr);

  std::string tag = std::string(nm(t)) + " rows=" + std::to_string(rows) + " F=" + std::to_string(F) +
                    (packed ? " packed" : "") + (pad ? " row-pad=" + std::to_string(pad) : "") +
                    (elem_off ? " misaligned" : "") + (specials ? " limits" : "") + " " + note;
  auto fail = [&](const char* what, int64_t r, int64_t i, double x, double got, double want) {
    if (failures - before < 8)
      printf("FAIL %s: %s row %lld col %lld gate %.9g: got %.9g want %.9g\n", tag.c_str(), what, (long long)r,
             (long long)i, x, got, want);
    ++failures;
  };
  const DType at = t == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
  const double ut = u_of(t), ua = u_of(at), sat = t == DType::kFloat64 ? 700 : 80;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < F; ++i) {
      const double x = getv(t, gp, r * gs + i), u = getv(t, up, r * us + i), d = getv(t, dp, r * F + i);
      // exact silu and silu' with their limits
      double silu, dsilu, dscale;  // dscale: the size of dsilu's terms (it cancels near x = -1.28)
      if (std::isnan(x)) {
        silu = dsilu = dscale = x;
      } else if (x == -INFINITY) {
        silu = 0, dsilu = dscale = 0;
      } else if (x == INFINITY) {
        silu = x, dsilu = dscale = 1;
      } else {
        const double s = 1 / (1 + std::exp(-x));
        silu = x * s;
        dsilu = s * (1 + x * (1 - s));
        dscale = s * (1 + std::fabs(x) * (1 - s));
      }
      // where the kernel returns 0 for silu (x < -sat) the exact value is below 1e-32 in size
      const double tiny = x < -sat ? 1e-30 : (t == DType::kFloat16 ? 0x1p-25 : 0);
      // a few ulps of the accumulation type; silu' = s (1 + x (1 - s)) loses |x| ulps in 1 - s
      const double k = 8 * ua * (2 + std::fabs(std::isfinite(x) ? std::min(std::fabs(x), sat) : sat));
      const double wo = silu * u, wdg = d * u * dsilu, wdu = d * silu;
      const double go = getv(t, outp, r * F + i), gdg = getv(t, dgp, r * os + i), gdu = getv(t, dup, r * os + i);
      if (!close(go, wo, ut, k * std::fabs(wo) + tiny)) fail("out", r, i, x, go, wo);
      if (!close(gdg, wdg, ut, k * std::fabs(d * u * dscale) + tiny)) fail("dgate", r, i, x, gdg, wdg);
      if (!close(gdu, wdu, ut, k * std::fabs(wdu) + tiny)) fail("dup", r, i, x, gdu, wdu);
      if (t == DType::kFloat32 && !std::isnan(x)) {
        // the CPU kernel's forward, operation for operation
        const float xf = (float)x, xc = xf < -80.f ? -80.f : xf;
        const float s = 1.0f / (1.0f + cpu_fast_exp(-xc));
        const float want = (xf < -80.f ? 0.f : xf) * s * (float)u;
        if (float_to_bits((float)go) != float_to_bits(want)) fail("out != cpu bits", r, i, x, go, want);
      }
    }
  // nothing outside the outputs is written
  auto untouched = [&](const std::vector<char>& before_bytes, const Buf& buf, int64_t first, int64_t n, const char* what) {
    const int64_t lo = (buf.p - buf.raw.data()) + first * (int64_t)es, hi = lo + n * (int64_t)es;
    for (int64_t j = 0; j < (int64_t)buf.raw.size(); ++j)
      if ((j < lo || j >= hi) && buf.raw[j] != before_bytes[j]) {
        fail(what, -1, j, 0, 0, 0);
        return;
      }
  };
  untouched(out0, ob, elem_off, rows * F, "outside out");
  untouched(dg0, dgb, elem_off, rows * os, "outside dgate");
  if (!packed) untouched(du0, dub, elem_off, rows * F, "outside dup");
  printf("%s  %s\n", failures == before ? "ok  " : "FAIL", tag.c_str());
}

int main() {
  using D = DType;
  unsigned seed = 1;
  for (D t : {D::kFloat32, D::kBFloat16, D::kFloat16, D::kFloat64}) {
    const int64_t V = 16 / esize(t);
    run(t, 7, 8 * V, false, 0, 0, true, seed++, "vec");
    run(t, 5, 8 * V, true, 0, 0, true, seed++, "vec");
    run(t, 6, 4 * V, false, 2 * V, 0, true, seed++, "vec");
    run(t, 5, 8 * V + 1, true, 0, 0, true, seed++, "scalar (F)");
    run(t, 6, 4 * V, false, 0, 1, true, seed++, "scalar (alignment)");
    run(t, 6, 4 * V, false, 1, 0, true, seed++, "scalar (row stride)");
    run(t, 300, 3, true, 0, 0, true, seed++, "scalar, narrow rows");
    run(t, 1, 1, false, 0, 0, false, seed++, "");
  }
  // a sweep of fp32 gates over both clamps: the sigmoid to the CPU's bits
  run(D::kFloat32, 64, 200, false, 0, 0, false, seed++, "sweep", true);
  run(D::kFloat32, 33, 201, true, 0, 0, false, seed++, "sweep", true);
  run(D::kFloat32, 0, 16, false, 0, 0, false, seed++, "no rows");
  run(D::kBFloat16, 4, 0, true, 0, 0, false, seed++, "no columns");
  // grid-stride: one SM's worth of blocks, over rows (narrow) and over columns (one wide row)
  emu::num_sms = 1;
  run(D::kBFloat16, 9000, 8, true, 0, 0, true, seed++, "grid-stride rows");
  run(D::kFloat64, 4200, 3, false, 1, 0, true, seed++, "grid-stride rows, scalar");
  run(D::kFloat32, 1, 4 * 256 * 32 + 12, false, 0, 0, true, seed++, "grid-stride columns");
  run(D::kFloat16, 2, 256 * 32 + 5, false, 0, 0, false, seed++, "grid-stride columns, scalar");
  printf("%s: %d failures\n", failures ? "FAILED" : "PASSED", failures);
  return failures != 0;
}
