// SwiGLU on NVIDIA GPUs (sm_80, sm_90): out = silu(gate) * up and its backward, each one pass
// over memory. Same math and rounding points as cpp/cpu/swiglu.cpp: fp32 math (fp64 for fp64),
// the same clamps (silu(-inf) = 0, silu'(+inf) = 1, NaN stays NaN), one rounding to the output
// dtype. The sigmoid of fp32 data is the CPU's to the bit (its exp polynomial, a correctly rounded
// reciprocal, whatever --use_fast_math does to expf and division). For bf16/fp16 data it is the
// hardware's exp2 and reciprocal instead, a few fp32 ulps off, far below the 16-bit rounding that
// follows: the exact path costs ~30 instructions an element against ~12, and at the few bytes an
// element of 16-bit data that would take most of an H100/H200's issue rate (estimated from the
// SASS, not measured), leaving the kernel short of memory-bound.
// Reference: internlm_fast/ops/swiglu.py::swiglu_ref. CUDA headers only (no torch).
//
// Layout: blockDim.x threads walk a row's vectors (16 bytes of each operand when every pointer and
// row stride is aligned and F is a multiple of the vector width, one element otherwise), blockDim.y
// rows share a block; grid.x covers a row, grid.y strides over the rows. gate and up may be
// row-strided views (the halves of a packed [rows, 2F] tensor), so the packed variant never copies.
#include "device_common.cuh"
#include "kernels.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace ifast::cuda {
namespace {

constexpr int kThreads = 256;

// Beyond -kSat the sigmoid is below 2e-35 (float) / 1e-304 (double): silu is 0 to every digit a
// caller sees, and clamping there keeps exp and the sigmoid out of overflow and denormals (which
// --use_fast_math flushes). Without it silu(-inf) = -inf * 0 = NaN.
template <typename A> constexpr A kSat = A(80);
template <> constexpr double kSat<double> = 700.0;

// cpp/cpu/common.h's fast_exp, operation for operation (explicit _rn intrinsics: nothing fused or
// approximated): x = n*ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial, 2^n by exponent
// bits. n = rint(x * log2(e)) by the 1.5 * 2^23 trick, exact for |x * log2(e)| < 2^22.
__device__ __forceinline__ float fast_exp(float x) {
  // compares, not fminf/fmaxf: a NaN input must stay NaN
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.7f ? 88.7f : x;
  constexpr float kMagic = 12582912.0f;
  const float t = __fadd_rn(__fmul_rn(x, 1.44269504088896341f), kMagic);
  const float n = __fadd_rn(t, -kMagic);
  float r = __fmaf_rn(n, -0.693145751953125f, x);
  r = __fmaf_rn(n, -1.428606765330187045e-06f, r);
  float p = 1.3981999507e-3f;
  p = __fmaf_rn(p, r, 8.3334519073e-3f);
  p = __fmaf_rn(p, r, 4.1665795894e-2f);
  p = __fmaf_rn(p, r, 1.6666665459e-1f);
  p = __fmaf_rn(p, r, 5.0000001201e-1f);
  p = __fmaf_rn(p, __fmul_rn(r, r), __fadd_rn(r, 1.0f));
  // t's mantissa holds magic + n: its bits minus magic's are n
  const int e = static_cast<int>(__float_as_uint(t) - __float_as_uint(kMagic)) + 127;
  return __fmul_rn(p, __uint_as_float(static_cast<unsigned>(e) << 23));
}

// 1 / (1 + exp(-xc)) for xc >= -kSat (so 1 + exp(-xc) < 2^126, where the hardware reciprocal is
// exact to an ulp); T is the storage type, which picks the exact or the fast path.
template <typename T> __device__ __forceinline__ float sigmoid_of_clamped(float xc) {
  if constexpr (sizeof(T) == 2) return __fdividef(1.0f, 1.0f + __expf(-xc));
  else return __frcp_rn(__fadd_rn(1.0f, fast_exp(-xc)));
}
template <typename T> __device__ __forceinline__ double sigmoid_of_clamped(double xc) {
  return 1.0 / (1.0 + exp(-xc));
}

template <typename T, typename A> __device__ __forceinline__ A swiglu_of(A x, A u) {
  constexpr A sat = kSat<A>;
  // ternaries, not fmin/fmax: NaN must stay NaN
  const A xc = x < -sat ? -sat : x;
  const A s = sigmoid_of_clamped<T>(xc);
  const A xz = x < -sat ? A(0) : x;
  return xz * s * u;
}

// silu'(x) = s * (1 + x * (1 - s)): its limits are 0 at -inf and 1 at +inf, where the formula
// itself gives inf * 0 = NaN; on x clamped above it is exactly 1 for every x > sat.
template <typename T, typename A> __device__ __forceinline__ void swiglu_grad(A x, A u, A d, A& dg, A& du) {
  constexpr A sat = kSat<A>;
  A xc = x < -sat ? -sat : x;
  xc = xc > sat ? sat : xc;
  const A s = sigmoid_of_clamped<T>(xc);
  const bool zero = x < -sat;
  const A dsilu = zero ? A(0) : s * (A(1) + xc * (A(1) - s));
  const A silu = zero ? A(0) : x * s;
  dg = d * u * dsilu;
  du = d * silu;
}

// f(r, e) for this thread's share of the rows r < rows and the vectors of V elements starting at
// e in [0, F): rows grid-stride over y, vectors over x.
template <int V, typename Fn>
__device__ __forceinline__ void for_each_vec(int64_t rows, int64_t F, Fn&& f) {
  const int64_t nv = F / V;
  const int64_t rstep = static_cast<int64_t>(gridDim.y) * blockDim.y;
  const int64_t cstep = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += rstep)
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < nv; c += cstep)
      f(r, c * V);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    fwd_kernel(const T* __restrict__ g, int64_t gs, const T* __restrict__ u, int64_t us,
               T* __restrict__ out, int64_t rows, int64_t F) {
  using A = acc_t<T>;
  for_each_vec<V>(rows, F, [&](int64_t r, int64_t e) {
    const Pack<T, V> gv = load_pack<V>(g + r * gs + e), uv = load_pack<V>(u + r * us + e);
    Pack<T, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = from_acc<T>(swiglu_of<T, A>(to_acc(gv.v[j]), to_acc(uv.v[j])));
    store_pack<V>(out + r * F + e, o);
  });
}

