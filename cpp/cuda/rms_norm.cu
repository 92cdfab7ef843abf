// RMSNorm forward and backward on NVIDIA GPUs (sm_80, sm_90), optionally fused with the residual
// add. Same math and rounding points as cpp/cpu/rms_norm.cpp; reference:
// internlm_fast/ops/rms_norm.py::rms_norm_ref. CUDA headers only (no torch), so nvcc is quick.
//
// Layout: a group of blockDim.x threads (a warp for small H) owns one row; a block holds
// blockDim.y such groups and walks rows grid-stride. Each pass over a row reads 16 bytes per
// thread per step when every pointer is aligned and H is a multiple of the vector width,
// one element otherwise. A row is read twice (sum of squares, then scale); the second read hits
// L1/L2, so DRAM sees each byte once.
#include "device_common.cuh"
#include "kernels.h"

#include <algorithm>
#include <cstdint>

namespace ifast::cuda {
namespace {

constexpr int kMaxThreads = 512;  // per block; keeps 128 registers per thread for the backward

// Sum over the blockDim.x threads sharing a row, returned to all of them. A fixed shuffle tree,
// then the warps' partials in warp order: the same bits on every run. Every thread of the block
// must call it (it may synchronise the block).
template <typename A> __device__ __forceinline__ A row_sum(A v, A* red) {
  v = warp_sum(v);
  if (blockDim.x == 32) return v;
  const int nw = blockDim.x >> 5, lane = threadIdx.x & 31;
  A* r = red + threadIdx.y * nw;
  __syncthreads();  // the previous row's readers are done with red
  if (lane == 0) r[threadIdx.x >> 5] = v;
  __syncthreads();
  return warp_sum(lane < nw ? r[lane] : A(0));
}

__device__ __forceinline__ float inv_rms(float ms) { return rsqrtf(ms); }
__device__ __forceinline__ double inv_rms(double ms) { return 1.0 / sqrt(ms); }

template <typename T, typename TW, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    fwd_kernel(const T* __restrict__ x, const T* __restrict__ residual, const TW* __restrict__ w,
               T* y, T* res_out, acc_t<T>* rstd, int64_t rows, int H, acc_t<T> eps) {
  using A = acc_t<T>;
  __shared__ A red[kMaxThreads / 32];
  const int nvec = H / VEC, tx = threadIdx.x, G = blockDim.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  // the loop bound is uniform across the block, so row_sum's barriers are reached by all threads
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows; base += step) {
    const int64_t row = base + threadIdx.y;
    const bool active = row < rows;
    const int64_t off = active ? row * H : 0;
    A ss = 0;
    if (active && residual != nullptr) {
      // normalise the rounded sum, exactly what the caller gets back as residual_out
      for (int i = tx; i < nvec; i += G) {
        const Pack<T, VEC> a = load_pack<VEC>(x + off, i), b = load_pack<VEC>(residual + off, i);
        Pack<T, VEC> s;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          s.v[j] = from_acc<T>(to_acc(a.v[j]) + to_acc(b.v[j]));
          const A v = to_acc(s.v[j]);
          ss += v * v;
        }
        store_pack<VEC>(res_out + off, i, s);
      }
    } else if (active) {
      for (int i = tx; i < nvec; i += G) {
        const Pack<T, VEC> a = load_pack<VEC>(x + off, i);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const A v = to_acc(a.v[j]);
          ss += v * v;
        }
      }
    }
    ss = row_sum(ss, red);
    if (!active) continue;
    const A rs = inv_rms(ss / static_cast<A>(H) + eps);
    if (tx == 0) rstd[row] = rs;
    // each thread re-reads only the elements it wrote itself: no barrier needed for res_out
    const T* src = residual != nullptr ? res_out + off : x + off;
    for (int i = tx; i < nvec; i += G) {
      const Pack<T, VEC> a = load_pack<VEC>(src, i);
      const Pack<TW, VEC> wv = load_pack<VEC>(w, i);
      Pack<T, VEC> o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) o.v[j] = from_acc<T>(to_acc(a.v[j]) * rs * to_acc(wv.v[j]));
      store_pack<VEC>(y + off, i, o);
    }
  }
}

