// Checks decode_rotary_append.cu's launcher against the same fp32 arithmetic on the host
// (bit-exact): positions, slots, partial rotary, an odd head dim, an out-of-range slot left alone.
#define EMU_MAIN
#include "test_common.h"

#include <cmath>

struct RotCase {
  DType t;
  int64_t tokens, q_heads, kv_heads, D, rd2, n_pos, n_rows;
  std::vector<int64_t> positions, slots;
};

static void run_rotary(const RotCase& c, unsigned seed) {
  const int before = failures;
  std::mt19937 g(seed);
  std::normal_distribution<double> nd;
  const DType t = c.t;
  const size_t es = esize(t);
  const int64_t heads = c.q_heads + 2 * c.kv_heads, D = c.D, hk = c.kv_heads, rd2 = c.rd2;
  const int64_t nx = c.tokens * heads * D, nr = c.n_rows * 2 * hk * D;
  Buf x(nx * es), x0(nx * es), rows(nr * es), rows0(nr * es);
  for (int64_t i = 0; i < nx; ++i) setv(t, x.p, i, nd(g));
  for (int64_t i = 0; i < nr; ++i) setv(t, rows.p, i, nd(g));
  memcpy(x0.p, x.p, nx * es);
  memcpy(rows0.p, rows.p, nr * es);
  std::vector<float> cs(c.n_pos * rd2), sn(c.n_pos * rd2);
  for (int64_t p = 0; p < c.n_pos; ++p)
    for (int64_t i = 0; i < rd2; ++i) {
      const double ang = p * std::pow(10000.0, -2.0 * i / (2 * rd2));
      cs[p * rd2 + i] = (float)std::cos(ang);
      sn[p * rd2 + i] = (float)std::sin(ang);
    }
  DecodeRotaryAppendArgs a{t, x.p, rows.p, cs.data(), sn.data(), c.positions.data(), c.slots.data(),
                           c.tokens, c.q_heads, hk, D, rd2, c.n_pos, c.n_rows};
  decode_rotary_append_launch(a, nullptr);

  // expected: the same fp32 products and sums, one rounding to the storage type
  Buf want(nx * es), want_rows(nr * es);
  memcpy(want.p, x0.p, nx * es);
  memcpy(want_rows.p, rows0.p, nr * es);
  for (int64_t tok = 0; tok < c.tokens; ++tok) {
    const int64_t pos = c.positions[tok], slot = c.slots[tok];
    if (pos < 0 || pos >= c.n_pos || slot < 0 || slot >= c.n_rows) continue;
    for (int64_t h = 0; h < c.q_heads + hk; ++h)
      for (int64_t i = 0; i < rd2; ++i) {
        const size_t k0 = (tok * heads + h) * D + i, k1 = k0 + rd2;
        const float a0 = (float)getv(t, x0.p, k0), a1 = (float)getv(t, x0.p, k1);
        const float cc = cs[pos * rd2 + i], ss = sn[pos * rd2 + i];
        const float m0 = a0 * cc, m1 = a1 * ss, m2 = a0 * ss, m3 = a1 * cc;
        setv(t, want.p, k0, (float)(m0 - m1));
        setv(t, want.p, k1, (float)(m2 + m3));
      }
    for (int64_t e = 0; e < 2 * hk * D; ++e)  // k (rotated) then v of the token, one cache row
      setv(t, want_rows.p, slot * 2 * hk * D + e, getv(t, want.p, (tok * heads + c.q_heads) * D + e));
  }
  std::string tag = std::string("rotary_append ") + nm(t) + " tokens=" + std::to_string(c.tokens) + " hq=" +
                    std::to_string(c.q_heads) + " hk=" + std::to_string(hk) + " D=" + std::to_string(D) +
                    " rd=" + std::to_string(2 * rd2);
  int shown = 0;
  auto expect_bits = [&](const char* what, const Buf& got, const Buf& want_buf, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
      if (memcmp(got.p + i * es, want_buf.p + i * es, es) != 0) {
        if (shown++ < 5)
          printf("FAIL %s %s[%lld]: got %.8g want %.8g\n", tag.c_str(), what, (long long)i, getv(t, got.p, i),
                 getv(t, want_buf.p, i));
        ++failures;
      }
  };
  expect_bits("qkv", x, want, nx);
  expect_bits("kv_rows", rows, want_rows, nr);
  printf("%s  %s\n", failures == before ? "ok  " : "FAIL", tag.c_str());
}

int main() {
  using T = DType;
  unsigned seed = 11;
  // rotary append: partial rotary, bf16 and fp32; the last token's slot is out of range (skipped)
  run_rotary({T::kBFloat16, 3, 4, 2, 16, 4, 20, 10, {3, 0, 19}, {7, 2, 4}}, seed++);
  run_rotary({T::kFloat32, 3, 4, 2, 16, 8, 20, 10, {5, 11, 1}, {0, 9, 10}}, seed++);
  run_rotary({T::kFloat16, 2, 2, 1, 32, 16, 8, 4, {7, 2}, {1, 3}}, seed++);
  run_rotary({T::kFloat64, 2, 1, 1, 7, 2, 8, 3, {4, 6}, {2, 0}}, seed++);  // odd D, rotated in fp32
  printf("%s: %d failures (%ld launches)\n", failures ? "FAILED" : "PASSED", failures, emu::launches);
  return failures != 0;
}
