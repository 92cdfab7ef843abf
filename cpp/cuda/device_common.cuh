// Helpers shared by the kernels in cpp/cuda: the accumulation type and the conversions to and from
// it, 16-byte packs, the warp sum, and the launchers' dtype dispatch and device queries. CUDA
// headers only (no torch), like the .cu files that include it.
#pragma once

#include "kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace ifast::cuda {

// fp32 accumulation for every storage type except fp64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }

template <typename T> struct Cvt;
template <> struct Cvt<float> { __device__ static float of(float v) { return v; } };
template <> struct Cvt<double> { __device__ static double of(double v) { return v; } };
// round to nearest even; NaN stays NaN
template <> struct Cvt<__nv_bfloat16> {
  __device__ static __nv_bfloat16 of(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Cvt<__half> { __device__ static __half of(float v) { return __float2half_rn(v); } };
template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) { return Cvt<T>::of(v); }

// N contiguous elements moved as one access of up to 16 bytes (a 32-byte pack, an fp32 weight
// beside bf16/fp16 data, as two).
constexpr size_t pack_align(size_t bytes) { return bytes < 16 ? bytes : 16; }
template <typename T, int N> struct alignas(pack_align(sizeof(T) * N)) Pack { T v[N]; };

template <int N, typename T> __device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}
template <int N, typename T> __device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}
// the i-th pack from p
template <int N, typename T> __device__ __forceinline__ Pack<T, N> load_pack(const T* p, int i) {
  return load_pack<N>(p + static_cast<int64_t>(i) * N);
}
template <int N, typename T> __device__ __forceinline__ void store_pack(T* p, int i, const Pack<T, N>& v) {
  store_pack<N>(p + static_cast<int64_t>(i) * N, v);
}

// A fixed shuffle tree: the same bits on every run. The whole warp must call it.
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---------------------------------------------------------------------------------------------
// host side

template <typename T> struct Tag { using type = T; };

// f(Tag<T>{}) for the storage type T that t names. kF64 false: nothing for fp64, for launchers
// whose host refuses it first (no fp64 kernels are instantiated).
template <bool kF64 = true, typename F> void dispatch(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kFloat64:
      if constexpr (kF64) f(Tag<double>{});
      return;
    case DType::kBFloat16: return f(Tag<__nv_bfloat16>{});
    case DType::kFloat16: return f(Tag<__half>{});
  }
}

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 1;  // the launch that follows reports the error
  return n > 0 ? n : 1;
}

}  // namespace ifast::cuda
