// KV-cache decoding on NVIDIA GPUs (sm_80, sm_90): attention of a few new query tokens against the
// cache (flash-decoding). Same contract and rounding points as cpp/cpu/flash_attn_kvcache.cpp;
// reference: internlm_fast/ops/flash_attn_kvcache.py::flash_attn_with_kvcache_ref.
// CUDA headers only (no torch), so nvcc is quick.
//
// Attention is bound by reading the cache, so every K/V row is read once, in place (any token and
// head strides), with 16-byte loads. A block owns one kv head, up to kRows query rows sharing it
// (the GQA group's heads times the query tokens) and one chunk of the cache. When B * Hk blocks
// would leave the SMs idle the keys are split into chunks, each block writes its partial softmax
// (unnormalised output, max, sum) to a workspace, and a second kernel merges the chunks by
// log-sum-exp; with one chunk the block normalises and writes the output itself. The number of
// chunks comes from the cache's capacity (the host never reads the lengths), but each sequence cuts
// its own valid keys into that many chunks, so a short sequence in a long cache still spreads over
// all its blocks. A paged cache (flash-attn's block_table, vLLM's PagedAttention) differs only in
// where a key row lives: at the start of each step of kKeys keys, kKeys threads look their keys'
// blocks up in the table (fetched one step ahead, so the lookup's latency hides behind the step
// before) and leave the rows' offsets in shared memory for the K and V loads. Per kKeys keys:
// - scores: a group of L lanes (D / 8 rounded up to a power of two) takes one key, each lane 8 of
//   its elements, and the dot products with the block's query rows are reduced by shuffles;
// - softmax: a warp per query row advances its running max and sum (log2 units, as the CPU kernel);
// - P V: thread (part, slice) owns 8 output columns of every row and walks keys part, part + P, ...
//   (consecutive threads read consecutive 16 bytes of a value row); the P partial sums are added in
//   a fixed order at the end, so the result does not depend on scheduling.
#include "device_common.cuh"
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace ifast::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kKeys = 64;      // keys per online-softmax step: two per lane of a row's warp
constexpr int kRows = 8;       // query rows per block; the P V accumulators are kRows x 8 floats
constexpr int kMaxD = 256;
constexpr int kUnroll = 4;     // keys a lane loads before reducing any: loads in flight
constexpr int kMinChunk = 128;     // cache rows per split at least, so a block amortises its merge
constexpr int kChunkAlign = 16;    // a sequence's chunks: multiples of this many keys
constexpr int kBlocksPerSm = 3;    // resident at ~140 registers a thread: the split target
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = INFINITY;

template <typename X> __device__ __forceinline__ X imin(X a, X b) { return a < b ? a : b; }
template <typename X> __device__ __forceinline__ X imax(X a, X b) { return a < b ? b : a; }

