// Helpers shared by the tests here (test_<op>.cpp): elements of any DType read and written as
// double, the dtypes' names and roundoffs, poisoned aligned buffers, and the failure count.
// Included only by the test's own file, not by the rewritten kernel it is linked with.
#pragma once
#include "emu.h"
#include "kernels.h"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace ifast::cuda;

inline size_t esize(DType t) { return t == DType::kFloat64 ? 8 : t == DType::kFloat32 ? 4 : 2; }
inline double getv(DType t, const void* p, size_t i) {
  switch (t) {
    case DType::kFloat32: return ((const float*)p)[i];
    case DType::kFloat64: return ((const double*)p)[i];
    case DType::kBFloat16: return __bfloat162float(((const __nv_bfloat16*)p)[i]);
    case DType::kFloat16: return __half2float(((const __half*)p)[i]);
  }
  return 0;
}
inline void setv(DType t, void* p, size_t i, double v) {  // rounds like the kernels' stores
  switch (t) {
    case DType::kFloat32: ((float*)p)[i] = (float)v; break;
    case DType::kFloat64: ((double*)p)[i] = v; break;
    case DType::kBFloat16: ((__nv_bfloat16*)p)[i] = __float2bfloat16_rn((float)v); break;
    case DType::kFloat16: ((__half*)p)[i] = __float2half_rn((float)v); break;
  }
}
inline const char* nm(DType t) {
  return t == DType::kFloat64 ? "f64" : t == DType::kFloat32 ? "f32" : t == DType::kBFloat16 ? "bf16" : "f16";
}
// unit roundoff of the storage type (half an ulp, relative)
inline double u_of(DType t) {
  return t == DType::kFloat64 ? 0x1p-53 : t == DType::kFloat32 ? 0x1p-24 : t == DType::kBFloat16 ? 0x1p-8 : 0x1p-11;
}

// p: `off` bytes past a 256-byte boundary, followed by at least bytes + 256 bytes of raw; every
// byte of raw starts as `fill`, so a write outside what a kernel may touch shows.
struct Buf {
  std::vector<char> raw;
  char* p;
  explicit Buf(size_t bytes, size_t off = 0, int fill = 0xcd) : raw(bytes + off + 512, (char)fill) {
    p = raw.data() + (256 - reinterpret_cast<uintptr_t>(raw.data()) % 256) % 256 + off;
  }
};

inline int failures = 0;
