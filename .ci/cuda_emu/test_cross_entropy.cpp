// Checks cross_entropy.cu's launchers against a double-precision reference: the forward (online
// softmax over V not a multiple of the vector width or the group, very negative / large / -inf
// logits, ignored rows, all rows ignored, mean and sum), the backward from the forward's lse, and
// the fused op's in-place mode (gradient over the logits, scale 1 / count read on the device),
// for every dtype, aligned and misaligned rows, row strides wider than V, one row per block and
// several.
#define EMU_MAIN
#include "test_common.h"

#include <algorithm>
#include <cmath>

// relative error of the accumulation (loss, lse) and of one rounding to the storage type (gradient)
// (relative to |lse| + 1 for lse and loss: an fp32 lse carries |lse| * 2^-24 into every term)
static double acc_tol(DType t) { return t == DType::kFloat64 ? 1e-12 : 4e-7; }
static double store_tol(DType t) {
  return t == DType::kFloat64 ? 1e-12 : t == DType::kFloat32 ? 2e-5 : t == DType::kBFloat16 ? 8e-3 : 1e-3;
}

static void check(const char* what, const std::string& tag, double got, double want, double tol, double scale) {
  const bool ok = std::isnan(want) ? std::isnan(got) : std::fabs(got - want) <= tol * (std::fabs(want) + scale);
  if (!ok) {
    if (failures < 30) printf("FAIL %s %s: got %.10g want %.10g\n", tag.c_str(), what, got, want);
    ++failures;
  }
}

enum class Fill { kNormal, kExtreme };
constexpr DType D64 = DType::kFloat64;
constexpr int64_t kIgnore = -100;

