// Checks rotary.cu's launcher against a double-precision reference: half-rotated and interleaved
// pairs, partial rotary (the tail copied out of place, left alone in place), conjugate, padded
// batches with seqlen offsets, packed sequences (cu_seqlens with empty and 1-token sequences),
// strided x and out (views inside larger buffers, nothing outside the view touched), in place,
// the vector and the element path, every (x, cos/sin) dtype pair, and the grid-stride loop.
// A rotated element may differ from the exact value by one rounding to x's dtype plus a few fp32
// (fp64) ulps of |x0 c| + |x1 s|; a copied one must be bit-equal.
#define EMU_MAIN
#include "test_common.h"

#include <algorithm>
#include <cmath>

struct Case {
  DType xt, ct;
  bool interleaved = false, conjugate = false;
  std::vector<int64_t> lens;  // packed sequences (cu_seqlens) when non-empty
  int64_t batch = 2, seqlen = 5;  // padded layout
  int64_t heads = 2, D = 16, rd2 = 8;
  int64_t head_pad = 0, heads_pad = 0, elem_off = 0;          // x inside a larger buffer
  enum Out { kNew, kInPlace, kStrided } out = kNew;
  int64_t max_offset = 3;
  unsigned seed = 1;
  const char* note = "";
};

static void run(const Case& c) {
  const int before = failures;
  std::mt19937 g(c.seed);
  std::normal_distribution<double> nd;
  const bool varlen = !c.lens.empty();
  const int64_t batch = varlen ? (int64_t)c.lens.size() : c.batch;
  std::vector<int32_t> cu(1, 0);
  for (int64_t n : c.lens) cu.push_back(cu.back() + (int32_t)n);
  const int64_t tokens = varlen ? cu.back() : batch * c.seqlen;
  std::vector<int64_t> offsets(batch);
  for (auto& o : offsets) o = std::uniform_int_distribution<int64_t>(0, c.max_offset)(g);
  // x: token rows of (heads + heads_pad) heads of (D + head_pad) elements, elem_off from the start
  const int64_t xs_h = c.D + c.head_pad, xs_s = (c.heads + c.heads_pad) * xs_h;
  const int64_t xs_b = varlen ? 0 : c.seqlen * xs_s;
  const size_t xes = esize(c.xt), n_x = c.elem_off + tokens * xs_s + 8;
  Buf x(n_x * xes);
  for (size_t i = 0; i < n_x; ++i) setv(c.xt, x.p, i, nd(g));
  const std::vector<char> x0(x.p, x.p + n_x * xes);
  auto xidx = [&](int64_t t, int64_t h, int64_t d) {  // t: token in [0, tokens)
    const int64_t b = varlen ? 0 : t / c.seqlen, s = varlen ? t : t % c.seqlen;
    return c.elem_off + b * xs_b + s * xs_s + h * xs_h + d;
  };
  // out
  int64_t os_h = c.D, os_s = c.heads * c.D, os_off = 0;
  if (c.out == Case::kStrided) { os_h = c.D + 3; os_s = (c.heads + 1) * os_h; os_off = 5; }
  if (c.out == Case::kInPlace) { os_h = xs_h; os_s = xs_s; os_off = c.elem_off; }
  const int64_t os_b = varlen ? 0 : c.seqlen * os_s;
  const size_t n_o = os_off + tokens * os_s + 8;
  Buf ob(c.out == Case::kInPlace ? 0 : n_o * xes);
  char* outp = c.out == Case::kInPlace ? x.p : ob.p;
  const std::vector<char> o0(outp, outp + n_o * xes);
  auto oidx = [&](int64_t t, int64_t h, int64_t d) {
    const int64_t b = varlen ? 0 : t / c.seqlen, s = varlen ? t : t % c.seqlen;
    return os_off + b * os_b + s * os_s + h * os_h + d;
  };
  // cos/sin (rows, rd2): every position a token can reach
  int64_t rows = 0;
  for (int64_t b = 0; b < batch; ++b) rows = std::max(rows, offsets[b] + (varlen ? c.lens[b] : c.seqlen));
  rows = std::max<int64_t>(rows, 1);
  const size_t ces = esize(c.ct);
  Buf cb(rows * c.rd2 * ces), sb(rows * c.rd2 * ces);
  for (int64_t p = 0; p < rows; ++p)
    for (int64_t i = 0; i < c.rd2; ++i) {
      const double th = (p + 0.3) * std::pow(10000.0, -2.0 * i / (2 * c.rd2));
      setv(c.ct, cb.p, p * c.rd2 + i, std::cos(th));
      setv(c.ct, sb.p, p * c.rd2 + i, std::sin(th));
    }

  RotaryArgs a{};
  a.x_type = c.xt;
  a.cs_type = c.ct;
  a.x = x.p + c.elem_off * xes;
  a.out = outp + os_off * xes;
  a.cos = cb.p;
  a.sin = sb.p;
  a.seqlen_offsets = offsets.data();
  a.cu_seqlens = varlen ? cu.data() : nullptr;
  a.batch = batch;
  a.seqlen = varlen ? tokens : c.seqlen;
  a.heads = c.heads;
  a.head_dim = c.D;
  a.rd2 = c.rd2;
  a.x_stride_batch = xs_b;
  a.x_stride_seq = xs_s;
  a.x_stride_head = xs_h;
  a.out_stride_batch = os_b;
  a.out_stride_seq = os_s;
  a.out_stride_head = os_h;
  a.interleaved = c.interleaved;
  a.conjugate = c.conjugate;
  rotary_launch(a, nullptr);

  std::string tag = std::string(nm(c.xt)) + "/" + nm(c.ct) + (c.interleaved ? " interleaved" : " half") +
                    (c.conjugate ? " conj" : "") + (varlen ? " packed" : " padded") + " tokens=" +
                    std::to_string(tokens) + " H=" + std::to_string(c.heads) + " D=" + std::to_string(c.D) +
                    " rd=" + std::to_string(2 * c.rd2) +
                    (c.out == Case::kInPlace ? " in-place" : c.out == Case::kStrided ? " strided-out" : "") +
                    (c.elem_off ? " misaligned" : "") + (c.head_pad || c.heads_pad ? " strided-x" : "") + " " + c.note;
  auto fail = [&](const char* what, int64_t t, int64_t h, int64_t d, double got, double want) {
    if (failures - before < 8)
      printf("FAIL %s: %s token %lld head %lld dim %lld: got %.9g want %.9g\n", tag.c_str(), what, (long long)t,
             (long long)h, (long long)d, got, want);
    ++failures;
  };
  const DType at = c.xt == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
  const double ut = u_of(c.xt), ua = u_of(at), sgn = c.conjugate ? -1 : 1;
  const int64_t rd = 2 * c.rd2;
  std::vector<char> seen_o(n_o, 0), seen_x(n_x, 0);
  for (int64_t t = 0; t < tokens; ++t) {
    int64_t b = 0, s = t;
    if (varlen) {
      while (t >= cu[b + 1]) ++b;
      s = t - cu[b];
    } else {
      b = t / c.seqlen;
      s = t % c.seqlen;
    }
    const int64_t pos = offsets[b] + s;
    for (int64_t h = 0; h < c.heads; ++h) {
      for (int64_t i = 0; i < c.rd2; ++i) {
        const int64_t d0 = c.interleaved ? 2 * i : i, d1 = c.interleaved ? 2 * i + 1 : i + c.rd2;
        const double v0 = getv(c.xt, x0.data(), xidx(t, h, d0)), v1 = getv(c.xt, x0.data(), xidx(t, h, d1));
        const double cc = getv(c.ct, cb.p, pos * c.rd2 + i), ss = sgn * getv(c.ct, sb.p, pos * c.rd2 + i);
        const double w0 = v0 * cc - v1 * ss, w1 = v0 * ss + v1 * cc;
        const double sc0 = std::fabs(v0 * cc) + std::fabs(v1 * ss), sc1 = std::fabs(v0 * ss) + std::fabs(v1 * cc);
        const double tiny = c.xt == DType::kFloat16 ? 0x1p-25 : 0;
        const double g0 = getv(c.xt, outp, oidx(t, h, d0)), g1 = getv(c.xt, outp, oidx(t, h, d1));
        if (!(std::fabs(g0 - w0) <= 1.001 * ut * std::fabs(w0) + 4 * ua * sc0 + tiny)) fail("x0'", t, h, d0, g0, w0);
        if (!(std::fabs(g1 - w1) <= 1.001 * ut * std::fabs(w1) + 4 * ua * sc1 + tiny)) fail("x1'", t, h, d1, g1, w1);
        seen_o[oidx(t, h, d0)] = seen_o[oidx(t, h, d1)] = 1;
      }
      for (int64_t d = rd; d < c.D; ++d) {  // the tail: x's own bits, copied or never written
        if (std::memcmp(outp + oidx(t, h, d) * xes, x0.data() + xidx(t, h, d) * xes, xes) != 0)
          fail("tail", t, h, d, getv(c.xt, outp, oidx(t, h, d)), getv(c.xt, x0.data(), xidx(t, h, d)));
        seen_o[oidx(t, h, d)] = 1;
      }
    }
  }
  // nothing outside out's view changes; out of place, x does not change at all
  for (size_t i = 0; i < n_o; ++i)
    if (!seen_o[i] && std::memcmp(outp + i * xes, o0.data() + i * xes, xes) != 0) {
      fail("outside out's view", -1, -1, (int64_t)i, 0, 0);
      break;
    }
  if (c.out != Case::kInPlace && std::memcmp(x.p, x0.data(), n_x * xes) != 0) fail("x changed", -1, -1, -1, 0, 0);
  printf("%s  %s\n", failures == before ? "ok  " : "FAIL", tag.c_str());
}

