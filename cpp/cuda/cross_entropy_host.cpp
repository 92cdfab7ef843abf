// Host glue of the CUDA cross-entropy and fused linear cross-entropy: checks, device guard,
// allocation on torch's caching allocator, dtype mapping, the launchers of cross_entropy.cu on the
// current stream, and the fused op's chunk loop around cuBLAS GEMMs (through ATen).
//
// No host synchronisation: the non-ignored count that "mean" divides by is reduced on the device
// and read there by the kernels, and so is the incoming gradient. The fused op therefore runs
// every token through the GEMMs (an ignored token's logits gradient is zero, so it adds nothing to
// dhidden or dweight) instead of compacting the labelled tokens first, which would need the count
// on the host.
#include "host_common.h"
#include "kernels.h"
#include "ops_cuda.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <c10/core/GradMode.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <string>

namespace ifast::cuda {
namespace {


bool parse_mean(const std::string& r, const char* fn) {
  if (r == "mean") return true;
  if (r == "sum") return false;
  TORCH_CHECK_VALUE(false, fn, ": reduction must be 'mean' or 'sum', got '", r, "'");
}

// Rows with a unit column stride are read in place; anything else is copied once.
at::Tensor row_major(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

at::Tensor checked_labels(const char* fn, const at::Tensor& labels, const at::Tensor& x) {
  TORCH_CHECK(labels.dim() == 1 && labels.scalar_type() == at::kLong && labels.size(0) == x.size(0) &&
                  labels.device() == x.device(),
              fn, ": labels must be int64 with one entry per row, on the input's device");
  return labels.contiguous();
}

void check_rows(const char* fn, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), fn, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, fn, ": ", name, " must be 2-D");
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// count (and loss, when loss_rows is given) on the device; see kernels.h
void reduce(const at::Tensor& labels, const at::Tensor* loss_rows, int64_t ignore, bool mean, at::Tensor* loss,
            at::Tensor* count) {
  CrossEntropyReduceArgs r{};
  r.loss_type = loss != nullptr ? dtype_of(loss->scalar_type(), "cross_entropy") : DType::kFloat32;
  r.loss_rows = loss_rows != nullptr ? loss_rows->const_data_ptr<double>() : nullptr;
  r.labels = labels.const_data_ptr<int64_t>();
  r.rows = labels.size(0);
  r.ignore_index = ignore;
  r.mean = mean;
  r.loss = loss != nullptr ? loss->mutable_data_ptr() : nullptr;
  r.count = count != nullptr ? count->mutable_data_ptr<int64_t>() : nullptr;
  cross_entropy_reduce_launch(r, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Liger-Kernel's choice, as the triton backend: a chunk's logits about as large as the hidden
// states. At least 1024 tokens, since dweight += dlogits^T @ hidden re-reads and rewrites all of
// the fp32 dweight once per chunk and needs K of a thousand or more to stay compute-bound on a
// GPU; at most 4096, and halved while the chunk's logits would exceed 512 MiB.
int64_t auto_chunk(int64_t rows, int64_t V, int64_t H, int64_t elem_bytes) {
  const int64_t ratio = std::max<int64_t>(1, (V + std::max<int64_t>(H, 1) - 1) / std::max<int64_t>(H, 1));
  const int64_t want = std::max<int64_t>(1, (rows + ratio - 1) / ratio);
  int64_t c = 1;
  while (c < want) c <<= 1;
  c = std::clamp<int64_t>(c, 1024, 4096);
  while (c > 256 && c * V * elem_bytes > (int64_t{512} << 20)) c >>= 1;
  return c;
}

// Whether addmm takes bf16/fp16 factors into an fp32 accumulator (cuBLAS, torch >= 2.8): dweight
// then sums in fp32 at the half-precision GEMM rate with no fp32 copy of the chunk. -1 unknown.
std::atomic<int> g_mixed_addmm{-1};

// dw (fp32, V x H) = [dw +] lc^T @ hc for half-precision lc, hc.
void dweight_mixed(at::Tensor& dw, const at::Tensor& lc, const at::Tensor& hc, bool first) {
  if (g_mixed_addmm.load() != 0) {
    try {
      if (first)
        at::mm_out(dw, lc.t(), hc, dw.scalar_type());
      else
        at::addmm_out(dw, dw, lc.t(), hc, dw.scalar_type(), 1, 1);
      g_mixed_addmm.store(1);
      return;
    } catch (const c10::Error&) {
      if (g_mixed_addmm.load() == 1) throw;  // it worked before: a real failure
      g_mixed_addmm.store(0);
    }
  }
  const at::Tensor lt = lc.to(dw.scalar_type()).t(), ha = hc.to(dw.scalar_type());
  if (first)
    at::mm_out(dw, lt, ha);
  else
    dw.addmm_(lt, ha);
}

}  // namespace

std::vector<at::Tensor> cross_entropy_fwd(const at::Tensor& logits_in, const at::Tensor& labels_in,
                                          int64_t ignore_index, const std::string& reduction) {
  const char* fn = "cross_entropy_fwd";
  check_rows(fn, "logits", logits_in);
  const bool mean = parse_mean(reduction, fn);
  const at::Tensor logits = row_major(logits_in);
  const at::Tensor labels = checked_labels(fn, labels_in, logits);
  const int64_t rows = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0 || rows == 0, fn, ": empty vocabulary");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::ScalarType xt = logits.scalar_type(), acc = acc_of(xt);
  at::Tensor lse = at::empty({rows}, logits.options().dtype(acc));
  at::Tensor loss = at::empty({}, logits.options().dtype(acc));
  at::Tensor loss_rows = at::empty({rows}, logits.options().dtype(at::kDouble));
  if (rows > 0) {
    CrossEntropyArgs a{};
    a.x_type = dtype_of(xt, fn);
    a.x = logits.const_data_ptr();
    a.labels = labels.const_data_ptr<int64_t>();
    a.lse_out = lse.mutable_data_ptr();
    a.loss_rows = loss_rows.mutable_data_ptr<double>();
    a.rows = rows;
    a.V = V;
    a.ld_x = row_stride(logits);
    a.ld_g = V;
    a.ignore_index = ignore_index;
    cross_entropy_rows_launch(a, stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  reduce(labels, &loss_rows, ignore_index, mean, &loss, nullptr);
  return {loss, lse};
}

at::Tensor cross_entropy_bwd(const at::Tensor& dloss, const at::Tensor& logits_in, const at::Tensor& labels_in,
                             const at::Tensor& lse_in, int64_t ignore_index, const std::string& reduction) {
  const char* fn = "cross_entropy_bwd";
  check_rows(fn, "logits", logits_in);
  const bool mean = parse_mean(reduction, fn);
  TORCH_CHECK(dloss.numel() == 1, fn, ": dloss must be a scalar");
  const at::Tensor logits = row_major(logits_in);
  const at::Tensor labels = checked_labels(fn, labels_in, logits);
  const int64_t rows = logits.size(0), V = logits.size(1);
  const at::ScalarType xt = logits.scalar_type(), acc = acc_of(xt);
  TORCH_CHECK(lse_in.dim() == 1 && lse_in.size(0) == rows && lse_in.scalar_type() == acc &&
                  lse_in.device() == logits.device(),
              fn, ": lse must be the forward's log-sum-exp");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor dlogits = at::empty({rows, V}, logits.options());
  if (rows == 0 || V == 0) return dlogits;
  const at::Tensor lse = lse_in.contiguous();
  // stays on the device: the kernel reads the incoming gradient, no host sync for it
  const at::Tensor dl = dloss.reshape({}).to(logits.device(), acc);
  at::Tensor count;
  if (mean) {
    count = at::empty({1}, labels.options());
    reduce(labels, nullptr, ignore_index, true, nullptr, &count);
  }
  CrossEntropyArgs a{};
  a.x_type = dtype_of(xt, fn);
  a.x = logits.const_data_ptr();
  a.g = dlogits.mutable_data_ptr();
  a.labels = labels.const_data_ptr<int64_t>();
  a.lse_in = lse.const_data_ptr();
  a.dloss = dl.const_data_ptr();
  a.count = mean ? count.const_data_ptr<int64_t>() : nullptr;
  a.rows = rows;
  a.V = V;
  a.ld_x = row_stride(logits);
  a.ld_g = V;
  a.ignore_index = ignore_index;
  cross_entropy_rows_launch(a, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dlogits;
}

std::vector<at::Tensor> fused_linear_cross_entropy_fwd(const at::Tensor& hidden, const at::Tensor& weight,
                                                       const at::Tensor& labels_in, int64_t ignore_index,
                                                       const std::string& reduction, int64_t chunk_size,
                                                       bool need_dhidden, bool need_dweight) {
  const char* fn = "fused_linear_cross_entropy_fwd";
  check_rows(fn, "hidden", hidden);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1) && weight.scalar_type() == hidden.scalar_type() &&
                  weight.device() == hidden.device(),
              fn, ": weight must be (V, H) of hidden's dtype and device");
  TORCH_CHECK(chunk_size >= 0, fn, ": chunk_size must be >= 0");
  const bool mean = parse_mean(reduction, fn);
  const at::Tensor labels = checked_labels(fn, labels_in, hidden);
  const c10::cuda::CUDAGuard guard(hidden.device());
  c10::NoGradGuard no_grad;  // the GEMMs below are internal; autograd sees only the custom op
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  TORCH_CHECK(V > 0 || N == 0, fn, ": empty vocabulary");
  const at::ScalarType dtype = hidden.scalar_type(), acc = acc_of(dtype);
  const DType kt = dtype_of(dtype, fn);
  const bool need_grad = need_dhidden || need_dweight;

  at::Tensor loss = at::empty({}, hidden.options().dtype(acc));
  at::Tensor loss_rows = at::empty({N}, hidden.options().dtype(at::kDouble));
  at::Tensor dhidden = need_dhidden ? at::empty({N, H}, hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor dweight = need_dweight ? at::empty({V, H}, weight.options()) : at::empty({0}, weight.options());
  // dweight sums over every chunk: in fp32 even for bf16/fp16 weights
  at::Tensor dw_acc = need_dweight ? (dtype == acc ? dweight : at::empty({V, H}, weight.options().dtype(acc)))
                                   : at::Tensor();
  if (need_dweight && N == 0) dw_acc.zero_();
  // the gradient's 1 / count for mean, known before the first chunk
  at::Tensor count;
  if (need_grad && mean && N > 0) {
    count = at::empty({1}, labels.options());
    reduce(labels, nullptr, ignore_index, true, nullptr, &count);
  }

  int64_t chunk = chunk_size > 0 ? chunk_size : auto_chunk(N, V, H, hidden.element_size());
  chunk = std::max<int64_t>(1, std::min(chunk, N));
  const at::Tensor wt = weight.t();
  at::Tensor buf = N > 0 ? at::empty({chunk, V}, hidden.options()) : at::Tensor();
  for (int64_t start = 0; start < N; start += chunk) {
    const int64_t c = std::min(chunk, N - start);
    const at::Tensor hc = hidden.narrow(0, start, c);
    at::Tensor lc = buf.narrow(0, 0, c);
    at::mm_out(lc, hc, wt);
    CrossEntropyArgs a{};
    a.x_type = kt;
    a.x = lc.const_data_ptr();
    a.g = need_grad ? lc.mutable_data_ptr() : nullptr;  // in place
    a.labels = labels.const_data_ptr<int64_t>() + start;
    a.loss_rows = loss_rows.mutable_data_ptr<double>() + start;
    a.count = count.defined() ? count.const_data_ptr<int64_t>() : nullptr;
    a.rows = c;
    a.V = V;
    a.ld_x = V;
    a.ld_g = V;
    a.ignore_index = ignore_index;
    cross_entropy_rows_launch(a, stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_dhidden) {
      at::Tensor out = dhidden.narrow(0, start, c);
      at::mm_out(out, lc, weight);
    }
    if (need_dweight) {
      if (dtype != acc)
        dweight_mixed(dw_acc, lc, hc, start == 0);
      else if (start == 0)
        at::mm_out(dw_acc, lc.t(), hc);
      else
        dw_acc.addmm_(lc.t(), hc);
    }
  }
  if (need_dweight && dtype != acc) dweight.copy_(dw_acc);
  reduce(labels, &loss_rows, ignore_index, mean, &loss, nullptr);
  return {loss, dhidden, dweight};
}

std::vector<at::Tensor> fused_linear_cross_entropy_bwd(const at::Tensor& dloss, const at::Tensor& dhidden,
                                                       const at::Tensor& dweight) {
  TORCH_CHECK(dloss.numel() == 1, "fused_linear_cross_entropy_bwd: dloss must be a scalar");
  c10::NoGradGuard no_grad;
  // as the CPU kernel: dloss rounded to the gradients' dtype, one multiply; stays on the device
  auto scaled = [&](const at::Tensor& t) {
    TORCH_CHECK(t.is_cuda(), "fused_linear_cross_entropy_bwd: the gradients must be CUDA tensors");
    const c10::cuda::CUDAGuard guard(t.device());
    return at::mul(t, dloss.reshape({}).to(t.device(), t.scalar_type()));
  };
  return {scaled(dhidden), scaled(dweight)};
}

}  // namespace ifast::cuda
