#include "output_allocator.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

namespace ifast::cpu {
namespace {

constexpr size_t kMinCached = 256 * 1024;
constexpr size_t kHuge = 2 * 1024 * 1024;

size_t cap_from_env() {
  const char* v = std::getenv("INTERNLM_FAST_OUTPUT_CACHE_MB");
  if (v == nullptr || *v == '\0') return size_t(1024) << 20;
  char* end = nullptr;
  long long mb = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && mb >= 0,
              "INTERNLM_FAST_OUTPUT_CACHE_MB must be a non-negative integer, got '", v, "'");
  return static_cast<size_t>(mb) << 20;
}

struct Block {
  void* ptr;
  size_t size;
};

class CachingOutputAllocator final : public c10::Allocator {
 public:
  CachingOutputAllocator() : cap_(cap_from_env()) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCached) return c10::GetCPUAllocator()->allocate(n);
    const size_t size = (n + kHuge - 1) / kHuge * kHuge;
    Block* b = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(size);
      if (it != free_.end()) {
        b = it->second;
        free_.erase(it);
        cached_ -= size;
        ++hits_;
      } else {
        ++misses_;
      }
      live_ += size;
    }
    if (b == nullptr) {
      void* p = std::aligned_alloc(kHuge, size);
      if (p == nullptr) {
        std::lock_guard<std::mutex> lock(mu_);
        live_ -= size;
        TORCH_CHECK(false, "internlm_fast: out of memory allocating ", size, " bytes");
      }
      madvise(p, size, MADV_HUGEPAGE);  // a hint: ignored where THP is off
      b = new Block{p, size};
    }
    return {b->ptr, b, &CachingOutputAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  int64_t clear() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t freed = 0;
    for (auto& [size, b] : free_) {
      std::free(b->ptr);
      freed += static_cast<int64_t>(size);
      delete b;
    }
    free_.clear();
    cached_ = 0;
    return freed;
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(cached_), static_cast<int64_t>(live_), hits_, misses_};
  }

  static CachingOutputAllocator& get() {
    static auto* a = new CachingOutputAllocator();  // never destroyed: tensors may outlive statics
    return *a;
  }

 private:
  static void release(void* ctx) { get().put(static_cast<Block*>(ctx)); }

  void put(Block* b) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      live_ -= b->size;
      if (cached_ + b->size <= cap_) {
        free_.emplace(b->size, b);
        cached_ += b->size;
        return;
      }
    }
    std::free(b->ptr);
    delete b;
  }

  std::mutex mu_;
  std::multimap<size_t, Block*> free_;
  size_t cap_;
  size_t cached_ = 0;
  size_t live_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &CachingOutputAllocator::get(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, std::nullopt);
}

int64_t output_cache_clear() { return CachingOutputAllocator::get().clear(); }

std::vector<int64_t> output_cache_stats() { return CachingOutputAllocator::get().stats(); }

}  // namespace ifast::cpu
