// RMSNorm on the CPU, optionally fused with the residual add that precedes it in every
// transformer block. One row at a time: the row (<= 44 KB for hidden 11008 in fp32) stays in
// L1/L2 between the sum-of-squares pass and the scaling pass, so DRAM sees each byte once.
// Reference: internlm_fast/ops/rms_norm.py::rms_norm_ref.
// Compiled once per instruction set (isa_compile.h): no include guard; IFAST_ISA_LEVEL selects the
// vector code of each path.

namespace ifast::cpu::IFAST_ISA {
namespace {

// The weight in fp32 once per call, so the inner loops read one type whatever the weight's dtype.
template <typename acc>
at::Tensor weight_as_acc(const at::Tensor& weight) {
  return weight.to(std::is_same_v<acc, double> ? at::kDouble : at::kFloat).contiguous();
}

template <typename T>
void fwd_kernel(const T* x, const T* residual, const acc_t<T>* w, T* y, T* res_out,
                acc_t<T>* rstd, int64_t rows, int64_t H, acc_t<T> eps) {
  using A = acc_t<T>;
  at::parallel_for(0, rows, row_grain(H), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * H;
      T* yr = y + r * H;
      A ss = 0;
      if (residual != nullptr) {
        // normalise the rounded sum, exactly what the caller gets back as residual_out
        const T* rr = residual + r * H;
        T* sr = res_out + r * H;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < H; ++i) {
          store(sr, i, load(xr, i) + load(rr, i));
          A v = load(sr, i);
          ss += v * v;
        }
        xr = sr;
      } else {
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < H; ++i) {
          A v = load(xr, i);
          ss += v * v;
        }
      }
      A rs = A(1) / std::sqrt(ss / A(H) + eps);
      rstd[r] = rs;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) store(yr, i, load(xr, i) * rs * w[i]);
    }
  });
}

template <typename T, typename TW>
void bwd_kernel(const T* dy, const T* x, const acc_t<T>* w, const acc_t<T>* rstd,
                const T* dres, T* dx, TW* dw, int64_t rows, int64_t H) {
  using A = acc_t<T>;
  // dweight = sum over rows of dy * xhat: each thread sums its rows privately, then one pass adds
  // the per-thread partials (no atomics, deterministic for a fixed thread count).
  const int64_t nthreads = at::get_num_threads();
  std::vector<A> partial(static_cast<size_t>(nthreads * H), A(0));
  const int64_t grain = std::max<int64_t>(row_grain(H), (rows + nthreads - 1) / nthreads);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    A* dwp = partial.data() + at::get_thread_num() * H;
    for (int64_t r = r0; r < r1; ++r) {
      const T* dyr = dy + r * H;
      const T* xr = x + r * H;
      T* dxr = dx + r * H;
      const A rs = rstd[r];
      // dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w
      A dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < H; ++i) {
        A d = load(dyr, i);
        A xv = load(xr, i);
        dot += d * w[i] * xv;
        dwp[i] += d * xv * rs;
      }
      const A c = dot * rs * rs / A(H);
      if (dres != nullptr) {
        const T* dr = dres + r * H;
#pragma omp simd
        for (int64_t i = 0; i < H; ++i)
          store(dxr, i, rs * (load(dyr, i) * w[i] - load(xr, i) * c) + load(dr, i));
      } else {
#pragma omp simd
        for (int64_t i = 0; i < H; ++i) store(dxr, i, rs * (load(dyr, i) * w[i] - load(xr, i) * c));
      }
    }
  });
  at::parallel_for(0, H, 2048, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      A s = 0;
      for (int64_t t = 0; t < nthreads; ++t) s += partial[t * H + c];
      store(dw, c, s);
    }
  });
}

}  // namespace

std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& residual, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "rms_norm_fwd: x must be contiguous 2-D");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "rms_norm_fwd: weight shape");
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res)
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous() &&
                    residual->scalar_type() == x.scalar_type(),
                "rms_norm_fwd: residual must match x");
  const int64_t rows = x.size(0), H = x.size(1);
  auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = empty_output_like(x);
  at::Tensor res_out = has_res ? empty_output_like(x) : at::Tensor();
  at::Tensor rstd = at::empty({rows}, x.options().dtype(acc_type));
  IFAST_DISPATCH_FLOATING(x.scalar_type(), "rms_norm_fwd", [&] {
    using A = acc_t<scalar_t>;
    at::Tensor w = weight_as_acc<A>(weight);
    fwd_kernel<scalar_t>(x.const_data_ptr<scalar_t>(),
                         has_res ? residual->const_data_ptr<scalar_t>() : nullptr,
                         w.const_data_ptr<A>(), y.mutable_data_ptr<scalar_t>(),
                         has_res ? res_out.mutable_data_ptr<scalar_t>() : nullptr,
                         rstd.mutable_data_ptr<A>(), rows, H, static_cast<A>(eps));
  });
  return {y, res_out, rstd};
}

std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                     const at::Tensor& weight, const at::Tensor& rstd,
                                     const std::optional<at::Tensor>& dresidual_out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && dy.is_contiguous() && dy.sizes() == x.sizes() &&
                  dy.scalar_type() == x.scalar_type(),
              "rms_norm_bwd: dy and x must be contiguous 2-D of one shape and dtype");
  const bool has_dres = dresidual_out.has_value() && dresidual_out->defined();
  if (has_dres)
    TORCH_CHECK(dresidual_out->sizes() == x.sizes() && dresidual_out->is_contiguous() &&
                    dresidual_out->scalar_type() == x.scalar_type(),
                "rms_norm_bwd: dresidual_out must match x");
  const int64_t rows = x.size(0), H = x.size(1);
  at::Tensor dx = empty_output_like(x);
  at::Tensor dw = at::empty({H}, weight.options());
  IFAST_DISPATCH_FLOATING(x.scalar_type(), "rms_norm_bwd", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    at::Tensor w = weight_as_acc<A>(weight);
    at::Tensor rs = rstd.to(w.scalar_type()).contiguous();
    auto run = [&](auto* dwp) {
      bwd_kernel<T>(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), w.const_data_ptr<A>(),
                    rs.const_data_ptr<A>(), has_dres ? dresidual_out->const_data_ptr<T>() : nullptr,
                    dx.mutable_data_ptr<T>(), dwp, rows, H);
    };
    switch (weight.scalar_type()) {
      case at::kFloat: run(dw.mutable_data_ptr<float>()); break;
      case at::kDouble: run(dw.mutable_data_ptr<double>()); break;
      case at::kBFloat16: run(dw.mutable_data_ptr<c10::BFloat16>()); break;
      case at::kHalf: run(dw.mutable_data_ptr<c10::Half>()); break;
      default: TORCH_CHECK(false, "rms_norm_bwd: unsupported weight dtype");
    }
  });
  return {dx, dw};
}

}  // namespace ifast::cpu::IFAST_ISA
