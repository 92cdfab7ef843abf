// Cross-entropy over a vocabulary on NVIDIA GPUs (sm_80, sm_90): the row-wise passes of
// cross_entropy_fwd / cross_entropy_bwd and of the fused linear cross-entropy, whose GEMMs run in
// cross_entropy_host.cpp. Same math as cpp/cpu/cross_entropy.cpp; reference:
// internlm_fast/ops/cross_entropy.py::cross_entropy_ref. CUDA headers only (no torch).
//
// Layout: a group of blockDim.x threads owns one row (the whole block for real vocabularies);
// small rows share a block as blockDim.y groups, and blocks walk the rows grid-stride. One read of
// the row keeps a running max and sum-of-exp per thread (online softmax), merged over the group by
// a fixed shuffle tree, so the bits do not depend on scheduling. The gradient pass reads the row
// once more (from L2) and writes (softmax - onehot) * scale, in place over the logits in the
// fused op. Rows are read in 16-byte vectors from their first 16-byte boundary on: a scalar head
// and tail cover any V and any row start.
#include "device_common.cuh"
#include "kernels.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>

namespace ifast::cuda {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kReduceThreads = 256;

// fmax ignores a NaN operand, so a NaN logit never becomes the running max; its exp term still
// makes the sum NaN, as it must.
__device__ __forceinline__ float amax(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double amax(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float aexp(float v) { return expf(v); }
__device__ __forceinline__ double aexp(double v) { return exp(v); }

// lowest, not -inf: -inf - -inf would be NaN for a row that starts with masked (-inf) logits
template <typename A> struct Lowest;
template <> struct Lowest<float> { static constexpr float value = -FLT_MAX; };
template <> struct Lowest<double> { static constexpr double value = -DBL_MAX; };

// Visits row[0, V) as this thread's share of the group: fs(col) for the scalar head (up to the
// first 16-byte boundary) and tail, fv(col) for VEC-element vectors starting at a 16-byte
// boundary. The same split for the same row start, so a second pass visits exactly the elements
// the first one did on every thread.
template <int VEC, typename T, typename FS, typename FV>
__device__ __forceinline__ void for_row(const T* row, int64_t V, FS&& fs, FV&& fv) {
  const int tx = threadIdx.x, G = blockDim.x;
  if constexpr (VEC == 1) {
    for (int64_t c = tx; c < V; c += G) fs(c);
  } else {
    const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) & 15) / sizeof(T);
    const int64_t head = mis == 0 ? 0 : (VEC - mis < V ? VEC - mis : V);
    const int64_t nvec = (V - head) / VEC, tail0 = head + nvec * VEC;
    if (tx < head) fs(tx);  // head, tail < VEC <= 8 <= G
#pragma unroll 2
    for (int64_t i = tx; i < nvec; i += G) fv(head + i * VEC);
    if (tail0 + tx < V) fs(tail0 + tx);
  }
}

// Online-softmax state (m, s): s = sum of exp(x - m) over the elements seen.
template <typename A> __device__ __forceinline__ void merge(A& m, A& s, A m2, A s2) {
  const A M = amax(m, m2);
  s = s * aexp(m - M) + s2 * aexp(m2 - M);
  m = M;
}

template <typename A> __device__ __forceinline__ void warp_merge(A& m, A& s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
}

// Merges the states of the blockDim.x threads sharing a row, returned to all of them: a fixed
// shuffle tree, then the warps' partials in warp order. Every thread of the block must call it.
// It always passes a barrier, which also orders the forward's read of logits[label] before the
// in-place gradient writes of the other threads.
template <typename A> __device__ __forceinline__ void group_merge(A& m, A& s, A* rm, A* rs) {
  warp_merge(m, s);
  const int nw = blockDim.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // the previous row's readers are done with rm/rs
  if (nw == 1) return;
  A* gm = rm + threadIdx.y * nw;
  A* gs = rs + threadIdx.y * nw;
  if (lane == 0) {
    gm[threadIdx.x >> 5] = m;
    gs[threadIdx.x >> 5] = s;
  }
  __syncthreads();
  m = lane < nw ? gm[lane] : Lowest<A>::value;
  s = lane < nw ? gs[lane] : A(0);
  warp_merge(m, s);
}

// FWD: log-sum-exp and per-row loss from the logits (else lse from lse_in). With g: the gradient
// (softmax - onehot) * scale, scale = (*dloss or 1) / max(*count, 1) (count null: 1); g may be x.
// Ignored rows are never read (a NaN there must not reach the loss); their gradient is zero.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    rows_kernel(const T* x, T* g, const int64_t* __restrict__ labels, const acc_t<T>* __restrict__ lse_in,
                acc_t<T>* __restrict__ lse_out, double* __restrict__ loss_rows,
                const acc_t<T>* __restrict__ dloss, const int64_t* __restrict__ count, int64_t rows, int64_t V,
                int64_t ldx, int64_t ldg, int64_t ignore) {
  using A = acc_t<T>;
  __shared__ A rm[kMaxThreads / 32], rs[kMaxThreads / 32];
  A scale = 0;
  if (g != nullptr) {
    // in double, then one rounding: the CPU kernel's scale bit for bit
    double sc = dloss != nullptr ? static_cast<double>(*dloss) : 1.0;
    if (count != nullptr) sc /= static_cast<double>(*count > 0 ? *count : 1);
    scale = static_cast<A>(sc);
  }
  const bool fwd = lse_in == nullptr;
  const int tx = threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  // the loop bound is uniform across the block, so group_merge's barriers are reached by all
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows; base += step) {
    const int64_t row = base + threadIdx.y;
    const bool active = row < rows;
    const int64_t label = active ? labels[row] : ignore;
    const bool live = active && label != ignore;
    // a label outside [0, V) is refused on the host; here it only must not be read
    const bool in_range = label >= 0 && label < V;
    const T* xr = x + (active ? row * ldx : 0);
    A lse = 0;
    if (fwd) {
      A m = Lowest<A>::value, s = 0, xl = 0;
      if (live) {
        if (tx == 0) xl = in_range ? to_acc(xr[label]) : A(NAN);
        for_row<VEC>(
            xr, V,
            [&](int64_t c) {
              const A v = to_acc(xr[c]);
              if (v > m) {
                s *= aexp(m - v);
                m = v;
              }
              s += aexp(v - m);
            },
            [&](int64_t c) {
              const Pack<T, VEC> p = load_pack<VEC>(xr + c);
              A v[VEC];
              A mx = Lowest<A>::value;
#pragma unroll
              for (int j = 0; j < VEC; ++j) {
                v[j] = to_acc(p.v[j]);
                mx = amax(mx, v[j]);
              }
              if (mx > m) {  // rare once the row's maximum has been seen
                s *= aexp(m - mx);
                m = mx;
              }
#pragma unroll
              for (int j = 0; j < VEC; ++j) s += aexp(v[j] - m);
            });
      }
      group_merge(m, s, rm, rs);
      // log in double: once per row, and exact whatever the fast-math flags do to logf
      lse = live ? m + static_cast<A>(log(static_cast<double>(s))) : A(0);
      if (active && tx == 0) {
        if (lse_out != nullptr) lse_out[row] = lse;
        if (loss_rows != nullptr)
          loss_rows[row] = live ? static_cast<double>(lse) - static_cast<double>(xl) : 0.0;
      }
    } else if (live) {
      lse = lse_in[row];
    }
    if (g == nullptr || !active) continue;
    T* gr = g + row * ldg;
    // the host picks VEC > 1 only when g's rows share x's 16-byte phase, so both split alike
    if (!live) {
      const T z = from_acc<T>(A(0));
      Pack<T, VEC> zp;
#pragma unroll
      for (int j = 0; j < VEC; ++j) zp.v[j] = z;
      for_row<VEC>(
          xr, V, [&](int64_t c) { gr[c] = z; },
          [&](int64_t c) { store_pack<VEC>(gr + c, zp); });
      continue;
    }
    for_row<VEC>(
        xr, V,
        [&](int64_t c) {
          const A p = aexp(to_acc(xr[c]) - lse);
          gr[c] = from_acc<T>((c == label ? p - A(1) : p) * scale);
        },
        [&](int64_t c) {
          const Pack<T, VEC> p = load_pack<VEC>(xr + c);
          Pack<T, VEC> o;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const A e = aexp(to_acc(p.v[j]) - lse);
            o.v[j] = from_acc<T>((c + j == label ? e - A(1) : e) * scale);
          }
          store_pack<VEC>(gr + c, o);
        });
  }
}