// Per-thread dweight accumulators: 32 floats (16 doubles) in registers; a row wider than
// blockDim.x * that keeps the excess in the thread's own slots of the workspace instead.
template <typename A, int VEC> constexpr int kRegChunks = (sizeof(A) == 8 ? 16 : 32) / VEC;

// dx = rstd * (g - xhat * mean(g * xhat)) (+ dresidual), g = dy * w; dweight partial sums of
// dy * xhat into partial[(blockIdx.x * blockDim.y + threadIdx.y) * H + col]. Up to 128 registers
// a thread (minBlocks 1: a lower cap makes ptxas spill the accumulators), so 512 threads an SM.
template <typename T, typename TW, int VEC>
__global__ void __launch_bounds__(kMaxThreads, 1)
    bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const TW* __restrict__ w,
               const acc_t<T>* __restrict__ rstd, const T* __restrict__ dres, T* __restrict__ dx,
               acc_t<T>* __restrict__ partial, int64_t rows, int H) {
  using A = acc_t<T>;
  constexpr int KREG = kRegChunks<A, VEC>;
  __shared__ A red[kMaxThreads / 32];
  const int nvec = H / VEC, tx = threadIdx.x, G = blockDim.x;
  const int K = (nvec + G - 1) / G;  // vectors per thread in a row
  A* pw = partial + (static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y) * H;
  A acc[KREG][VEC];
#pragma unroll
  for (int k = 0; k < KREG; ++k)
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[k][j] = 0;
  for (int k = KREG; k < K; ++k) {
    const int i = tx + k * G;
    if (i < nvec)
      for (int j = 0; j < VEC; ++j) pw[i * VEC + j] = 0;
  }

  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows; base += step) {
    const int64_t row = base + threadIdx.y;
    const bool active = row < rows;
    const int64_t off = active ? row * H : 0;
    const A rs = active ? rstd[row] : A(0);
    A dot = 0;
    // one vector of the first pass: the row's dot product and this thread's dweight columns
    auto first = [&](int i, A* a) {
      const Pack<T, VEC> d = load_pack<VEC>(dy + off, i), xv = load_pack<VEC>(x + off, i);
      const Pack<TW, VEC> wv = load_pack<VEC>(w, i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A dj = to_acc(d.v[j]), xj = to_acc(xv.v[j]);
        dot += dj * to_acc(wv.v[j]) * xj;
        a[j] += dj * xj * rs;
      }
    };
    if (active) {
#pragma unroll
      for (int k = 0; k < KREG; ++k) {
        const int i = tx + k * G;
        if (i < nvec) first(i, acc[k]);
      }
      for (int k = KREG; k < K; ++k) {
        const int i = tx + k * G;
        if (i < nvec) first(i, pw + i * VEC);
      }
    }
    dot = row_sum(dot, red);
    if (!active) continue;
    const A c = dot * rs * rs / static_cast<A>(H);
    for (int i = tx; i < nvec; i += G) {
      const Pack<T, VEC> d = load_pack<VEC>(dy + off, i), xv = load_pack<VEC>(x + off, i);
      const Pack<TW, VEC> wv = load_pack<VEC>(w, i);
      Pack<T, VEC> o;
      if (dres != nullptr) {
        const Pack<T, VEC> r = load_pack<VEC>(dres + off, i);
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          o.v[j] = from_acc<T>(rs * (to_acc(d.v[j]) * to_acc(wv.v[j]) - to_acc(xv.v[j]) * c) +
                               to_acc(r.v[j]));
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          o.v[j] = from_acc<T>(rs * (to_acc(d.v[j]) * to_acc(wv.v[j]) - to_acc(xv.v[j]) * c));
      }
      store_pack<VEC>(dx + off, i, o);
    }
  }