// 8 consecutive elements as fp32: 16-byte loads when kVec (p 16-byte aligned), else one by one.
template <bool kVec, typename T>
__device__ __forceinline__ void load8(const T* p, float (&f)[8]) {
  if constexpr (kVec) {
    constexpr int W = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < 8; i += W) {
      const Pack<T, W> x = load_pack<W>(p + i);
#pragma unroll
      for (int j = 0; j < W; ++j) f[i + j] = to_acc(x.v[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) f[j] = to_acc(p[j]);
  }
}

// p 16-byte aligned
template <typename T> __device__ __forceinline__ void store8(T* p, const float (&f)[8]) {
  constexpr int W = 16 / sizeof(T);
#pragma unroll
  for (int i = 0; i < 8; i += W) {
    Pack<T, W> x;
#pragma unroll
    for (int j = 0; j < W; ++j) x.v[j] = from_acc<T>(f[i + j]);
    store_pack<W>(p + i, x);
  }
}

// Sum over aligned groups of L lanes (L a power of two <= 32); the whole warp must call it.
__device__ __forceinline__ float group_sum(float v, int L) {
  for (int o = L >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

struct DecodeParams {
  const void *q, *k, *v;
  const int32_t* lens;
  const int32_t* table;  // paged: (B, max_blocks), row stride table_b; k_b, v_b step over blocks
  void* out;
  float* lse;
  float* ws_o;   // splits > 1: (out row, split, D) unnormalised outputs
  float* ws_ml;  // splits > 1: (out row, split, 2) max and sum, log2 units
  int64_t q_b, q_t, q_h, k_b, k_t, k_h, v_b, v_t, v_h;
  int64_t cache_len;  // paged: max_blocks * block_size
  int64_t table_b;
  int block_size, num_blocks;
  int Sq, Hq, Hk, D, group, splits;
  float qscale;  // softmax scale in log2 units
  bool causal;
};

// Block (split * tiles + tile, kv head, sequence). Tile rows are r = t * group + g: query token t,
// query head hk * group + g. Output row of (b, t, h): (b * Sq + t) * Hq + h.
template <typename T, bool kVec, bool kPaged>
__global__ void __launch_bounds__(kThreads) decode_kernel(const DecodeParams p) {
  static_assert(kKeys == 64 && kThreads % 32 == 0, "the softmax step gives each lane two keys");
  __shared__ float qs[kRows * kMaxD];
  __shared__ float sc[kRows * kKeys];
  __shared__ float red[kThreads * 8];
  __shared__ float m_s[kRows], l_s[kRows], a_s[kRows];
  __shared__ int64_t koff[kPaged ? kKeys : 1], voff[kPaged ? kKeys : 1];  // a step's rows, paged

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = static_cast<int>(blockIdx.x % p.splits), tile = static_cast<int>(blockIdx.x / p.splits);
  const int hk = blockIdx.y, b = blockIdx.z;
  const int D = p.D, nvec = D / 8, group = p.group;
  const int r0 = tile * kRows, R = imin(kRows, p.Sq * group - r0);
  // the valid keys, clamped to the cache so a bad length cannot read past it
  const int64_t len = imin<int64_t>(imax<int64_t>(p.lens[b], 0), p.cache_len);
  const int64_t diag = len - p.Sq;
  // the tile's last query token sees the most keys
  const int64_t limit =
      p.causal ? imin<int64_t>(len, imax<int64_t>(0, (r0 + R - 1) / group + diag + 1)) : len;
  // this sequence's keys in p.splits chunks (multiples of kChunkAlign keys; the last ones may be empty)
  const int64_t per = static_cast<int64_t>(p.splits) * kChunkAlign;
  const int64_t chunk = p.splits == 1 ? limit : (limit + per - 1) / per * kChunkAlign;
  const int64_t j_begin = split * chunk, j_end = imin<int64_t>(limit, j_begin + chunk);

  auto out_row = [&](int r, int& t, int& h) {
    const int rg = r0 + r;
    t = rg / group;
    h = hk * group + rg % group;
    return (static_cast<int64_t>(b) * p.Sq + t) * p.Hq + h;
  };

  if (p.splits > 1 && j_begin >= j_end) {  // nothing to see here: the merge skips this split
    if (tid < R) {
      int t, h;
      const int64_t orow = out_row(tid, t, h);
      p.ws_ml[(orow * p.splits + split) * 2] = -kInf;
      p.ws_ml[(orow * p.splits + split) * 2 + 1] = 0.f;
    }
    return;
  }

  const T* q = static_cast<const T*>(p.q);
  for (int i = tid; i < R * nvec; i += kThreads) {
    const int r = i / nvec, s = i - r * nvec, rg = r0 + r;
    float f[8];
    load8<kVec>(q + b * p.q_b + (rg / group) * p.q_t + (hk * group + rg % group) * p.q_h + s * 8, f);
#pragma unroll
    for (int e = 0; e < 8; ++e) qs[r * kMaxD + s * 8 + e] = f[e] * p.qscale;
  }
  if (tid < kRows) {
    m_s[tid] = -kInf;
    l_s[tid] = 0.f;
  }

  // scores: lane li of key group grp; P V: thread (part, slice)
  int L = 1;
  while (L < nvec) L <<= 1;
  const int li = tid & (L - 1), grp = tid / L, G = kThreads / L;
  const int iters = (kKeys + G - 1) / G;
  const int P = kThreads / nvec, part = tid / nvec, slice = tid - part * nvec;
  const T* kb = static_cast<const T*>(p.k) + (kPaged ? 0 : b * p.k_b) + hk * p.k_h + li * 8;
  const T* vb = static_cast<const T*>(p.v) + (kPaged ? 0 : b * p.v_b) + hk * p.v_h + slice * 8;
  // paged: thread tid < kKeys holds the block of key j0 + tid of the next step. The lengths are
  // clamped to the table's capacity and the ids to the pool, so bad inputs cannot read outside it.
  const int32_t* table = kPaged ? p.table + b * p.table_b : nullptr;
  auto fetch_block = [&](int64_t j0) {
    const int64_t j = j0 + tid;
    return tid < kKeys && j < j_end ? table[static_cast<uint32_t>(j) / static_cast<uint32_t>(p.block_size)] : 0;
  };
  int32_t next_block = 0;
  if constexpr (kPaged) next_block = fetch_block(j_begin);
  float acc[kRows][8];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] = 0.f;
  __syncthreads();

  for (int64_t j0 = j_begin; j0 < j_end; j0 += kKeys) {
    const int n = static_cast<int>(imin<int64_t>(kKeys, j_end - j0));
    if constexpr (kPaged) {
      if (tid < n) {  // the previous step's loads of koff and voff ended at its last barrier
        const uint32_t j = static_cast<uint32_t>(j0 + tid), bs = static_cast<uint32_t>(p.block_size);
        const int64_t blk = imin(imax(next_block, 0), p.num_blocks - 1), row = j - j / bs * bs;
        koff[tid] = blk * p.k_b + row * p.k_t;
        voff[tid] = blk * p.v_b + row * p.v_t;
      }
      next_block = fetch_block(j0 + kKeys);
      __syncthreads();
    }
    for (int it = 0; it < iters; it += kUnroll) {
      float kf[kUnroll][8];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int jj = grp + (it + u) * G;
        if (li < nvec && jj < n) {
          load8<kVec>(kb + (kPaged ? koff[jj] : (j0 + jj) * p.k_t), kf[u]);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) kf[u][e] = 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (it + u >= iters) break;  // uniform over the block
        const int jj = grp + (it + u) * G;
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (r >= R) break;
          float d = 0.f;
          if (li < nvec) {
            const float* qr = qs + r * kMaxD + li * 8;
#pragma unroll
            for (int e = 0; e < 8; ++e) d = fmaf(qr[e], kf[u][e], d);
          }
          d = group_sum(d, L);
          if (li == 0 && jj < n) sc[r * kKeys + jj] = d;
        }
      }
    }
    __syncthreads();

    for (int r = warp; r < R; r += kWarps) {
      const int t = (r0 + r) / group;
      const int vis = p.causal ? static_cast<int>(imin<int64_t>(n, imax<int64_t>(0, t + diag - j0 + 1))) : n;
      float* s = sc + r * kKeys;
      const float s0 = lane < vis ? s[lane] : -kInf, s1 = lane + 32 < vis ? s[lane + 32] : -kInf;
      const float m_old = m_s[r], m_new = fmaxf(m_old, warp_max(fmaxf(s0, s1)));
      float p0 = 0.f, p1 = 0.f, alpha = 1.f;
      if (m_new != -kInf) {  // else nothing visible yet: m stays -inf, l 0
        p0 = exp2f(s0 - m_new);
        p1 = exp2f(s1 - m_new);
        alpha = exp2f(m_old - m_new);  // 0 when m_old is -inf
      }
      const float sum = warp_sum(p0 + p1);
      s[lane] = p0;
      s[lane + 32] = p1;
      if (lane == 0) {
        m_s[r] = m_new;
        l_s[r] = l_s[r] * alpha + sum;
        a_s[r] = alpha;
      }
    }
    __syncthreads();

    if (part < P) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < R) {
          const float alpha = a_s[r];
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[r][e] *= alpha;
        }
      }
