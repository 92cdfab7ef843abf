// Cross-entropy over a vocabulary on the CPU, and the same loss fused with the lm_head GEMM.
//
// cross_entropy: one read of each logits row computes max and sum-of-exp together (online
// softmax, kept per SIMD lane so the loop vectorises with a single exp per element); the backward
// reads the row once more and writes the gradient once. Nothing of size (rows, V) is kept between
// forward and backward but the logits the caller already holds.
//
// fused_linear_cross_entropy: the (tokens, V) logits are never whole. Tokens go through in
// chunks; a chunk's logits come from torch's GEMM into one reused buffer, one fused pass turns
// them into log-sum-exp, loss and (in place) the logits gradient, and two more GEMMs fold that
// gradient into dhidden and dweight. The gradients are therefore finished in the forward (as
// Liger-Kernel does) and the backward only scales them by the incoming gradient.
// Reference: internlm_fast/ops/cross_entropy.py::{cross_entropy_ref, fused_linear_cross_entropy_ref}.
// Compiled once per instruction set (isa_compile.h): no include guard; IFAST_ISA_LEVEL selects the
// vector code of each path.

namespace ifast::cpu::IFAST_ISA {
namespace {

enum class Reduction { kMean, kSum };

Reduction parse_reduction(const std::string& r, const char* fn) {
  if (r == "mean") return Reduction::kMean;
  if (r == "sum") return Reduction::kSum;
  TORCH_CHECK_VALUE(false, fn, ": reduction must be 'mean' or 'sum', got '", r, "'");
}

// Labels that are neither ignore_index nor a vocabulary entry would index out of the row.
int64_t count_valid(const int64_t* labels, int64_t n, int64_t V, int64_t ignore, const char* fn) {
  int64_t valid = 0;
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t l = labels[i];
    if (l == ignore) continue;
    bad |= l < 0 || l >= V;
    ++valid;
  }
  TORCH_CHECK_VALUE(!bad, fn, ": labels must lie in [0, ", V, ") or equal ignore_index");
  return valid;
}

// Independent running (max, sum) pairs: enough lanes to fill several AVX2 registers, and
// shorter sequential sums (V / 32 terms each) than one accumulator would give.
constexpr int kLanes = 32;

// One online-softmax step: a new maximum rescales the sum, otherwise the term is added; both
// cases need only exp(-|v - m|). A NaN v fails `d > 0` and makes the sum NaN, as it must.
template <typename A>
inline A sel(bool c, A a, A b) {
  if constexpr (std::is_same_v<A, float>)
    return select_bits(c, a, b);  // branch-free, see common.h
  else
    return c ? a : b;
}

template <typename A>
inline void online_step(A& m, A& s, A v) {
  const A d = v - m;
  const bool up = d > A(0);
  const A e = fast_exp(-std::abs(d));
  s = sel(up, s * e + A(1), s + e);
  m = sel(up, v, m);
}

template <typename T>
acc_t<T> row_lse(const T* x, int64_t V) {
  using A = acc_t<T>;
  // lowest, not -inf: -inf - -inf would be NaN for a row that starts with masked (-inf) logits
  A m[kLanes], s[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    m[j] = std::numeric_limits<A>::lowest();
    s[j] = A(0);
  }
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) online_step(m[j], s[j], load(x, i + j));
  }
  for (int j = 0; i < V; ++i, ++j) online_step(m[j], s[j], load(x, i));
  A M = m[0];
  for (int j = 1; j < kLanes; ++j) M = m[j] > M ? m[j] : M;
  A S = 0;
  for (int j = 0; j < kLanes; ++j) S += s[j] * fast_exp(m[j] - M);
  return M + std::log(S);
}

// g = (softmax(x) - onehot(label)) * scale; g may be x itself (the fused op writes in place).
template <typename T>
void row_grad(const T* x, T* g, int64_t V, acc_t<T> lse, acc_t<T> scale, int64_t label) {
  using A = acc_t<T>;
  const A xl = load(x, label);  // before the loop: with g == x it is overwritten there
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) store(g, i, fast_exp(load(x, i) - lse) * scale);
  store(g, label, (fast_exp(xl - lse) - A(1)) * scale);
}

template <typename T>
void zero_row(T* g, int64_t V) {
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) store(g, i, acc_t<T>(0));
}

