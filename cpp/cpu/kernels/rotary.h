// Rotary position embedding on the CPU (flash-attn's apply_rotary). One task = a run of tokens;
// every head of a token uses the same cos/sin row, so the row is fetched (and widened to fp32 when
// stored narrower) once per token and stays in L1 across the heads. x is read and out written
// once, through x's own strides, so q/k sliced out of a packed qkv need no copy; out may be x.
// Reference: internlm_fast/ops/rotary.py::apply_rotary_ref.
// Compiled once per instruction set (isa_compile.h): no include guard; IFAST_ISA_LEVEL selects the
// vector code of each path.

#include "rotate_head.h"

namespace ifast::cpu::IFAST_ISA {
namespace {

struct Geometry {
  int64_t batch, seqlen, heads, D, rd2;  // seqlen: per sequence (padded) or total tokens (varlen)
  int64_t xs_b, xs_s, xs_h;              // x strides (batch stride unused when varlen)
  int64_t os_b, os_s, os_h;              // out strides
};

template <typename T, typename C, bool Interleaved>
void kernel(const T* x, T* out, const C* cos, const C* sin, const int64_t* offsets,
            const int32_t* cu, const Geometry& g, bool conjugate) {
  using A = acc_t<T>;
  const A sgn = conjugate ? A(-1) : A(1);
  const int64_t tokens = cu != nullptr ? g.seqlen : g.batch * g.seqlen;
  const int64_t rd = 2 * g.rd2;
  const bool copy_tail = rd < g.D && out != x;
  at::parallel_for(0, tokens, row_grain(g.heads * g.D), [&](int64_t t0, int64_t t1) {
    // a narrower cos/sin row is widened once per token, not once per head
    std::vector<A> row(std::is_same_v<C, A> ? 0 : 2 * g.rd2);
    int64_t b = 0;
    if (cu != nullptr)  // the sequence holding t0 (upper_bound skips empty sequences)
      b = std::upper_bound(cu, cu + g.batch + 1, static_cast<int32_t>(t0)) - cu - 1;
    for (int64_t t = t0; t < t1; ++t) {
      int64_t pos;
      const T* xt;
      T* ot;
      if (cu != nullptr) {
        while (t >= cu[b + 1]) ++b;
        pos = offsets[b] + (t - cu[b]);
        xt = x + t * g.xs_s;
        ot = out + t * g.os_s;
      } else {
        b = t / g.seqlen;
        const int64_t s = t - b * g.seqlen;
        pos = offsets[b] + s;
        xt = x + b * g.xs_b + s * g.xs_s;
        ot = out + b * g.os_b + s * g.os_s;
      }
      const A* c;
      const A* sn;
      if constexpr (std::is_same_v<C, A>) {
        c = cos + pos * g.rd2;
        sn = sin + pos * g.rd2;
      } else {
        const C* cr = cos + pos * g.rd2;
        const C* sr = sin + pos * g.rd2;
        A* w = row.data();
#pragma omp simd
        for (int64_t i = 0; i < g.rd2; ++i) {
          w[i] = load(cr, i);
          w[g.rd2 + i] = load(sr, i);
        }
        c = w;
        sn = w + g.rd2;
      }
      for (int64_t h = 0; h < g.heads; ++h) {
        const T* xh = xt + h * g.xs_h;
        T* oh = ot + h * g.os_h;
        rotate_head<T, A, Interleaved>(xh, oh, c, sn, sgn, g.rd2);
        if (copy_tail) std::memcpy(oh + rd, xh + rd, sizeof(T) * (g.D - rd));
      }
    }
  });
}

}  // namespace

at::Tensor rotary_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& seqlen_offsets, const std::optional<at::Tensor>& cu_seqlens,
                      bool interleaved, bool conjugate, const std::optional<at::Tensor>& out) {
  const bool varlen = cu_seqlens.has_value() && cu_seqlens->defined();
  TORCH_CHECK(x.dim() == (varlen ? 3 : 4), "rotary_fwd: x must be 4-D, or 3-D with cu_seqlens");
  TORCH_CHECK(x.size(-1) <= 1 || x.stride(-1) == 1, "rotary_fwd: x's last dim must be contiguous");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.scalar_type() == sin.scalar_type(),
              "rotary_fwd: cos and sin must be contiguous 2-D of one shape and dtype");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() || cos.scalar_type() == at::kFloat,
              "rotary_fwd: cos/sin must have x's dtype or fp32");
  const int64_t D = x.size(-1), rd2 = cos.size(1);
  TORCH_CHECK(rd2 >= 1 && 2 * rd2 <= D, "rotary_fwd: rotary_dim must be in [2, headdim]");
  Geometry g{};
  g.heads = x.size(-2);
  g.D = D;
  g.rd2 = rd2;
  if (varlen) {
    TORCH_CHECK(cu_seqlens->scalar_type() == at::kInt && cu_seqlens->dim() == 1 &&
                    cu_seqlens->is_contiguous() && cu_seqlens->numel() >= 1,
                "rotary_fwd: cu_seqlens must be contiguous int32 (batch + 1,)");
    g.batch = cu_seqlens->numel() - 1;
    g.seqlen = x.size(0);
  } else {
    g.batch = x.size(0);
    g.seqlen = x.size(1);
  }
  TORCH_CHECK(seqlen_offsets.scalar_type() == at::kLong && seqlen_offsets.dim() == 1 &&
                  seqlen_offsets.numel() == g.batch && seqlen_offsets.is_contiguous(),
              "rotary_fwd: seqlen_offsets must be contiguous int64 (batch,)");
  at::Tensor y;
  if (out.has_value() && out->defined()) {
    y = *out;
    TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type() &&
                    (D <= 1 || y.stride(-1) == 1),
                "rotary_fwd: out must match x's shape and dtype, last dim contiguous");
  } else {
    y = empty_output_like(x);
  }
  const int64_t off = varlen ? 1 : 0;  // 3-D has no batch dim: token stride sits in dim 0
  g.xs_b = varlen ? 0 : x.stride(0);
  g.xs_s = x.stride(1 - off);
  g.xs_h = x.stride(2 - off);
  g.os_b = varlen ? 0 : y.stride(0);
  g.os_s = y.stride(1 - off);
  g.os_h = y.stride(2 - off);
  if (x.numel() == 0) return y;
  const int32_t* cu = varlen ? cu_seqlens->const_data_ptr<int32_t>() : nullptr;
  const int64_t* offs = seqlen_offsets.const_data_ptr<int64_t>();
  IFAST_DISPATCH_FLOATING(x.scalar_type(), "rotary_fwd", [&] {
    using T = scalar_t;
    // raw pointers: out may alias x (in-place)
    const T* xp = static_cast<const T*>(x.const_data_ptr());
    T* yp = static_cast<T*>(y.data_ptr());
    auto run = [&](auto* cp, auto* sp) {
      using C = std::remove_const_t<std::remove_pointer_t<decltype(cp)>>;
      if (interleaved)
        kernel<T, C, true>(xp, yp, cp, sp, offs, cu, g, conjugate);
      else
        kernel<T, C, false>(xp, yp, cp, sp, offs, cu, g, conjugate);
    };
    if (cos.scalar_type() == x.scalar_type())
      run(cos.const_data_ptr<T>(), sin.const_data_ptr<T>());
    else
      run(cos.const_data_ptr<float>(), sin.const_data_ptr<float>());
  });
  return y;
}

at::Tensor rotary_bwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& seqlen_offsets, const std::optional<at::Tensor>& cu_seqlens,
                      bool interleaved, bool conjugate, const std::optional<at::Tensor>& out) {
  // the rotation is orthogonal: its gradient is the rotation by -angle
  return rotary_fwd(x, cos, sin, seqlen_offsets, cu_seqlens, interleaved, !conjugate, out);
}

}  // namespace ifast::cpu::IFAST_ISA
