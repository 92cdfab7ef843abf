// Where the CPU kernels' large outputs come from: a caching allocator with huge pages.
//
// Why: torch's CPU allocator returns large blocks to the OS on free, so every fresh 64 MB output
// is 16k page faults, and on this class of machine faulting the pages in costs ~5x the kernel
// itself (measured: 4096x4096 fp32 rms_norm writes in 6 ms, first touch of a new 64 MB buffer
// costs 27 ms). Training and decoding allocate the same shapes every step, so caching freed blocks
// (like the CUDA caching allocator) removes that cost; blocks are 2 MB-aligned and marked
// MADV_HUGEPAGE so a block that is new still faults 512x less.
//
// Bounded: at most INTERNLM_FAST_OUTPUT_CACHE_MB (default 1024) of freed blocks are kept, the least
// recently freed evicted first; 0 turns caching off. Small outputs (< 256 KB) go to torch's
// allocator.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace ifast::cpu {

// An uninitialised contiguous CPU tensor; the kernel must write every element.
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype);
inline at::Tensor empty_output_like(const at::Tensor& t) { return empty_output(t.sizes(), t.scalar_type()); }

// Frees every cached block; returns the bytes released.
int64_t output_cache_clear();
// (bytes cached and free, bytes handed out and live, allocations served from the cache, fresh allocations)
std::vector<int64_t> output_cache_stats();

}  // namespace ifast::cpu