// Per-row loss (0 for ignored rows) and log-sum-exp; with grad, the gradient replaces the logits.
template <typename T>
void ce_rows(T* x, const int64_t* labels, int64_t rows, int64_t V, int64_t ignore, acc_t<T>* lse,
             double* loss, bool grad, acc_t<T> scale) {
  at::parallel_for(0, rows, row_grain(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* xr = x + r * V;
      const int64_t l = labels[r];
      if (l == ignore) {
        if (lse != nullptr) lse[r] = 0;
        loss[r] = 0;
        if (grad) zero_row(xr, V);
        continue;
      }
      const acc_t<T> z = row_lse(xr, V);
      if (lse != nullptr) lse[r] = z;
      loss[r] = static_cast<double>(z) - static_cast<double>(load(xr, l));
      if (grad) row_grad(xr, xr, V, z, scale, l);
    }
  });
}

// Rows summed in order after the parallel pass: the loss is the same for any thread count.
double ordered_sum(const std::vector<double>& v, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += v[i];
  return s;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor scalar_loss(double v, at::ScalarType t) {
  return at::scalar_tensor(v, at::TensorOptions().dtype(acc_type(t)));
}

// Liger-Kernel's choice: a chunk's logits about as large as the hidden states, so the op never
// holds much more than its inputs. Clamped below at 512 tokens because dweight += dlogits^T @
// hidden re-reads and rewrites all of dweight once per chunk: with K = 512 that GEMM does 128
// flops per byte of dweight traffic and stays compute-bound (at 4096 x 1024 x 32000, 128-token
// chunks, Liger's value there, are slower than 512-1024). Below 32 MB of logits (a small vocabulary)
// the chunk grows to that: fewer dweight passes and longer GEMMs, for memory that small a model has
// to spare (tiny preset, 2044 tokens x 8192: 1024-token chunks 4-6% faster than 512 on 2 Zen 1 cores).
int64_t auto_chunk(int64_t rows, int64_t V, int64_t H) {
  constexpr int64_t kSmallLogits = int64_t(32) << 20;  // bytes of fp32 logits
  const int64_t ratio = std::max<int64_t>(1, (V + H - 1) / H);
  const int64_t want = std::max<int64_t>(1, (rows + ratio - 1) / ratio);
  int64_t c = 1;
  while (c < want) c <<= 1;
  while (c * 2 * 4 * V <= kSmallLogits) c <<= 1;  // still within the small-vocabulary budget
  return std::clamp<int64_t>(c, 512, 4096);
}

}  // namespace

std::vector<at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& labels,
                                          int64_t ignore_index, const std::string& reduction) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "cross_entropy_fwd: logits must be contiguous 2-D");
  TORCH_CHECK(labels.dim() == 1 && labels.is_contiguous() && labels.scalar_type() == at::kLong &&
                  labels.size(0) == logits.size(0),
              "cross_entropy_fwd: labels must be contiguous int64 with one entry per logits row");
  const Reduction red = parse_reduction(reduction, "cross_entropy_fwd");
  const int64_t rows = logits.size(0), V = logits.size(1);
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  const int64_t valid = count_valid(lab, rows, V, ignore_index, "cross_entropy_fwd");
  at::Tensor lse = at::empty({rows}, logits.options().dtype(acc_type(logits.scalar_type())));
  std::vector<double> loss(static_cast<size_t>(rows));
  IFAST_DISPATCH_FLOATING(logits.scalar_type(), "cross_entropy_fwd", [&] {
    using A = acc_t<scalar_t>;
    // grad=false: the kernel only reads the logits, the cast drops nothing it relies on
    ce_rows<scalar_t>(const_cast<scalar_t*>(logits.const_data_ptr<scalar_t>()), lab, rows, V, ignore_index,
                      lse.mutable_data_ptr<A>(), loss.data(), false, A(0));
  });
  double total = ordered_sum(loss, rows);
  // mean over no tokens is 0, not torch's NaN: a fully masked micro-batch must not poison training
  if (red == Reduction::kMean) total = valid > 0 ? total / static_cast<double>(valid) : 0.0;
  return {scalar_loss(total, logits.scalar_type()), lse};
}

