// SwiGLU on the CPU: out = silu(gate) * up, and its backward, each one pass over memory.
// Elementwise and memory-bound, so the forward reads gate and up once and writes out once; the
// backward reads dout, gate and up once and writes dgate and dup (into one [rows, 2F] buffer for
// the packed variant, so its gradient needs no concatenation). gate and up may be row-strided
// views (the two halves of a packed [rows, 2F] tensor) so the packed variant never copies.
// Reference: internlm_fast/ops/swiglu.py::swiglu_ref.
// Compiled once per instruction set (isa_compile.h): no include guard; IFAST_ISA_LEVEL selects the
// vector code of each path.

namespace ifast::cpu::IFAST_ISA {
namespace {

// Beyond -kSat the sigmoid is below 2e-35 (float) / 1e-304 (double): silu is 0 to every digit a
// caller can see, and clamping there keeps fast_exp and the sigmoid out of overflow and denormals.
// Without it silu(-inf) = -inf * 0 = NaN and a huge negative gate times a clamped exp is not ~0.
template <typename A> constexpr A kSat = A(80);
template <> constexpr double kSat<double> = 700.0;

// Splits rows * F elements into tasks of whole rows, or of row pieces when there are too few rows
// to keep every thread busy. A piece is at least kMinPiece elements: below that the fork costs
// more than the work (one decoding row of 11008 runs on one thread).
constexpr int64_t kMinPiece = 16384;

template <typename Fn>
void for_blocks(int64_t rows, int64_t F, const Fn& fn) {
  if (rows == 0 || F == 0) return;
  const int64_t threads = at::get_num_threads();
  int64_t per_row = 1;
  if (rows < 4 * threads) {
    const int64_t want = (4 * threads + rows - 1) / rows;
    per_row = std::clamp<int64_t>(F / kMinPiece, 1, want);
  }
  // a multiple of 64 elements keeps every piece but the last vector- and cache-line-aligned
  const int64_t cb = per_row == 1 ? F : ((F + per_row - 1) / per_row + 63) / 64 * 64;
  const int64_t nb = (F + cb - 1) / cb;
  // pieces are big enough to be tasks on their own; whole rows are grouped as in rms_norm
  const int64_t grain = nb > 1 ? 1 : row_grain(F);
  at::parallel_for(0, rows * nb, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / nb, c0 = (t % nb) * cb;
      fn(r, c0, std::min(F, c0 + cb));
    }
  });
}

template <typename T>
void fwd_kernel(const T* g, int64_t gs, const T* u, int64_t us, T* out, int64_t rows, int64_t F) {
  using A = acc_t<T>;
  constexpr A sat = kSat<A>;
  for_blocks(rows, F, [&](int64_t r, int64_t c0, int64_t c1) {
    const T* gr = g + r * gs;
    const T* ur = u + r * us;
    T* outr = out + r * F;
#pragma omp simd
    for (int64_t i = c0; i < c1; ++i) {
      const A x = load(gr, i);
      // ternaries, not fmin/fmax: NaN must stay NaN
      const A xc = x < -sat ? -sat : x;
      const A s = A(1) / (A(1) + fast_exp(-xc));
      const A xz = x < -sat ? A(0) : x;
      store(outr, i, xz * s * load(ur, i));
    }
  });
}

template <typename T>
void bwd_kernel(const T* dout, const T* g, int64_t gs, const T* u, int64_t us, T* dg, T* du,
                int64_t os, int64_t rows, int64_t F) {
  using A = acc_t<T>;
  constexpr A sat = kSat<A>;
  for_blocks(rows, F, [&](int64_t r, int64_t c0, int64_t c1) {
    const T* dr = dout + r * F;
    const T* gr = g + r * gs;
    const T* ur = u + r * us;
    T* dgr = dg + r * os;
    T* dur = du + r * os;
#pragma omp simd
    for (int64_t i = c0; i < c1; ++i) {
      const A x = load(gr, i);
      const A d = load(dr, i);
      // silu'(x) = s * (1 + x * (1 - s)): its limits are 0 at -inf and 1 at +inf, where the
      // formula itself gives inf * 0 = NaN; on x clamped above it is exactly 1 for every x > sat
      A xc = x < -sat ? -sat : x;
      xc = xc > sat ? sat : xc;
      const A s = A(1) / (A(1) + fast_exp(-xc));
      const bool zero = x < -sat;
      const A dsilu = zero ? A(0) : s * (A(1) + xc * (A(1) - s));
      const A silu = zero ? A(0) : x * s;
      store(dgr, i, d * load(ur, i) * dsilu);
      store(dur, i, d * silu);
    }
  });
}

// gate/up: 2-D, unit column stride (any when F == 1), any row stride.
void check_operand(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& gate) {
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2, fn, ": ", name, " must be 2-D");
  TORCH_CHECK(t.sizes() == gate.sizes() && t.scalar_type() == gate.scalar_type(), fn, ": ", name,
              " must match gate in shape and dtype");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, fn, ": ", name, " must have unit column stride");
}

}  // namespace

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  check_operand("swiglu_fwd", "gate", gate, gate);
  check_operand("swiglu_fwd", "up", up, gate);
  const int64_t rows = gate.size(0), F = gate.size(1);
  at::Tensor out = empty_output({rows, F}, gate.scalar_type());
  IFAST_DISPATCH_FLOATING(gate.scalar_type(), "swiglu_fwd", [&] {
    fwd_kernel<scalar_t>(gate.const_data_ptr<scalar_t>(), gate.stride(0), up.const_data_ptr<scalar_t>(),
                         up.stride(0), out.mutable_data_ptr<scalar_t>(), rows, F);
  });
  return out;
}

std::vector<at::Tensor> swiglu_bwd(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up,
                                   bool packed) {
  check_operand("swiglu_bwd", "gate", gate, gate);
  check_operand("swiglu_bwd", "up", up, gate);
  check_operand("swiglu_bwd", "dout", dout, gate);
  TORCH_CHECK(dout.is_contiguous(), "swiglu_bwd: dout must be contiguous");
  const int64_t rows = gate.size(0), F = gate.size(1);
  std::vector<at::Tensor> grads;
  if (packed) {
    grads.push_back(empty_output({rows, 2 * F}, gate.scalar_type()));
  } else {
    grads.push_back(empty_output({rows, F}, gate.scalar_type()));
    grads.push_back(empty_output({rows, F}, gate.scalar_type()));
  }
  IFAST_DISPATCH_FLOATING(gate.scalar_type(), "swiglu_bwd", [&] {
    scalar_t* dg = grads[0].mutable_data_ptr<scalar_t>();
    scalar_t* du = packed ? dg + F : grads[1].mutable_data_ptr<scalar_t>();
    bwd_kernel<scalar_t>(dout.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(), gate.stride(0),
                         up.const_data_ptr<scalar_t>(), up.stride(0), dg, du, packed ? 2 * F : F, rows, F);
  });
  return grads;
}

}  // namespace ifast::cpu::IFAST_ISA
