// A decode step's rotary + KV-cache append on NVIDIA GPUs (sm_80, sm_90), one pass over the new
// tokens' qkv. Same contract and rounding points as cpp/cpu/decode_rotary_append.cpp; reference:
// internlm_fast/ops/inference.py::decode_rotary_append_ref. CUDA headers only (no torch), so nvcc
// is quick.
#include "device_common.cuh"
#include "kernels.h"

#include <cstdint>

namespace ifast::cuda {
namespace {

// Products and sums rounded one by one (no fused multiply-add), as the CPU kernel and the torch
// reference compute the rotation.
__device__ __forceinline__ float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
__device__ __forceinline__ float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
__device__ __forceinline__ float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

struct RotaryParams {
  void* qkv;
  void* kv;
  const float *cos, *sin;
  const int64_t *positions, *slots;
  int64_t tokens, q_heads, kv_heads, D, rd2, n_positions, n_rows;
};

// Thread (token, head, u < ceil(D / 2)): q and k heads rotate the pair (u, u + rd2) for u < rd2 and
// k heads copy dims 2u, 2u + 1 (those below D) past the rotary ones; v heads copy dims 2u, 2u + 1.
// No element is touched by two threads, so the rotation works in place. fp64 is rotated in fp32,
// as the CPU kernel does.
template <typename T> __global__ void __launch_bounds__(256) rotary_append_kernel(const RotaryParams p) {
  const int64_t half = (p.D + 1) / 2, heads = p.q_heads + 2 * p.kv_heads;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.tokens * heads * half) return;
  const int64_t u = i % half, th = i / half, h = th % heads, t = th / heads;
  const int64_t pos = p.positions[t], slot = p.slots[t];
  // the host cannot check device-resident indices without a sync: such a token is left alone
  if (pos < 0 || pos >= p.n_positions || slot < 0 || slot >= p.n_rows) return;
  T* x = static_cast<T*>(p.qkv) + th * p.D;
  T* row = static_cast<T*>(p.kv) + slot * 2 * p.kv_heads * p.D;  // kv_heads keys, then values
  if (h < p.q_heads + p.kv_heads) {
    T* dst = h >= p.q_heads ? row + (h - p.q_heads) * p.D : nullptr;
    if (u < p.rd2) {
      const float x0 = static_cast<float>(to_acc(x[u])), x1 = static_cast<float>(to_acc(x[u + p.rd2]));
      const float c = p.cos[pos * p.rd2 + u], s = p.sin[pos * p.rd2 + u];
      const T y0 = from_acc<T>(sub_rn(mul_rn(x0, c), mul_rn(x1, s)));
      const T y1 = from_acc<T>(add_rn(mul_rn(x0, s), mul_rn(x1, c)));
      x[u] = y0;
      x[u + p.rd2] = y1;
      if (dst != nullptr) {
        dst[u] = y0;
        dst[u + p.rd2] = y1;
      }
    } else if (dst != nullptr) {
      dst[2 * u] = x[2 * u];
      if (2 * u + 1 < p.D) dst[2 * u + 1] = x[2 * u + 1];
    }
  } else {
    T* dst = row + (h - p.q_heads) * p.D;  // the values follow the kv_heads keys
    dst[2 * u] = x[2 * u];
    if (2 * u + 1 < p.D) dst[2 * u + 1] = x[2 * u + 1];
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

void decode_rotary_append_launch(const DecodeRotaryAppendArgs& a, cudaStream_t stream) {
  const int64_t total = a.tokens * (a.q_heads + 2 * a.kv_heads) * ((a.D + 1) / 2);
  if (total == 0) return;
  RotaryParams p{a.qkv, a.kv_rows, a.cos, a.sin, a.positions, a.slots, a.tokens, a.q_heads,
                 a.kv_heads, a.D, a.rd2, a.n_positions, a.n_rows};
  dispatch(a.type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    rotary_append_kernel<T><<<static_cast<unsigned>(ceil_div(total, 256)), 256, 0, stream>>>(p);
  });
}

}  // namespace ifast::cuda
