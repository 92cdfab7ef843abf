// Host emulation of the CUDA features the kernels in cpp/cuda use, to check their indexing and
// reduction logic on a machine without a GPU (.ci/cuda_emu/run.sh). Blocks run one after another;
// each CUDA thread is a std::thread; __syncthreads and warp shuffles are barriers, so a barrier
// that not every thread reaches hangs here (run.sh has a timeout). __shared__ variables become
// function statics, shared by the block running. Not a model of the memory system, timing or
// alignment faults: a GPU run (tests/) stays the real test.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <barrier>
#include <cmath>
#include <thread>
#include <vector>
#include <memory>
#include <cstring>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static

namespace emu {
inline thread_local dim3 tid, bid, bdim, gdim;
inline std::barrier<>* block_bar = nullptr;
struct Warp { std::barrier<> bar{32}; double slot[32]; };
inline std::vector<std::unique_ptr<Warp>> warps;
inline thread_local int lin = 0;
inline int num_sms = 4;
inline long launches = 0;

template <typename... P, typename... A>
void launch(dim3 grid, dim3 block, size_t, cudaStream_t, void (*k)(P...), A... args) {
  ++launches;
  const int n = block.x * block.y * block.z;
  if (n % 32) { fprintf(stderr, "block not a multiple of 32\n"); abort(); }
  for (unsigned bz = 0; bz < grid.z; ++bz)
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::barrier<> bar(n);
      block_bar = &bar;
      warps.clear();
      for (int w = 0; w < n / 32; ++w) warps.emplace_back(new Warp);
      std::vector<std::thread> ts;
      for (int i = 0; i < n; ++i)
        ts.emplace_back([&, i] {
          lin = i;
          tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
          bid = dim3(bx, by, bz);
          bdim = block;
          gdim = grid;
          k(static_cast<P>(args)...);
        });
      for (auto& t : ts) t.join();
    }
}
}  // namespace emu

#define threadIdx emu::tid
#define blockIdx emu::bid
#define blockDim emu::bdim
#define gridDim emu::gdim

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
template <typename T> T __shfl_xor_sync(unsigned, T v, int o) {
  auto& w = *emu::warps[emu::lin / 32];
  const int lane = emu::lin % 32;
  w.slot[lane] = static_cast<double>(v);
  w.bar.arrive_and_wait();
  T r = static_cast<T>(w.slot[lane ^ o]);
  w.bar.arrive_and_wait();
  return r;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// the float intrinsics with their IEEE meaning (on the host nothing is fused or approximated)
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float a) { return std::exp(a); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }

#ifdef EMU_MAIN
extern "C" cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
extern "C" cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = emu::num_sms; return cudaSuccess; }
#endif
