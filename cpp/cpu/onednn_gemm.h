// fp32 GEMMs through oneDNN where torch's BLAS leaves the CPU's AVX-512 unused.
//
// torch multiplies fp32 matrices on the CPU with MKL, which picks its code by CPU vendor: on AMD
// CPUs with AVX-512 (Zen 4, Zen 5) it runs its AVX2 code, half the vector width there. oneDNN,
// inside torch too (the op mkldnn::_linear_pointwise), picks its code by CPU features and runs
// AVX-512: on 2 cores of a Zen 5, 2-2.5x MKL at the shapes of a training step. So on a CPU with
// AVX-512 that is not Intel's, fp32 GEMMs of the model's linear layers (internlm_fast.ops.linear)
// and of the fused lm-head cross-entropy go through oneDNN. On Intel CPUs MKL runs AVX-512 itself
// and stays; bf16 GEMMs already go through oneDNN in ATen.
// Following the CPU, the choice also follows the kernels' cap: IFAST_CPU_ISA=avx2 (or lower) keeps
// the GEMMs on torch's BLAS, as on a CPU without AVX-512. IFAST_FP32_GEMM=onednn|aten overrides the
// choice (read at the first query); set_fp32_gemm later.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace ifast::cpu {

// True when fp32 GEMMs should go through linear_nt (the choice above, oneDNN present in torch).
bool onednn_fp32_gemm();

// a (M, K) @ b (N, K)^T through oneDNN, fp32; any strides (a contiguous `a` runs fastest).
at::Tensor linear_nt(const at::Tensor& a, const at::Tensor& b);

// x (R, C)^T as a contiguous (C, R) fp32 tensor (kernels/transpose.h): the operand of a backward
// GEMM on the oneDNN route that must be contiguous transposed. ValueError for anything but 2-D fp32
// on the CPU. transpose_fp32_into writes it into out, which must be (C, R) fp32 and contiguous.
at::Tensor transpose_fp32(const at::Tensor& x);
void transpose_fp32_into(const at::Tensor& x, const at::Tensor& out);

// _C.cpu.fp32_gemm(): "onednn" or "aten", the library fp32 GEMMs use now.
std::string fp32_gemm();
// _C.cpu.set_fp32_gemm(name): "onednn" (where torch has it; else aten), "aten", or "auto" (follow
// the CPU and the cap); returns the setting it replaced, for restoring. ValueError for another name.
std::string set_fp32_gemm(const std::string& name);

// bf16 GEMMs widened to fp32: where the CPU lacks AVX-512 (F/BW/VL/DQ: oneDNN's bf16 GEMMs need it),
// ATen multiplies bf16 matrices with a plain loop, 7-400x slower than its fp32 GEMM on the same
// operands (2 cores of a Zen 3: a (2048, 256) x (256, 688) product 58 ms against 8 ms; the tiny
// model's bf16 training step 25 s, nearly all of it in aten::mm). There the library's bf16 linear
// layers (internlm_fast.ops.linear) and the fused lm-head cross-entropy convert their operands to
// fp32 (exact), multiply in fp32 and round the results to bf16 once: the products and fp32 sums
// of a bf16 GEMM, without the rounding of its partial results. Follows the CPU itself, not the
// IFAST_CPU_ISA cap (torch's own kernels ignore that cap). IFAST_BF16_GEMM=widen|native overrides.
bool bf16_gemm_widened();
// _C.cpu.bf16_gemm(): "widen" or "native", the route bf16 GEMMs take now.
std::string bf16_gemm();
// _C.cpu.set_bf16_gemm(name): "widen", "native" or "auto"; returns the setting it replaced.
std::string set_bf16_gemm(const std::string& name);

// bf16 attention's products (kernels/flash_attn_bf16.h) through oneDNN's batch-reduce GEMM kernel
// (ATen's cpublas::brgemm, what ATen's own flash attention uses), which runs AMX tiles on CPUs that
// have them (Intel Sapphire Rapids on), instead of our AVX512-BF16 tiles. "auto" (the default, or
// IFAST_ATTN_BF16_GEMM) picks brgemm exactly where ATen would pack for AMX; "brgemm" forces it
// (oneDNN then runs its AVX512-BF16 kernel, as fast as our tiles on a Zen 5: how the path is tested
// without AMX); "tiles" forces ours.
bool attn_bf16_brgemm();
// _C.cpu.attn_bf16_gemm(): "brgemm" or "tiles", the choice now in force.
std::string attn_bf16_gemm();
// _C.cpu.set_attn_bf16_gemm(name): "brgemm", "tiles" or "auto"; returns the setting it replaced.
std::string set_attn_bf16_gemm(const std::string& name);

}  // namespace ifast::cpu