// mode: separate forward + backward (dloss 1.5), or the fused op's in-place pass
static void run(DType t, int64_t rows, int64_t V, int64_t ld, size_t off_elems, bool mean, bool inplace, Fill fill,
                int ignore_every, unsigned seed) {
  const int before = failures;
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd;
  const DType at = t == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
  const size_t es = esize(t), as = esize(at);
  Buf x(rows * ld * es + 64, off_elems * es);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < V; ++c) {
      double v = 3 * nd(gen);
      if (fill == Fill::kExtreme) {
        // rows of very negative logits, large ones (exp would overflow without the max), -inf
        // entries, and the maximum late in the row (a rescale of the running sum)
        const int kind = r % 4;
        if (kind == 0) v = -1e4 + v;
        if (kind == 1) v = 80 + v + (c == V - 1 ? 20 : 0);
        if (kind == 2 && c % 7 == 3) v = -INFINITY;
        if (kind == 3) v = (c > V / 2 ? 40.0 : -40.0) + v;
      }
      setv(t, x.p, r * ld + c, v);
    }
  std::vector<int64_t> lab(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t choice = gen() % 4;
    lab[r] = choice == 0 ? 0 : choice == 1 ? V - 1 : int64_t(gen() % V);
    if (ignore_every > 0 && r % ignore_every == 0) lab[r] = kIgnore;
    // the -inf entries never sit at the label: that loss would be +inf
    if (fill == Fill::kExtreme && r % 4 == 2 && lab[r] != kIgnore && lab[r] % 7 == 3) lab[r] = lab[r] > 0 ? lab[r] - 1 : 1;
  }
  // double reference from the stored (rounded) inputs
  std::vector<double> xin(rows * V), lse_ref(rows, 0.0), loss_ref(rows, 0.0);
  int64_t count = 0;
  double total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < V; ++c) xin[r * V + c] = getv(t, x.p, r * ld + c);
    if (lab[r] == kIgnore) continue;
    ++count;
    double m = -INFINITY, s = 0;
    for (int64_t c = 0; c < V; ++c) m = std::max(m, xin[r * V + c]);
    for (int64_t c = 0; c < V; ++c) s += std::exp(xin[r * V + c] - m);
    lse_ref[r] = m + std::log(s);
    loss_ref[r] = lse_ref[r] - xin[r * V + lab[r]];
    total += loss_ref[r];
  }
  const double loss_want = mean ? (count > 0 ? total / count : 0.0) : total;
  std::string tag = std::string(nm(t)) + " rows=" + std::to_string(rows) + " V=" + std::to_string(V) +
                    " ld=" + std::to_string(ld) + " off=" + std::to_string(off_elems) + (mean ? " mean" : " sum") +
                    (inplace ? " inplace" : "") + (fill == Fill::kExtreme ? " extreme" : "") +
                    (ignore_every == 1 ? " all-ignored" : "");

  Buf lse(rows * as + 8), loss_rows(rows * 8 + 8), loss(16), cnt(16), dl(16);
  int64_t* dcount = (int64_t*)cnt.p;
  CrossEntropyReduceArgs cr{at, nullptr, lab.data(), rows, kIgnore, true, nullptr, dcount};
  cross_entropy_reduce_launch(cr, nullptr);
  check("count", tag, (double)*dcount, (double)count, 0, 0);

  const double dloss = inplace ? 1.0 : 1.5;
  const double scale = (mean ? dloss / std::max<int64_t>(count, 1) : dloss);
  Buf g(rows * V * es + 64);
  void* gp = inplace ? x.p : g.p;
  const int64_t ldg = inplace ? ld : V;
  if (inplace) {
    CrossEntropyArgs a{t, x.p, x.p, lab.data(), nullptr, nullptr, (double*)loss_rows.p, nullptr, mean ? dcount : nullptr,
                       rows, V, ld, ld, kIgnore};
    cross_entropy_rows_launch(a, nullptr);
  } else {
    CrossEntropyArgs f{t, x.p, nullptr, lab.data(), nullptr, lse.p, (double*)loss_rows.p, nullptr, nullptr,
                       rows, V, ld, V, kIgnore};
    cross_entropy_rows_launch(f, nullptr);
    for (int64_t r = 0; r < rows; ++r)
      check("lse", tag, getv(at, lse.p, r), lse_ref[r], acc_tol(t), std::fabs(lse_ref[r]) + 1);
    setv(at, dl.p, 0, dloss);
    CrossEntropyArgs b{t, x.p, g.p, lab.data(), lse.p, nullptr, nullptr, dl.p, mean ? dcount : nullptr,
                       rows, V, ld, V, kIgnore};
    cross_entropy_rows_launch(b, nullptr);
  }
  double lse_scale = 1;
  for (int64_t r = 0; r < rows; ++r) {
    check("loss_row", tag, ((double*)loss_rows.p)[r], loss_ref[r], acc_tol(t), std::fabs(lse_ref[r]) + 1);
    lse_scale += std::fabs(lse_ref[r]);
  }
  CrossEntropyReduceArgs lr{at, (double*)loss_rows.p, lab.data(), rows, kIgnore, mean, loss.p, nullptr};
  cross_entropy_reduce_launch(lr, nullptr);
  check("loss", tag, getv(at, loss.p, 0), loss_want, acc_tol(t), mean ? lse_scale / std::max<int64_t>(count, 1) : lse_scale);
  // a second reduction gives the same bits
  Buf loss2(16);
  lr.loss = loss2.p;
  cross_entropy_reduce_launch(lr, nullptr);
  if (memcmp(loss.p, loss2.p, as) != 0) { printf("FAIL %s: loss not reproducible\n", tag.c_str()); ++failures; }

  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < V; ++c) {
      double want = 0;
      if (lab[r] != kIgnore) want = (std::exp(xin[r * V + c] - lse_ref[r]) - (c == lab[r] ? 1 : 0)) * scale;
      // exp(x - lse) inherits lse's own rounding, |lse| * 2^-24 in fp32, relative to every term
      const double tol = store_tol(t) + 4 * std::fabs(lse_ref[r]) * (at == D64 ? 1.2e-16 : 6e-8);
      // at the label p - 1 cancels: the error is p's, up to tol * scale
      check("grad", tag, getv(t, gp, r * ldg + c), want, tol, (c == lab[r] ? 1 : 1e-4) * scale);
    }
  if (inplace && ld > V)  // the padding between rows is never written
    for (int64_t r = 0; r + 1 < rows; ++r)
      for (size_t b = (r * ld + V) * es; b < (r * ld + ld) * es; ++b)
        if (((unsigned char*)x.p)[b] != 0xcd) {
          printf("FAIL %s: padding written\n", tag.c_str());
          ++failures;
          break;
        }
  printf("%s  %s\n", failures == before ? "ok  " : "FAIL", tag.c_str());
}