#pragma unroll
  for (int k = 0; k < KREG; ++k) {
    const int i = tx + k * G;
    if (i < nvec)
#pragma unroll
      for (int j = 0; j < VEC; ++j) pw[i * VEC + j] = acc[k][j];
  }
}

// dw[col] = sum over the P partial rows, in a fixed order: 8 strided slices per column, then
// the slices in slice order. Block (32, 8): a warp reads 32 consecutive columns (coalesced).
template <typename A, typename TD>
__global__ void __launch_bounds__(256)
    dw_reduce_kernel(const A* __restrict__ partial, TD* __restrict__ dw, int64_t P, int H) {
  __shared__ A s[8][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  A v = 0;
  if (col < H)
    for (int64_t p = threadIdx.y; p < P; p += 8) v += partial[p * H + col];
  s[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.y == 0 && col < H) {
    A t = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) t += s[j][threadIdx.x];
    dw[col] = from_acc<TD>(t);
  }
}

// ---------------------------------------------------------------------------------------------
// host side

// (x storage, weight storage): the weight is x's dtype or x's accumulation type (see kernels.h)
template <typename F> void dispatch(DType xt, DType wt, F&& f) {
  switch (xt) {
    case DType::kFloat32: return f(Tag<float>{}, Tag<float>{});
    case DType::kFloat64: return f(Tag<double>{}, Tag<double>{});
    case DType::kBFloat16:
      if (wt == DType::kBFloat16) return f(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
      return f(Tag<__nv_bfloat16>{}, Tag<float>{});
    case DType::kFloat16:
      if (wt == DType::kFloat16) return f(Tag<__half>{}, Tag<__half>{});
      return f(Tag<__half>{}, Tag<float>{});
  }
}

struct Plan {
  bool vec;
  int threads, rows_per_block;
  unsigned blocks;
};

// Threads per row: the smallest power of two in [32, 512] giving each thread at most 4 vectors;
// small rows share a 256-thread block. The backward launches the 512 threads per SM its registers
// allow and walks the rows grid-stride, which bounds the dweight workspace to a few rows per SM.
template <typename T, typename TW>
Plan make_plan(bool vec_ok, int64_t rows, int64_t H, bool bwd) {
  constexpr int V = 16 / sizeof(T);
  const int64_t nvec = vec_ok ? H / V : H;
  int G = 32;
  while (G < kMaxThreads && G * 4 < nvec) G *= 2;
  const int R = std::max(1, 256 / G);
  const int64_t needed = (rows + R - 1) / R;
  const int64_t cap = bwd ? static_cast<int64_t>(sm_count()) * std::max(1, 512 / (G * R))
                          : int64_t{1} << 30;
  return Plan{vec_ok, G, R, static_cast<unsigned>(std::max<int64_t>(1, std::min(needed, cap)))};
}

template <typename T, typename TW> bool fwd_vec_ok(const RmsNormFwdArgs& a) {
  constexpr int V = 16 / sizeof(T);
  return a.H % V == 0 && aligned(a.x, 16) && aligned(a.residual, 16) && aligned(a.y, 16) &&
         aligned(a.residual_out, 16) && aligned(a.w, pack_align(V * sizeof(TW)));
}

template <typename T, typename TW> bool bwd_vec_ok(const RmsNormBwdArgs& a) {
  constexpr int V = 16 / sizeof(T);
  return a.H % V == 0 && aligned(a.dy, 16) && aligned(a.x, 16) && aligned(a.dresidual, 16) &&
         aligned(a.dx, 16) && aligned(a.w, pack_align(V * sizeof(TW)));
}

template <typename T, typename TW> Plan bwd_plan(const RmsNormBwdArgs& a) {
  return make_plan<T, TW>(bwd_vec_ok<T, TW>(a), a.rows, a.H, true);
}

template <typename A, typename F> void dispatch_dw(DType dt, F&& f) {
  if constexpr (sizeof(A) == 8) {
    f(Tag<double>{});
  } else {
    switch (dt) {
      case DType::kBFloat16: return f(Tag<__nv_bfloat16>{});
      case DType::kFloat16: return f(Tag<__half>{});
      default: return f(Tag<float>{});
    }
  }
}

}  // namespace

