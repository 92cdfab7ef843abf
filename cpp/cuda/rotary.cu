// Rotary position embedding on NVIDIA GPUs (sm_80, sm_90), flash-attn's apply_rotary. Same math
// and rounding points as cpp/cpu/rotary.cpp (fp32 math, fp64 for fp64 x, one rounding to x's
// dtype); reference: internlm_fast/ops/rotary.py::apply_rotary_ref. CUDA headers only (no torch).
//
// Layout: a group of blockDim.x threads owns one token; a block holds blockDim.y such groups and
// walks the tokens grid-stride. A token's work is heads x units: a rotary unit is P pairs (16 bytes
// of x per half, or 16 bytes of interleaved pairs, when every pointer and stride allows it; one
// pair otherwise), a tail unit as many of the dims past rotary_dim, copied only when out is not x.
// A unit reads all its elements before writing them and no element belongs to two units, so out
// may be x. x is read and out written once; a token's cos/sin row is shared by its heads and
// comes from L1.
#include "device_common.cuh"
#include "kernels.h"

#include <algorithm>
#include <cstdint>

namespace ifast::cuda {
namespace {

constexpr int kThreads = 256;

// N consecutive elements: aligned 16-byte accesses (fewer bytes for a short pack) on the vector
// path, N element accesses otherwise.
template <int N, bool kVec, typename T>
__device__ __forceinline__ Pack<T, N> load_n(const T* p) {
  if constexpr (kVec) {
    return load_pack<N>(p);
  } else {
    Pack<T, N> r;
#pragma unroll
    for (int j = 0; j < N; ++j) r.v[j] = p[j];
    return r;
  }
}
template <int N, bool kVec, typename T>
__device__ __forceinline__ void store_n(T* p, const Pack<T, N>& v) {
  if constexpr (kVec) {
    store_pack<N>(p, v);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) p[j] = v.v[j];
  }
}

// 32-bit division when both operands fit (always, in practice): a 64-bit one is a long subroutine.
__device__ __forceinline__ int64_t div_s64(int64_t a, int64_t b) {
  if (((a | b) >> 31) == 0) return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  return a / b;
}

struct Geo {
  int64_t tokens, seqlen, batch, rd2;
  int64_t xs_b, xs_s, xs_h, os_b, os_s, os_h;
  int heads, units, rot_units;  // units per head: rot_units rotary ones, then the tail's
};

template <typename T, typename C, bool kInterleaved, int P, bool kVec>
__global__ void __launch_bounds__(kThreads)
    rotary_kernel(const T* x, T* out, const C* __restrict__ cos, const C* __restrict__ sin,
                  const int64_t* __restrict__ offsets, const int32_t* __restrict__ cu, Geo g,
                  acc_t<T> sgn) {
  using A = acc_t<T>;
  constexpr int TW = kVec ? 16 / sizeof(T) : 1;  // elements per tail unit
  const int per_token = g.heads * g.units;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; t < g.tokens; t += step) {
    int64_t b, s;
    const T* xt;
    T* ot;
    if (cu != nullptr) {
      // the sequence holding t: cu[lo] <= t < cu[hi] throughout, so empty sequences are skipped
      int64_t lo = 0, hi = g.batch;
      while (hi - lo > 1) {
        const int64_t mid = (lo + hi) >> 1;
        if (cu[mid] <= t) lo = mid;
        else hi = mid;
      }
      b = lo;
      s = t - cu[b];
      xt = x + t * g.xs_s;
      ot = out + t * g.os_s;
    } else {
      b = div_s64(t, g.seqlen);
      s = t - b * g.seqlen;
      xt = x + b * g.xs_b + s * g.xs_s;
      ot = out + b * g.os_b + s * g.os_s;
    }
    const int64_t row = (offsets[b] + s) * g.rd2;
    const C* cr = cos + row;
    const C* sr = sin + row;
    for (int j = threadIdx.x; j < per_token; j += blockDim.x) {
      const int h = j / g.units, k = j - h * g.units;
      const T* xh = xt + h * g.xs_h;
      T* oh = ot + h * g.os_h;
      if (k < g.rot_units) {
        const int64_t i = static_cast<int64_t>(k) * P;  // first pair of the unit
        const Pack<C, P> c = load_n<P, kVec>(cr + i), sn = load_n<P, kVec>(sr + i);
        if constexpr (kInterleaved) {
          const Pack<T, 2 * P> v = load_n<2 * P, kVec>(xh + 2 * i);
          Pack<T, 2 * P> o;
#pragma unroll
          for (int q = 0; q < P; ++q) {
            const A x0 = to_acc(v.v[2 * q]), x1 = to_acc(v.v[2 * q + 1]);
            const A cq = to_acc(c.v[q]), sq = sgn * static_cast<A>(to_acc(sn.v[q]));
            o.v[2 * q] = from_acc<T>(x0 * cq - x1 * sq);
            o.v[2 * q + 1] = from_acc<T>(x0 * sq + x1 * cq);
          }
          store_n<2 * P, kVec>(oh + 2 * i, o);
        } else {
          const Pack<T, P> v0 = load_n<P, kVec>(xh + i), v1 = load_n<P, kVec>(xh + i + g.rd2);
          Pack<T, P> o0, o1;
#pragma unroll
          for (int q = 0; q < P; ++q) {
            const A x0 = to_acc(v0.v[q]), x1 = to_acc(v1.v[q]);
            const A cq = to_acc(c.v[q]), sq = sgn * static_cast<A>(to_acc(sn.v[q]));
            o0.v[q] = from_acc<T>(x0 * cq - x1 * sq);
            o1.v[q] = from_acc<T>(x0 * sq + x1 * cq);
          }
          store_n<P, kVec>(oh + i, o0);
          store_n<P, kVec>(oh + i + g.rd2, o1);
        }
      } else {
        const int64_t e = 2 * g.rd2 + static_cast<int64_t>(k - g.rot_units) * TW;
        store_n<TW, kVec>(oh + e, load_n<TW, kVec>(xh + e));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// host side

// (x storage, cos/sin storage): cos/sin are x's dtype or fp32
template <typename F> void dispatch(DType xt, DType ct, F&& f) {
  const bool f32 = ct == DType::kFloat32;
  switch (xt) {
    case DType::kFloat32: return f(Tag<float>{}, Tag<float>{});
    case DType::kFloat64:
      if (f32) return f(Tag<double>{}, Tag<float>{});
      return f(Tag<double>{}, Tag<double>{});
    case DType::kBFloat16:
      if (f32) return f(Tag<__nv_bfloat16>{}, Tag<float>{});
      return f(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
    case DType::kFloat16:
      if (f32) return f(Tag<__half>{}, Tag<float>{});
      return f(Tag<__half>{}, Tag<__half>{});
  }
}

// Pairs per rotary unit on the vector path: 16 bytes of x per half (half-rotated) or in all
// (interleaved).
template <typename T, bool kInterleaved> constexpr int kVecPairs = kInterleaved ? 8 / sizeof(T) : 16 / sizeof(T);

template <typename T, typename C, bool kInterleaved> bool vec_ok(const RotaryArgs& a, bool copy_tail) {
  constexpr int V = 16 / sizeof(T), P = kVecPairs<T, kInterleaved>;
  const int64_t strides[] = {a.x_stride_batch, a.x_stride_seq, a.x_stride_head,
                             a.out_stride_batch, a.out_stride_seq, a.out_stride_head};
  for (int64_t s : strides)
    if (s % V != 0) return false;
  // rd2 % P == 0 also keeps every cos/sin row's start aligned for a P-element access
  return a.rd2 % P == 0 && (!copy_tail || a.head_dim % V == 0) && aligned(a.x, 16) &&
         aligned(a.out, 16) && aligned(a.cos, pack_align(P * sizeof(C))) &&
         aligned(a.sin, pack_align(P * sizeof(C)));
}

template <typename T, typename C, bool kInterleaved, int P, bool kVec>
void launch(const RotaryArgs& a, bool copy_tail, cudaStream_t stream) {
  constexpr int TW = kVec ? 16 / sizeof(T) : 1;
  Geo g{};
  g.tokens = a.cu_seqlens != nullptr ? a.seqlen : a.batch * a.seqlen;
  g.seqlen = a.seqlen;
  g.batch = a.batch;
  g.rd2 = a.rd2;
  g.xs_b = a.x_stride_batch;
  g.xs_s = a.x_stride_seq;
  g.xs_h = a.x_stride_head;
  g.os_b = a.out_stride_batch;
  g.os_s = a.out_stride_seq;
  g.os_h = a.out_stride_head;
  g.heads = static_cast<int>(a.heads);
  g.rot_units = static_cast<int>(a.rd2 / P);
  g.units = g.rot_units + (copy_tail ? static_cast<int>((a.head_dim - 2 * a.rd2) / TW) : 0);
  // threads per token: a power of two covering the token's units, at most a block; a token of
  // few units shares its block with others
  const int64_t per_token = static_cast<int64_t>(g.heads) * g.units;
  int G = 1;
  while (G < kThreads && G < per_token) G *= 2;
  const int R = kThreads / G;
  // a few waves of resident blocks; the rest of the tokens grid-stride
  const int64_t cap = static_cast<int64_t>(sm_count()) * (2048 / kThreads) * 4;
  const int64_t blocks = std::max<int64_t>(1, std::min((g.tokens + R - 1) / R, cap));
  using A = acc_t<T>;
  rotary_kernel<T, C, kInterleaved, P, kVec><<<static_cast<unsigned>(blocks), dim3(G, R), 0, stream>>>(
      static_cast<const T*>(a.x), static_cast<T*>(a.out), static_cast<const C*>(a.cos),
      static_cast<const C*>(a.sin), a.seqlen_offsets, a.cu_seqlens, g, a.conjugate ? A(-1) : A(1));
}

template <typename T, typename C, bool kInterleaved> void launch_mode(const RotaryArgs& a, cudaStream_t stream) {
  const bool copy_tail = 2 * a.rd2 < a.head_dim && a.out != a.x;
  if (vec_ok<T, C, kInterleaved>(a, copy_tail))
    launch<T, C, kInterleaved, kVecPairs<T, kInterleaved>, true>(a, copy_tail, stream);
  else
    launch<T, C, kInterleaved, 1, false>(a, copy_tail, stream);
}

}  // namespace

void rotary_launch(const RotaryArgs& a, cudaStream_t stream) {
  const int64_t tokens = a.cu_seqlens != nullptr ? a.seqlen : a.batch * a.seqlen;
  if (tokens == 0 || a.heads == 0 || a.rd2 == 0) return;
  dispatch(a.x_type, a.cs_type, [&](auto tt, auto tc) {
    using T = typename decltype(tt)::type;
    using C = typename decltype(tc)::type;
    if (a.interleaved)
      launch_mode<T, C, true>(a, stream);
    else
      launch_mode<T, C, false>(a, stream);
  });
}

}  // namespace ifast::cuda