// dgate and dup rows are os apart (F, or 2F with dup = dgate + F for the packed gradient).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    bwd_kernel(const T* __restrict__ dout, const T* __restrict__ g, int64_t gs, const T* __restrict__ u,
               int64_t us, T* __restrict__ dg, T* __restrict__ du, int64_t os, int64_t rows, int64_t F) {
  using A = acc_t<T>;
  for_each_vec<V>(rows, F, [&](int64_t r, int64_t e) {
    const Pack<T, V> dv = load_pack<V>(dout + r * F + e), gv = load_pack<V>(g + r * gs + e);
    const Pack<T, V> uv = load_pack<V>(u + r * us + e);
    Pack<T, V> og, ou;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      A a, b;
      swiglu_grad<T, A>(to_acc(gv.v[j]), to_acc(uv.v[j]), to_acc(dv.v[j]), a, b);
      og.v[j] = from_acc<T>(a);
      ou.v[j] = from_acc<T>(b);
    }
    store_pack<V>(dg + r * os + e, og);
    store_pack<V>(du + r * os + e, ou);
  });
}

// ---------------------------------------------------------------------------------------------
// host side

struct Grid {
  dim3 grid, block;
};

// Threads across a row: a power of two covering its nv vectors, at most a block (narrow rows share
// a block). A few waves of resident blocks; the remaining rows are walked grid-stride.
Grid make_grid(int64_t rows, int64_t nv) {
  int G = 1;
  while (G < kThreads && G < nv) G *= 2;
  const int R = kThreads / G;
  const int64_t cap = static_cast<int64_t>(sm_count()) * (2048 / kThreads) * 4;
  const int64_t gx = std::max<int64_t>(1, std::min((nv + G - 1) / G, cap));
  const int64_t gy = std::max<int64_t>(1, std::min({(rows + R - 1) / R, cap / gx, int64_t{65535}}));
  return Grid{dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(G, R)};
}

// launch(grid, std::integral_constant<int, W>) starts the kernel of W-element vectors: 16 bytes
// when vec, else one element.
template <typename T, typename L> void launch_vec(bool vec, int64_t rows, int64_t F, L&& launch) {
  constexpr int V = 16 / sizeof(T);
  if (vec)
    launch(make_grid(rows, F / V), std::integral_constant<int, V>{});
  else
    launch(make_grid(rows, F), std::integral_constant<int, 1>{});
}

}  // namespace

void swiglu_fwd_launch(const SwigluFwdArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.F == 0) return;
  dispatch(a.type, [&](auto tt) {
    using T = typename decltype(tt)::type;
    constexpr int V = 16 / sizeof(T);
    const auto g = static_cast<const T*>(a.gate), u = static_cast<const T*>(a.up);
    const auto out = static_cast<T*>(a.out);
    const bool vec = a.F % V == 0 && a.gate_stride % V == 0 && a.up_stride % V == 0 && aligned(g, 16) &&
                     aligned(u, 16) && aligned(out, 16);
    launch_vec<T>(vec, a.rows, a.F, [&](const Grid& p, auto w) {
      fwd_kernel<T, decltype(w)::value>
          <<<p.grid, p.block, 0, stream>>>(g, a.gate_stride, u, a.up_stride, out, a.rows, a.F);
    });
  });
}

void swiglu_bwd_launch(const SwigluBwdArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.F == 0) return;
  dispatch(a.type, [&](auto tt) {
    using T = typename decltype(tt)::type;
    constexpr int V = 16 / sizeof(T);
    const auto d = static_cast<const T*>(a.dout), g = static_cast<const T*>(a.gate);
    const auto u = static_cast<const T*>(a.up);
    const auto dg = static_cast<T*>(a.dgate), du = static_cast<T*>(a.dup);
    const bool vec = a.F % V == 0 && a.gate_stride % V == 0 && a.up_stride % V == 0 &&
                     a.grad_stride % V == 0 && aligned(d, 16) && aligned(g, 16) &&
                     aligned(u, 16) && aligned(dg, 16) && aligned(du, 16);
    launch_vec<T>(vec, a.rows, a.F, [&](const Grid& p, auto w) {
      bwd_kernel<T, decltype(w)::value><<<p.grid, p.block, 0, stream>>>(
          d, g, a.gate_stride, u, a.up_stride, dg, du, a.grad_stride, a.rows, a.F);
    });
  });
}

}  // namespace ifast::cuda
