#include "output_allocator.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <list>
#include <map>
#include <vector>
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
        b = *it->second;
        lru_.erase(it->second);
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
    for (Block* b : lru_) {
      std::free(b->ptr);
      freed += static_cast<int64_t>(b->size);
      delete b;
    }
    lru_.clear();
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

  // Keeps the freed block, evicting the least recently freed ones beyond the cap: the shapes a
  // training or decoding loop uses now are the ones worth keeping, not the first ones ever seen.
  void put(Block* b) {
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      live_ -= b->size;
      if (b->size <= cap_) {
        lru_.push_back(b);
        free_.emplace(b->size, std::prev(lru_.end()));
        cached_ += b->size;
        b = nullptr;
        while (cached_ > cap_) {
          Block* old = lru_.front();
          auto range = free_.equal_range(old->size);
          for (auto it = range.first; it != range.second; ++it)
            if (*it->second == old) {
              free_.erase(it);
              break;
            }
          lru_.pop_front();
          cached_ -= old->size;
          evicted.push_back(old);
        }
      }
    }
    if (b != nullptr) evicted.push_back(b);
    for (Block* e : evicted) {  // outside the lock: freeing a large block can take a while
      std::free(e->ptr);
      delete e;
    }
  }

  std::mutex mu_;
  std::list<Block*> lru_;                                    // freed blocks, oldest first
  std::multimap<size_t, std::list<Block*>::iterator> free_;  // the same blocks by size
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