at::Tensor cross_entropy_bwd(const at::Tensor& dloss, const at::Tensor& logits, const at::Tensor& labels,
                             const at::Tensor& lse, int64_t ignore_index, const std::string& reduction) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "cross_entropy_bwd: logits must be contiguous 2-D");
  TORCH_CHECK(labels.dim() == 1 && labels.is_contiguous() && labels.scalar_type() == at::kLong &&
                  labels.size(0) == logits.size(0),
              "cross_entropy_bwd: labels must be contiguous int64 with one entry per logits row");
  TORCH_CHECK(dloss.numel() == 1, "cross_entropy_bwd: dloss must be a scalar");
  const Reduction red = parse_reduction(reduction, "cross_entropy_bwd");
  const int64_t rows = logits.size(0), V = logits.size(1);
  const auto at = acc_type(logits.scalar_type());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == rows && lse.is_contiguous() && lse.scalar_type() == at,
              "cross_entropy_bwd: lse must be the forward's log-sum-exp");
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  const int64_t valid = count_valid(lab, rows, V, ignore_index, "cross_entropy_bwd");
  double scale = dloss.item<double>();
  if (red == Reduction::kMean) scale = valid > 0 ? scale / static_cast<double>(valid) : 0.0;
  at::Tensor dlogits = empty_output_like(logits);
  IFAST_DISPATCH_FLOATING(logits.scalar_type(), "cross_entropy_bwd", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T* x = logits.const_data_ptr<T>();
    const A* z = lse.const_data_ptr<A>();
    T* g = dlogits.mutable_data_ptr<T>();
    const A sc = static_cast<A>(scale);
    at::parallel_for(0, rows, row_grain(V), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (lab[r] == ignore_index)
          zero_row(g + r * V, V);
        else
          row_grad(x + r * V, g + r * V, V, z[r], sc, lab[r]);
      }
    });
  });
  return dlogits;
}