int main() {
  using D = DType;
  unsigned seed = 1;
  auto mk = [&](D xt, D ct) { Case c{xt, ct}; c.seed = seed++; return c; };
  for (D xt : {D::kFloat32, D::kBFloat16, D::kFloat16, D::kFloat64})
    for (D ct : {xt, D::kFloat32}) {
      if (xt == D::kFloat32 && ct != xt) continue;
      for (bool inter : {false, true}) {
        // vector path: 16-byte aligned rows, rd2 a multiple of the pairs per vector
        Case c = mk(xt, ct);
        c.interleaved = inter;
        c.heads = 3; c.D = 32; c.rd2 = 16; c.note = "vec";
        run(c);
        // partial rotary, conjugate, x strided inside a packed qkv-like buffer, new output
        c = mk(xt, ct);
        c.interleaved = inter; c.conjugate = true;
        c.heads = 2; c.D = 48; c.rd2 = 16; c.heads_pad = 4; c.head_pad = 16; c.note = "vec partial";
        run(c);
        // the same in place: the tail stays, padding untouched
        c.out = Case::kInPlace; c.seed = seed++;
        run(c);
        // element path: x misaligned by one element
        c = mk(xt, ct);
        c.interleaved = inter;
        c.heads = 2; c.D = 24; c.rd2 = 8; c.elem_off = 1; c.heads_pad = 1; c.note = "scalar";
        run(c);
      }
    }
  // element path: rd2 not a multiple of the vector's pairs; odd head_dim with a tail; odd strides
  {
    Case c = mk(D::kBFloat16, D::kBFloat16); c.heads = 2; c.D = 20; c.rd2 = 6; c.note = "scalar rd2=6";
    run(c);
    c = mk(D::kBFloat16, D::kFloat32); c.interleaved = true; c.heads = 3; c.D = 19; c.rd2 = 7; c.note = "scalar odd D";
    run(c);
    c = mk(D::kFloat16, D::kFloat16); c.heads = 2; c.D = 16; c.rd2 = 8; c.head_pad = 1; c.note = "scalar odd head stride";
    run(c);
    c = mk(D::kFloat32, D::kFloat32); c.heads = 2; c.D = 16; c.rd2 = 2; c.out = Case::kStrided; c.note = "scalar strided out";
    run(c);
    c = mk(D::kFloat32, D::kFloat32); c.heads = 2; c.D = 16; c.rd2 = 4; c.out = Case::kStrided; c.conjugate = true;
    c.note = "out strides 19: scalar"; run(c);
    c = mk(D::kBFloat16, D::kFloat32); c.heads = 2; c.D = 16; c.rd2 = 8; c.note = "vec rd = D, no tail";
    run(c);
    c.interleaved = true; c.out = Case::kInPlace; c.seed = seed++; run(c);
    c = mk(D::kFloat16, D::kFloat32); c.heads = 1; c.D = 8; c.rd2 = 1; c.interleaved = true; c.note = "rd=2";
    run(c);
  }
  // packed sequences: empty ones first, between and last, 1-token ones, offsets
  for (bool inter : {false, true})
    for (Case::Out o : {Case::kNew, Case::kInPlace}) {
      Case c = mk(D::kBFloat16, D::kFloat32);
      c.lens = {0, 3, 0, 1, 5, 0, 1, 2, 0}; c.interleaved = inter; c.out = o;
      c.heads = 3; c.D = 32; c.rd2 = 8; c.heads_pad = 2; c.max_offset = 6; c.note = "vec";
      run(c);
      c.elem_off = 3; c.seed = seed++; c.note = "scalar"; run(c);
      c = mk(D::kFloat32, D::kFloat32);
      c.lens = {1}; c.interleaved = inter; c.out = o; c.heads = 4; c.D = 8; c.rd2 = 2; c.note = "one token";
      run(c);
    }
  {
    Case c = mk(D::kFloat64, D::kFloat32); c.lens = {4, 0, 0, 7}; c.heads = 2; c.D = 12; c.rd2 = 4; c.conjugate = true;
    run(c);
    c = mk(D::kFloat32, D::kFloat32); c.lens = {0}; c.note = "no tokens"; run(c);
    c = mk(D::kFloat32, D::kFloat32); c.lens = {}; c.batch = 0; c.note = "empty batch"; run(c);
    c = mk(D::kFloat16, D::kFloat16); c.batch = 3; c.seqlen = 1; c.max_offset = 9; c.note = "decode-like"; run(c);
  }
  // grid-stride over tokens: one SM's worth of blocks, many more token groups
  emu::num_sms = 1;
  {
    Case c = mk(D::kFloat32, D::kFloat32); c.batch = 2; c.seqlen = 600; c.heads = 4; c.D = 16; c.rd2 = 4;
    c.note = "grid-stride"; run(c);
    c = mk(D::kBFloat16, D::kBFloat16); c.lens = {3000, 0, 2000}; c.heads = 1; c.D = 16; c.rd2 = 8; c.interleaved = true;
    c.out = Case::kInPlace; c.note = "grid-stride packed"; run(c);
  }
  printf("%s: %d failures\n", failures ? "FAILED" : "PASSED", failures);
  return failures != 0;
}