// One block: the count of non-ignored labels and the sum of the per-row losses, each thread over
// a fixed stride of rows, then a fixed tree: the same bits on every run.
template <typename A>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_kernel(const double* __restrict__ loss_rows, const int64_t* __restrict__ labels, int64_t rows,
                  int64_t ignore, bool mean, A* __restrict__ loss, int64_t* __restrict__ count) {
  __shared__ double ss[kReduceThreads];
  __shared__ long long sc[kReduceThreads];
  const int tx = threadIdx.x;
  double s = 0;
  long long c = 0;
  for (int64_t i = tx; i < rows; i += kReduceThreads) {
    if (labels[i] == ignore) continue;
    ++c;
    if (loss_rows != nullptr) s += loss_rows[i];
  }
  ss[tx] = s;
  sc[tx] = c;
  __syncthreads();
  for (int o = kReduceThreads / 2; o > 0; o >>= 1) {
    if (tx < o) {
      ss[tx] += ss[tx + o];
      sc[tx] += sc[tx + o];
    }
    __syncthreads();
  }
  if (tx != 0) return;
  if (count != nullptr) *count = sc[0];
  if (loss != nullptr) {
    double t = ss[0];
    // mean over no tokens is 0, not torch's NaN: a fully masked micro-batch must not poison training
    if (mean) t = sc[0] > 0 ? t / static_cast<double>(sc[0]) : 0.0;
    *loss = static_cast<A>(t);
  }
}

}  // namespace

