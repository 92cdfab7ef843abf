// One head's rotary rotation, shared by rotary.cpp (the op) and decode_rotary_append.cpp (a decode
// step's fused rotary + cache append).
// Part of a kernel body compiled once per instruction set (isa_compile.h): no include guard.

namespace ifast::cpu::IFAST_ISA {

// x0' = x0 c - x1 s, x1' = x0 s + x1 c over the pairs (i, i + rd2), or (2i, 2i + 1) when
// interleaved. Each iteration reads its own pair before writing it and no pair is touched by two
// iterations, so the loop stays correct (and vectorisable) when out aliases x.
template <typename T, typename A, bool Interleaved>
inline void rotate_head(const T* xh, T* oh, const A* c, const A* s, A sgn, int64_t rd2) {
  if constexpr (Interleaved) {
#pragma omp simd
    for (int64_t i = 0; i < rd2; ++i) {
      const A x0 = load(xh, 2 * i), x1 = load(xh, 2 * i + 1);
      const A si = sgn * s[i];
      store(oh, 2 * i, x0 * c[i] - x1 * si);
      store(oh, 2 * i + 1, x0 * si + x1 * c[i]);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < rd2; ++i) {
      const A x0 = load(xh, i), x1 = load(xh, i + rd2);
      const A si = sgn * s[i];
      store(oh, i, x0 * c[i] - x1 * si);
      store(oh, i + rd2, x0 * si + x1 * c[i]);
    }
  }
}

}  // namespace ifast::cpu::IFAST_ISA