#pragma unroll 4
      for (int jj = part; jj < n; jj += P) {
        float vf[8];
        load8<kVec>(vb + (kPaged ? voff[jj] : (j0 + jj) * p.v_t), vf);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (r < R) {
            const float pr = sc[r * kKeys + jj];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[r][e] = fmaf(pr, vf[e], acc[r][e]);
          }
        }
      }
    }
    __syncthreads();
  }

  // thread (part, slice) put its columns at red[part * D + slice * 8 ...]: sum the parts in order
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r >= R) break;  // uniform over the block
    if (part < P) {
#pragma unroll
      for (int e = 0; e < 8; ++e) red[tid * 8 + e] = acc[r][e];
    }
    __syncthreads();
    int t, h;
    const int64_t orow = out_row(r, t, h);
    const float m = m_s[r], l = l_s[r];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int d = tid; d < D; d += kThreads) {
      float o = 0.f;
      for (int i = 0; i < P; ++i) o += red[i * D + d];
      if (p.splits == 1)
        out[orow * D + d] = from_acc<T>(o * inv);
      else
        p.ws_o[(orow * p.splits + split) * D + d] = o;
    }
    if (tid == 0) {
      if (p.splits == 1) {
        p.lse[(static_cast<int64_t>(b) * p.Hq + h) * p.Sq + t] = l > 0.f ? (m + log2f(l)) * kLn2 : kInf;
      } else {
        p.ws_ml[(orow * p.splits + split) * 2] = m;
        p.ws_ml[(orow * p.splits + split) * 2 + 1] = l;
      }
    }
    __syncthreads();
  }
}