void rms_norm_fwd_launch(const RmsNormFwdArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return;
  dispatch(a.x_type, a.w_type, [&](auto tt, auto tw) {
    using T = typename decltype(tt)::type;
    using TW = typename decltype(tw)::type;
    using A = acc_t<T>;
    constexpr int V = 16 / sizeof(T);
    const Plan p = make_plan<T, TW>(fwd_vec_ok<T, TW>(a), a.rows, a.H, false);
    const dim3 block(p.threads, p.rows_per_block);
    const auto x = static_cast<const T*>(a.x), r = static_cast<const T*>(a.residual);
    const auto w = static_cast<const TW*>(a.w);
    const auto y = static_cast<T*>(a.y), ro = static_cast<T*>(a.residual_out);
    const auto rstd = static_cast<A*>(a.rstd);
    const int H = static_cast<int>(a.H);
    const auto eps = static_cast<A>(a.eps);
    if (p.vec)
      fwd_kernel<T, TW, V><<<p.blocks, block, 0, stream>>>(x, r, w, y, ro, rstd, a.rows, H, eps);
    else
      fwd_kernel<T, TW, 1><<<p.blocks, block, 0, stream>>>(x, r, w, y, ro, rstd, a.rows, H, eps);
  });
}

int64_t rms_norm_bwd_workspace_rows(const RmsNormBwdArgs& a) {
  int64_t n = 0;
  if (a.rows == 0 || a.H == 0) return 0;
  dispatch(a.x_type, a.w_type, [&](auto tt, auto tw) {
    const Plan p = bwd_plan<typename decltype(tt)::type, typename decltype(tw)::type>(a);
    n = static_cast<int64_t>(p.blocks) * p.rows_per_block;
  });
  return n;
}

void rms_norm_bwd_launch(const RmsNormBwdArgs& a, void* workspace, cudaStream_t stream) {
  if (a.rows == 0 || a.H == 0) return;  // the host fills dweight with zeros
  dispatch(a.x_type, a.w_type, [&](auto tt, auto tw) {
    using T = typename decltype(tt)::type;
    using TW = typename decltype(tw)::type;
    using A = acc_t<T>;
    constexpr int V = 16 / sizeof(T);
    const Plan p = bwd_plan<T, TW>(a);
    const dim3 block(p.threads, p.rows_per_block);
    const auto dy = static_cast<const T*>(a.dy), x = static_cast<const T*>(a.x);
    const auto w = static_cast<const TW*>(a.w);
    const auto rstd = static_cast<const A*>(a.rstd);
    const auto dres = static_cast<const T*>(a.dresidual);
    const auto dx = static_cast<T*>(a.dx);
    const auto ws = static_cast<A*>(workspace);
    const int H = static_cast<int>(a.H);
    if (p.vec)
      bwd_kernel<T, TW, V><<<p.blocks, block, 0, stream>>>(dy, x, w, rstd, dres, dx, ws, a.rows, H);
    else
      bwd_kernel<T, TW, 1><<<p.blocks, block, 0, stream>>>(dy, x, w, rstd, dres, dx, ws, a.rows, H);
    const int64_t P = static_cast<int64_t>(p.blocks) * p.rows_per_block;
    dispatch_dw<A>(a.dw_type, [&](auto td) {
      using TD = typename decltype(td)::type;
      dw_reduce_kernel<A, TD>
          <<<(H + 31) / 32, dim3(32, 8), 0, stream>>>(ws, static_cast<TD*>(a.dw), P, H);
    });
  });
}

}  // namespace ifast::cuda
