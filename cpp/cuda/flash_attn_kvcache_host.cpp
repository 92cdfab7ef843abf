// Host glue of the CUDA KV-cache attention (flash_attn_kvcache.cu): checks, device guard, allocation
// on torch's caching allocator, dtype mapping, then the raw-pointer launchers on the current stream.
// Nothing here reads device memory: the cache lengths stay on the GPU (a decode step must not
// synchronise), so the split plan uses the cache's capacity, not the lengths; nor the block table:
// a paged cache's capacity is max_blocks * block_size.
#include "host_common.h"
#include "kernels.h"
#include "ops_cuda.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

namespace ifast::cuda {
namespace {

DType attn_dtype(at::ScalarType t, const char* fn) {
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, fn,
              ": q, k_cache and v_cache must be fp32, bf16 or fp16, got ", t);
  return dtype_of(t, fn);
}

}  // namespace

std::vector<at::Tensor> flash_attn_kvcache_fwd(const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                               const std::optional<at::Tensor>& block_table,
                                               double softmax_scale, bool causal) {
  constexpr const char* fn = "flash_attn_with_kvcache";
  TORCH_CHECK(q.is_cuda() && k_cache.device() == q.device() && v_cache.device() == q.device() &&
                  cache_lens.device() == q.device(),
              fn, ": q, k_cache, v_cache and cache_seqlens must be on one CUDA device");
  const bool paged = block_table.has_value();
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  q.size(3) == k_cache.size(3) && k_cache.size(2) > 0 && q.size(2) % k_cache.size(2) == 0,
              fn, ": shapes");
  if (paged) {
    const at::Tensor& bt = *block_table;
    TORCH_CHECK(bt.device() == q.device() && bt.scalar_type() == at::kInt && bt.dim() == 2 &&
                    bt.size(0) == q.size(0) && (bt.size(1) <= 1 || bt.stride(1) == 1),
                fn, ": block_table must be int32 (batch, max_blocks) with a contiguous last dim on q's device");
    TORCH_CHECK(bt.size(1) * k_cache.size(1) <= std::numeric_limits<int32_t>::max() &&
                    k_cache.size(0) <= std::numeric_limits<int32_t>::max(),
                fn, ": paged cache too large");
  } else {
    TORCH_CHECK(q.size(0) == k_cache.size(0), fn, ": q and the caches must have the same batch size");
  }
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3), Hk = k_cache.size(2);
  TORCH_CHECK(D % 8 == 0 && D >= 8 && D <= 256, fn, ": head_dim must be a multiple of 8 up to 256, got ", D);
  TORCH_CHECK(q.stride(3) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1, fn,
              ": last dim must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), fn, ": dtypes");
  TORCH_CHECK(cache_lens.scalar_type() == at::kInt && cache_lens.is_contiguous() && cache_lens.numel() == B, fn,
              ": cache_seqlens must be contiguous int32 (batch,)");
  TORCH_CHECK(B <= 65535 && Hk <= 65535, fn, ": batch and kv heads are limited to 65535");
  TORCH_CHECK(k_cache.size(1) <= std::numeric_limits<int32_t>::max(), fn, ": cache too long");
  const DType type = attn_dtype(q.scalar_type(), fn);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({B, Sq, Hq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  if (B == 0 || Sq == 0 || Hq == 0) return {out, lse};

  FlashAttnKvcacheArgs a{};
  a.type = type;
  a.q = q.const_data_ptr();
  a.k = k_cache.const_data_ptr();
  a.v = v_cache.const_data_ptr();
  a.lens = cache_lens.const_data_ptr<int32_t>();
  a.block_table = paged ? block_table->const_data_ptr<int32_t>() : nullptr;
  a.out = out.mutable_data_ptr();
  a.lse = lse.mutable_data_ptr<float>();
  for (int i = 0; i < 3; ++i) {
    a.q_strides[i] = stride_or_zero(q, i);
    a.k_strides[i] = stride_or_zero(k_cache, i);
    a.v_strides[i] = stride_or_zero(v_cache, i);
  }
  a.B = B;
  a.Sq = Sq;
  a.Hq = Hq;
  a.Hk = Hk;
  a.D = D;
  if (paged) {
    a.block_table_stride = block_table->stride(0);
    a.block_size = k_cache.size(1);
    a.num_blocks = k_cache.size(0);
    a.cache_len = block_table->size(1) * k_cache.size(1);
  } else {
    a.cache_len = k_cache.size(1);
  }
  a.softmax_scale = softmax_scale;
  a.causal = causal;
  a.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  a.splits = 0;
  const FlashAttnKvcachePlan plan = flash_attn_kvcache_plan(a);
  TORCH_CHECK(plan.blocks_x <= std::numeric_limits<int32_t>::max(), fn, ": too many query rows");
  at::Tensor workspace;
  if (plan.workspace_floats > 0) workspace = at::empty({plan.workspace_floats}, q.options().dtype(at::kFloat));
  flash_attn_kvcache_launch(a, plan.workspace_floats > 0 ? workspace.mutable_data_ptr<float>() : nullptr,
                            c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

}  // namespace ifast::cuda