// out = sum_c 2^(m_c - M) O_c / sum_c 2^(m_c - M) l_c over the splits, a warp per output row.
template <typename T>
__global__ void __launch_bounds__(kThreads) merge_kernel(const DecodeParams p, int64_t rows) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int S = p.splits, D = p.D;
  const bool mine = lane < D / 8;
  const float* ml = p.ws_ml + row * S * 2;
  float M = -kInf;
  for (int c = 0; c < S; ++c) M = fmaxf(M, ml[2 * c]);
  float L = 0.f, acc[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = 0.f;
  if (M != -kInf) {
    for (int c = 0; c < S; ++c) {
      const float mc = ml[2 * c];
      if (mc == -kInf) continue;
      const float w = exp2f(mc - M);
      L += w * ml[2 * c + 1];
      if (mine) {
        float o[8];
        load8<true>(p.ws_o + (row * S + c) * D + lane * 8, o);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] += w * o[e];
      }
    }
  }
  const float inv = L > 0.f ? 1.f / L : 0.f;
  if (mine) {
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] *= inv;
    store8(static_cast<T*>(p.out) + row * D + lane * 8, acc);
  }
  if (lane == 0) {
    const int64_t h = row % p.Hq, t = row / p.Hq % p.Sq, b = row / p.Hq / p.Sq;
    p.lse[(b * p.Hq + h) * p.Sq + t] = L > 0.f ? (M + log2f(L)) * kLn2 : kInf;
  }
}

// ---------------------------------------------------------------------------------------------
// host side

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

