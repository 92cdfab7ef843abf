// Flatten-and-scale on the CPU: out[off_i : off_i + n_i] = scale * tensors[i] (flattened), the
// tensors laid end to end from out[0]. This is how the sharded optimizer gathers a bucket's
// gradients into one flat buffer before its reduce-scatter: one call per bucket, one pass over
// memory, no per-parameter Python loop. Inputs share one dtype; out has it, or fp32 for bf16/fp16
// inputs. Reference: internlm_fast/ops/flatten_scale.py::flatten_scale_ref.
// Compiled once per instruction set (isa_compile.h): no include guard; IFAST_ISA_LEVEL selects the
// vector code of each path.

namespace ifast::cpu::IFAST_ISA {
namespace {

template <typename S, typename D>
void copy_scaled(const std::vector<const S*>& src, const std::vector<int64_t>& offsets, D* out, double scale) {
  using A = acc_t<S>;
  const A s = static_cast<A>(scale);
  const int64_t total = offsets.back();
  // Tasks are ranges of the output; a range may span several tensors, found by binary search.
  at::parallel_for(0, total, 1 << 15, [&](int64_t a, int64_t b) {
    auto it = std::upper_bound(offsets.begin(), offsets.end(), a);
    for (int64_t t = (it - offsets.begin()) - 1; a < b; ++t) {
      const int64_t end = std::min(b, offsets[t + 1]);
      const S* x = src[t] - offsets[t];  // indexed by output position
#pragma omp simd
      for (int64_t i = a; i < end; ++i) store(out, i, static_cast<acc_t<D>>(load(x, i) * s));
      a = end;
    }
  });
}

}  // namespace

void flatten_scale_fwd(const std::vector<at::Tensor>& tensors, const at::Tensor& out, double scale) {
  TORCH_CHECK(out.dim() == 1 && out.is_contiguous() && out.device().is_cpu(),
              "flatten_scale: out must be a contiguous 1-D CPU tensor");
  std::vector<int64_t> offsets{0};
  offsets.reserve(tensors.size() + 1);
  for (const auto& t : tensors) {
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "flatten_scale: tensors must be contiguous CPU tensors");
    TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type(), "flatten_scale: tensors must share one dtype");
    offsets.push_back(offsets.back() + t.numel());
  }
  TORCH_CHECK(offsets.back() <= out.numel(), "flatten_scale: out holds ", out.numel(), " elements, tensors ",
              offsets.back());
  if (tensors.empty() || offsets.back() == 0) return;
  const at::ScalarType st = tensors[0].scalar_type(), dt = out.scalar_type();
  const bool widen = dt == at::kFloat && (st == at::kBFloat16 || st == at::kHalf);
  TORCH_CHECK(st == dt || widen, "flatten_scale: unsupported dtypes ", st, " -> ", dt);
  IFAST_DISPATCH_FLOATING(st, "flatten_scale", [&] {
    std::vector<const scalar_t*> src;
    src.reserve(tensors.size());
    for (const auto& t : tensors) src.push_back(t.const_data_ptr<scalar_t>());
    if (widen) {
      copy_scaled(src, offsets, out.mutable_data_ptr<float>(), scale);
    } else {
      copy_scaled(src, offsets, out.mutable_data_ptr<scalar_t>(), scale);
    }
  });
}

}  // namespace ifast::cpu::IFAST_ISA