void cross_entropy_rows_launch(const CrossEntropyArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return;
  dispatch(a.x_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    constexpr int VEC = 16 / sizeof(T);
    // in-place or not, each thread writes g where it read x: that needs the same 16-byte phase
    // on every row of both (true for the fused op's in-place pass and for contiguous outputs)
    const auto xa = reinterpret_cast<uintptr_t>(a.x), ga = reinterpret_cast<uintptr_t>(a.g);
    const bool vec = a.g == nullptr ||
                     ((xa - ga) % 16 == 0 && ((a.ld_x - a.ld_g) * static_cast<int64_t>(sizeof(T))) % 16 == 0);
    // threads per row: the smallest power of two in [32, 512] giving each at most 8 vectors;
    // short rows share a 256-thread block
    const int64_t nvec = (a.V + VEC - 1) / VEC;
    int G = 32;
    while (G < kMaxThreads && int64_t{G} * 8 < nvec) G *= 2;
    const int R = std::max(1, 256 / G);
    const int64_t blocks = std::min<int64_t>((a.rows + R - 1) / R, int64_t{1} << 20);
    const dim3 block(G, R);
    const auto x = static_cast<const T*>(a.x);
    const auto g = static_cast<T*>(a.g);
    const auto lse_in = static_cast<const A*>(a.lse_in);
    const auto lse_out = static_cast<A*>(a.lse_out);
    const auto dloss = static_cast<const A*>(a.dloss);
    if (vec)
      rows_kernel<T, VEC><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
          x, g, a.labels, lse_in, lse_out, a.loss_rows, dloss, a.count, a.rows, a.V, a.ld_x, a.ld_g,
          a.ignore_index);
    else
      rows_kernel<T, 1><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
          x, g, a.labels, lse_in, lse_out, a.loss_rows, dloss, a.count, a.rows, a.V, a.ld_x, a.ld_g,
          a.ignore_index);
  });
}

void cross_entropy_reduce_launch(const CrossEntropyReduceArgs& a, cudaStream_t stream) {
  if (a.loss_type == DType::kFloat64)
    reduce_kernel<double><<<1, kReduceThreads, 0, stream>>>(a.loss_rows, a.labels, a.rows, a.ignore_index,
                                                            a.mean, static_cast<double*>(a.loss), a.count);
  else
    reduce_kernel<float><<<1, kReduceThreads, 0, stream>>>(a.loss_rows, a.labels, a.rows, a.ignore_index,
                                                           a.mean, static_cast<float*>(a.loss), a.count);
}

}  // namespace ifast::cuda