int main() {
  using D = DType;
  unsigned seed = 1;
  // one block per row (G = 32), 8 rows a block, V not a multiple of the vector width
  run(D::kFloat32, 11, 1001, 1001, 0, true, false, Fill::kNormal, 5, seed++);
  run(D::kFloat32, 11, 1001, 1001, 0, false, true, Fill::kNormal, 3, seed++);
  run(D::kBFloat16, 9, 2999, 2999, 0, true, false, Fill::kNormal, 4, seed++);
  run(D::kBFloat16, 9, 2999, 2999, 0, false, true, Fill::kNormal, 4, seed++);
  // extreme logits, fp32 and bf16, both modes
  run(D::kFloat32, 8, 1500, 1500, 0, true, false, Fill::kExtreme, 0, seed++);
  run(D::kFloat32, 8, 1500, 1500, 0, true, true, Fill::kExtreme, 0, seed++);
  run(D::kBFloat16, 8, 1037, 1037, 0, false, false, Fill::kExtreme, 5, seed++);
  run(D::kBFloat16, 8, 1037, 1037, 0, true, true, Fill::kExtreme, 5, seed++);
  // all rows ignored: loss 0 for mean and sum, zero gradients
  run(D::kFloat32, 5, 1000, 1000, 0, true, false, Fill::kNormal, 1, seed++);
  run(D::kBFloat16, 5, 1000, 1000, 0, false, true, Fill::kNormal, 1, seed++);
  // misaligned rows and row strides wider than V: scalar head and tail; the backward into a
  // contiguous gradient of a different 16-byte phase takes the scalar kernel
  run(D::kFloat32, 6, 1003, 1011, 1, true, false, Fill::kNormal, 4, seed++);
  run(D::kFloat32, 6, 1003, 1011, 3, false, true, Fill::kNormal, 4, seed++);
  run(D::kBFloat16, 6, 2001, 2005, 5, true, false, Fill::kNormal, 4, seed++);
  run(D::kBFloat16, 6, 2001, 2005, 5, true, true, Fill::kNormal, 4, seed++);
  // tiny rows (V below one vector) and many rows a block
  run(D::kFloat32, 37, 3, 3, 0, true, false, Fill::kNormal, 6, seed++);
  run(D::kBFloat16, 37, 97, 97, 1, false, true, Fill::kNormal, 6, seed++);
  run(D::kFloat32, 3, 1, 1, 0, true, false, Fill::kNormal, 0, seed++);
  // fp16 and fp64
  run(D::kFloat16, 7, 1201, 1201, 0, true, false, Fill::kNormal, 3, seed++);
  run(D::kFloat16, 7, 1201, 1201, 0, false, true, Fill::kNormal, 3, seed++);
  run(D::kFloat64, 7, 1001, 1001, 0, true, false, Fill::kExtreme, 3, seed++);
  run(D::kFloat64, 7, 1001, 1003, 1, false, true, Fill::kNormal, 3, seed++);
  // wide rows: 512 threads a row, several warps merged through shared memory
  run(D::kFloat32, 3, 17000, 17000, 0, true, false, Fill::kNormal, 0, seed++);
  run(D::kBFloat16, 3, 40001, 40001, 0, false, true, Fill::kExtreme, 0, seed++);
  printf("%s: %d failures\n", failures ? "FAILED" : "PASSED", failures);
  return failures != 0;
}