FlashAttnKvcachePlan flash_attn_kvcache_plan(const FlashAttnKvcacheArgs& a) {
  FlashAttnKvcachePlan pl{};
  const int64_t group = a.Hk > 0 ? a.Hq / a.Hk : 0;
  pl.tiles = ceil_div(a.Sq * group, kRows);
  const int64_t keys = a.cache_len > 0 ? a.cache_len : 1;
  int64_t splits = a.splits;
  if (splits <= 0) {
    // enough blocks for kBlocksPerSm a SM, but at least kMinChunk cache rows a split
    const int64_t base = a.B * a.Hk * pl.tiles > 0 ? a.B * a.Hk * pl.tiles : 1;
    const int64_t sms = a.num_sms > 0 ? a.num_sms : 1;
    splits = std::min(ceil_div(kBlocksPerSm * sms, base), ceil_div(keys, kMinChunk));
  }
  pl.splits = std::max<int64_t>(1, std::min(splits, keys));
  pl.blocks_x = pl.splits * pl.tiles;
  pl.workspace_floats = pl.splits > 1 ? a.B * a.Sq * a.Hq * pl.splits * (a.D + 2) : 0;
  return pl;
}

void flash_attn_kvcache_launch(const FlashAttnKvcacheArgs& a, float* workspace, cudaStream_t stream) {
  if (a.B == 0 || a.Sq == 0 || a.Hq == 0) return;
  const FlashAttnKvcachePlan pl = flash_attn_kvcache_plan(a);
  DecodeParams p{};
  p.q = a.q;
  p.k = a.k;
  p.v = a.v;
  p.lens = a.lens;
  p.table = a.block_table;
  p.table_b = a.block_table_stride;
  p.block_size = static_cast<int>(a.block_size);
  p.num_blocks = static_cast<int>(a.num_blocks);
  p.out = a.out;
  p.lse = a.lse;
  const int64_t rows = a.B * a.Sq * a.Hq;
  p.ws_o = pl.splits > 1 ? workspace : nullptr;
  p.ws_ml = pl.splits > 1 ? workspace + rows * pl.splits * a.D : nullptr;
  p.q_b = a.q_strides[0], p.q_t = a.q_strides[1], p.q_h = a.q_strides[2];
  p.k_b = a.k_strides[0], p.k_t = a.k_strides[1], p.k_h = a.k_strides[2];
  p.v_b = a.v_strides[0], p.v_t = a.v_strides[1], p.v_h = a.v_strides[2];
  // with no block to read from, no key is valid
  p.cache_len = a.block_table != nullptr && (a.num_blocks <= 0 || a.block_size <= 0) ? 0 : a.cache_len;
  p.Sq = static_cast<int>(a.Sq);
  p.Hq = static_cast<int>(a.Hq);
  p.Hk = static_cast<int>(a.Hk);
  p.D = static_cast<int>(a.D);
  p.group = static_cast<int>(a.Hq / a.Hk);
  p.splits = static_cast<int>(pl.splits);
  p.qscale = static_cast<float>(a.softmax_scale) * kLog2e;
  p.causal = a.causal;
  const dim3 grid(static_cast<unsigned>(pl.blocks_x), static_cast<unsigned>(a.Hk),
                  static_cast<unsigned>(a.B));
  dispatch<false>(a.type, [&](auto tag) {  // the host refuses fp64 first
    using T = typename decltype(tag)::type;
    // 16-byte loads need every row start 16-byte aligned: base pointers and strides
    constexpr int64_t W = 16 / sizeof(T);
    bool vec = aligned(a.q, 16) && aligned(a.k, 16) && aligned(a.v, 16);
    for (int i = 0; i < 3; ++i)
      vec = vec && a.q_strides[i] % W == 0 && a.k_strides[i] % W == 0 && a.v_strides[i] % W == 0;
    if (a.block_table != nullptr) {
      if (vec)
        decode_kernel<T, true, true><<<grid, kThreads, 0, stream>>>(p);
      else
        decode_kernel<T, false, true><<<grid, kThreads, 0, stream>>>(p);
    } else {
      if (vec)
        decode_kernel<T, true, false><<<grid, kThreads, 0, stream>>>(p);
      else
        decode_kernel<T, false, false><<<grid, kThreads, 0, stream>>>(p);
    }
    if (pl.splits > 1)
      merge_kernel<T><<<static_cast<unsigned>(ceil_div(rows, kWarps)), kThreads, 0, stream>>>(p, rows);
  });
}

}  // namespace ifast::cuda