std::vector<at::Tensor> fused_linear_cross_entropy_fwd(const at::Tensor& hidden, const at::Tensor& weight,
                                                       const at::Tensor& labels, int64_t ignore_index,
                                                       const std::string& reduction, int64_t chunk_size,
                                                       bool need_dhidden, bool need_dweight) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "fused_linear_cross_entropy_fwd: hidden must be contiguous 2-D");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1) && weight.scalar_type() == hidden.scalar_type(),
              "fused_linear_cross_entropy_fwd: weight must be (V, H) of hidden's dtype");
  TORCH_CHECK(labels.dim() == 1 && labels.is_contiguous() && labels.scalar_type() == at::kLong &&
                  labels.size(0) == hidden.size(0),
              "fused_linear_cross_entropy_fwd: labels must be contiguous int64 with one entry per hidden row");
  TORCH_CHECK(chunk_size >= 0, "fused_linear_cross_entropy_fwd: chunk_size must be >= 0");
  const Reduction red = parse_reduction(reduction, "fused_linear_cross_entropy_fwd");
  c10::NoGradGuard no_grad;  // the GEMMs below are internal; autograd sees only the custom op
  if (hidden.scalar_type() == at::kBFloat16 && bf16_gemm_widened()) {
    // the whole op on fp32 copies (onednn_gemm.h says why), the gradients rounded to bf16 once (the
    // loss is fp32 either way)
    std::vector<at::Tensor> out = fused_linear_cross_entropy_fwd(hidden.to(at::kFloat), weight.to(at::kFloat), labels,
                                                                 ignore_index, reduction, chunk_size, need_dhidden,
                                                                 need_dweight);
    out[1] = out[1].to(at::kBFloat16);
    out[2] = out[2].to(at::kBFloat16);
    return out;
  }
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto dtype = hidden.scalar_type();
  const auto acc = acc_type(dtype);
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  const int64_t valid = count_valid(lab, N, V, ignore_index, "fused_linear_cross_entropy_fwd");
  const bool need_grad = need_dhidden || need_dweight;

  // Only tokens with a label go through the GEMMs: prompt tokens in fine-tuning cost nothing.
  const bool all_valid = valid == N;
  at::Tensor rows_idx, rows_lab;
  if (!all_valid) {
    rows_idx = at::empty({valid}, labels.options());
    rows_lab = at::empty({valid}, labels.options());
    int64_t* ri = rows_idx.mutable_data_ptr<int64_t>();
    int64_t* rl = rows_lab.mutable_data_ptr<int64_t>();
    for (int64_t i = 0, k = 0; i < N; ++i)
      if (lab[i] != ignore_index) {
        ri[k] = i;
        rl[k++] = lab[i];
      }
  }
  const int64_t* vlab = all_valid ? lab : rows_lab.const_data_ptr<int64_t>();

  int64_t chunk = chunk_size > 0 ? chunk_size : auto_chunk(valid, V, H);
  chunk = std::max<int64_t>(1, std::min(chunk, valid));
  const double scale = red == Reduction::kMean && valid > 0 ? 1.0 / static_cast<double>(valid) : 1.0;

  // Outputs from the caching allocator: the same shapes come back every training step.
  at::Tensor dhidden = need_dhidden ? empty_output_like(hidden) : at::empty({0}, hidden.options());
  if (need_dhidden && !all_valid) dhidden.zero_();  // ignored tokens get no gradient
  at::Tensor dweight = need_dweight ? empty_output_like(weight) : at::empty({0}, weight.options());
  // dweight sums over every chunk: in fp32 even for bf16/fp16 weights
  at::Tensor dw_acc = need_dweight ? (dtype == acc ? dweight : empty_output({V, H}, acc)) : at::Tensor();
  if (need_dweight && valid == 0) dw_acc.zero_();

  const at::Tensor wt = weight.t();
  // fp32 on a CPU where oneDNN outruns torch's BLAS (onednn_gemm.h): the three GEMMs go there, and
  // dweight sums transposed (H, V), the layout in which oneDNN takes that product fastest
  const bool onednn = dtype == at::kFloat && onednn_fp32_gemm();
  at::Tensor dw_t;
  at::Tensor buf = valid > 0 && !onednn ? empty_output({chunk, V}, dtype) : at::Tensor();
  std::vector<double> loss(static_cast<size_t>(chunk));
  double total = 0;
  for (int64_t start = 0; start < valid; start += chunk) {
    const int64_t c = std::min(chunk, valid - start);
    at::Tensor idx = all_valid ? at::Tensor() : rows_idx.narrow(0, start, c);
    at::Tensor hc = all_valid ? hidden.narrow(0, start, c) : hidden.index_select(0, idx);
    at::Tensor lc = onednn ? linear_nt(hc, weight) : buf.narrow(0, 0, c);
    if (!onednn) at::mm_out(lc, hc, wt);
    IFAST_DISPATCH_FLOATING(dtype, "fused_linear_cross_entropy_fwd", [&] {
      using A = acc_t<scalar_t>;
      ce_rows<scalar_t>(lc.mutable_data_ptr<scalar_t>(), vlab + start, c, V, ignore_index, nullptr, loss.data(),
                        need_grad, static_cast<A>(scale));
    });
    total += ordered_sum(loss, c);
    if (need_dhidden) {
      if (all_valid) {
        at::Tensor out = dhidden.narrow(0, start, c);
        if (onednn)
          out.copy_(linear_nt(lc, wt));
        else
          at::mm_out(out, lc, weight);
      } else {
        dhidden.index_copy_(0, idx, onednn ? linear_nt(lc, wt) : at::mm(lc, weight));
      }
    }
    if (need_dweight && onednn) {
      at::Tensor part = linear_nt(transpose_fp32(hc), lc.t());  // (H, V) = hc^T lc
      if (start == 0)
        dw_t = part;
      else
        dw_t.add_(part);
    } else if (need_dweight) {
      const at::Tensor lt = dtype == acc ? lc.t() : lc.to(acc).t();
      const at::Tensor ha = dtype == acc ? hc : hc.to(acc);
      if (start == 0)
        at::mm_out(dw_acc, lt, ha);
      else
        dw_acc.addmm_(lt, ha);
    }
  }
  if (dw_t.defined()) transpose_fp32_into(dw_t, dweight);
  if (need_dweight && dtype != acc) dweight.copy_(dw_acc);
  if (red == Reduction::kMean) total = valid > 0 ? total / static_cast<double>(valid) : 0.0;
  return {scalar_loss(total, dtype), dhidden, dweight};
}

std::vector<at::Tensor> fused_linear_cross_entropy_bwd(const at::Tensor& dloss, const at::Tensor& dhidden,
                                                       const at::Tensor& dweight) {
  TORCH_CHECK(dloss.numel() == 1, "fused_linear_cross_entropy_bwd: dloss must be a scalar");
  c10::NoGradGuard no_grad;
  const double g = dloss.item<double>();
  auto scaled = [&](const at::Tensor& t) {
    at::Tensor out = t.numel() >= (int64_t(1) << 16) ? empty_output_like(t) : at::empty_like(t);
    return at::mul_out(out, t, at::scalar_tensor(g, t.options()));
  };
  return {scaled(dhidden), scaled(dweight)};
}

}  // namespace ifast::cpu::IFAST_ISA
