// The one pybind11 module, internlm_fast._C: a submodule per compiled backend, each exposing the
// same kernel names, so Python picks a backend with getattr(_C, "cpu" | "cuda").
#include <torch/extension.h>

#include "cpu/cpu_isa.h"
#include "cpu/onednn_gemm.h"
#include "cpu/ops_cpu.h"
#include "cpu/output_allocator.h"
#ifdef IFAST_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace py = pybind11;

// Build flags, for python -m internlm_fast.info (setup.py and CMakeLists.txt define them).
#define IFAST_STR_(...) #__VA_ARGS__
#define IFAST_STR(...) IFAST_STR_(__VA_ARGS__)
#ifndef IFAST_CPU_ARCH
#define IFAST_CPU_ARCH unknown
#endif
#ifndef IFAST_CUDA_ARCHS
#define IFAST_CUDA_ARCHS
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  py::dict build;
  build["cpu_arch"] = IFAST_STR(IFAST_CPU_ARCH);
  build["cuda_archs"] = IFAST_STR(IFAST_CUDA_ARCHS);
  build["compiler"] = __VERSION__;
  m.attr("build_info") = build;

  // Every kernel takes keyword arguments, named as in cpu/ops_cpu.h on both submodules (and in
  // triton_kernels): tests/test_kernel_signatures.py checks the names against the headers.
  auto cpu = m.def_submodule("cpu", "C++ CPU kernels");
  cpu.def("output_cache_clear", &ifast::cpu::output_cache_clear);
  cpu.def("output_cache_stats", &ifast::cpu::output_cache_stats);
  // the vector instruction set of the kernels that dispatch at run time (cpu/cpu_isa.h)
  cpu.def("isa", &ifast::cpu::isa);
  cpu.def("set_isa_cap", &ifast::cpu::set_isa_cap, py::arg("level"));
  // the library that runs fp32 GEMMs: oneDNN where torch's BLAS leaves AVX-512 unused (cpu/onednn_gemm.h)
  cpu.def("fp32_gemm", &ifast::cpu::fp32_gemm);
  cpu.def("set_fp32_gemm", &ifast::cpu::set_fp32_gemm, py::arg("name"));
  cpu.def("transpose_fp32", &ifast::cpu::transpose_fp32, nogil, py::arg("x"));
  cpu.def("transpose_fp32_into", &ifast::cpu::transpose_fp32_into, nogil, py::arg("x"), py::arg("out"));
  // bf16 GEMMs of the library: widened to fp32 where ATen's bf16 GEMM is a slow loop (cpu/onednn_gemm.h)
  cpu.def("bf16_gemm", &ifast::cpu::bf16_gemm);
  cpu.def("set_bf16_gemm", &ifast::cpu::set_bf16_gemm, py::arg("name"));
  // bf16 attention's products: our AVX512-BF16 tiles, or oneDNN's brgemm (AMX) (cpu/onednn_gemm.h)
  cpu.def("attn_bf16_gemm", &ifast::cpu::attn_bf16_gemm);
  cpu.def("set_attn_bf16_gemm", &ifast::cpu::set_attn_bf16_gemm, py::arg("name"));
  cpu.def("rms_norm_fwd", &ifast::cpu::rms_norm_fwd, nogil, py::arg("x"), py::arg("weight"),
          py::arg("residual"), py::arg("eps"));
  cpu.def("rms_norm_bwd", &ifast::cpu::rms_norm_bwd, nogil, py::arg("dy"), py::arg("x"), py::arg("weight"),
          py::arg("rstd"), py::arg("dresidual_out"));
  cpu.def("flash_attn_fwd", &ifast::cpu::flash_attn_fwd, nogil, py::arg("q"), py::arg("k"), py::arg("v"),
          py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("softmax_scale"), py::arg("causal"));
  cpu.def("flash_attn_bwd", &ifast::cpu::flash_attn_bwd, nogil, py::arg("dout"), py::arg("q"), py::arg("k"),
          py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
          py::arg("softmax_scale"), py::arg("causal"));
  cpu.def("flash_attn_kvcache_fwd", &ifast::cpu::flash_attn_kvcache_fwd, nogil, py::arg("q"),
          py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_lens"), py::arg("block_table"),
          py::arg("softmax_scale"), py::arg("causal"));
  cpu.def("rotary_fwd", &ifast::cpu::rotary_fwd, nogil, py::arg("x"), py::arg("cos"), py::arg("sin"),
          py::arg("seqlen_offsets"), py::arg("cu_seqlens"), py::arg("interleaved"), py::arg("conjugate"),
          py::arg("out"));
  cpu.def("rotary_bwd", &ifast::cpu::rotary_bwd, nogil, py::arg("x"), py::arg("cos"), py::arg("sin"),
          py::arg("seqlen_offsets"), py::arg("cu_seqlens"), py::arg("interleaved"), py::arg("conjugate"),
          py::arg("out"));
  cpu.def("swiglu_fwd", &ifast::cpu::swiglu_fwd, nogil, py::arg("gate"), py::arg("up"));
  cpu.def("swiglu_bwd", &ifast::cpu::swiglu_bwd, nogil, py::arg("dout"), py::arg("gate"), py::arg("up"),
          py::arg("packed"));
  cpu.def("cross_entropy_fwd", &ifast::cpu::cross_entropy_fwd, nogil, py::arg("logits"), py::arg("labels"),
          py::arg("ignore_index"), py::arg("reduction"));
  cpu.def("cross_entropy_bwd", &ifast::cpu::cross_entropy_bwd, nogil, py::arg("dloss"), py::arg("logits"),
          py::arg("labels"), py::arg("lse"), py::arg("ignore_index"), py::arg("reduction"));
  cpu.def("fused_linear_cross_entropy_fwd", &ifast::cpu::fused_linear_cross_entropy_fwd, nogil,
          py::arg("hidden"), py::arg("weight"), py::arg("labels"), py::arg("ignore_index"),
          py::arg("reduction"), py::arg("chunk_size"), py::arg("need_dhidden"), py::arg("need_dweight"));
  cpu.def("fused_linear_cross_entropy_bwd", &ifast::cpu::fused_linear_cross_entropy_bwd, nogil,
          py::arg("dloss"), py::arg("dhidden"), py::arg("dweight"));
  cpu.def("flatten_scale_fwd", &ifast::cpu::flatten_scale_fwd, nogil, py::arg("tensors"), py::arg("out"),
          py::arg("scale"));
  cpu.def("few_rows_linear", &ifast::cpu::few_rows_linear, nogil, py::arg("x"), py::arg("panels_w"),
          py::arg("bias"));
  cpu.def("few_rows_linear_bf16", &ifast::cpu::few_rows_linear_bf16, nogil, py::arg("x"), py::arg("panels_w"),
          py::arg("bias"));
  cpu.def("few_rows_linear_int8", &ifast::cpu::few_rows_linear_int8, nogil, py::arg("x"), py::arg("panels_w"),
          py::arg("scales"), py::arg("bias"));
  cpu.def("argmax_rows", &ifast::cpu::argmax_rows, nogil, py::arg("x"));
  cpu.def("decode_rotary_append", &ifast::cpu::decode_rotary_append, nogil, py::arg("qkv"), py::arg("cos"),
          py::arg("sin"), py::arg("positions"), py::arg("kv_rows"), py::arg("slots"), py::arg("q_heads"));
  cpu.def("decode_layer", &ifast::cpu::decode_layer, nogil, py::arg("x"), py::arg("residual"),
          py::arg("attn_norm"), py::arg("mlp_norm"), py::arg("eps"), py::arg("qkv_panels"), py::arg("qkv_scales"),
          py::arg("qkv_bias"), py::arg("o_panels"), py::arg("o_scales"), py::arg("o_bias"), py::arg("gate_up_panels"),
          py::arg("gate_up_scales"), py::arg("down_panels"), py::arg("down_scales"), py::arg("cos"), py::arg("sin"),
          py::arg("positions"), py::arg("kv_rows"), py::arg("slots"), py::arg("k_cache"), py::arg("v_cache"),
          py::arg("cache_lens"), py::arg("block_table"), py::arg("softmax_scale"), py::arg("q_heads"));

#ifdef IFAST_WITH_CUDA
  m.attr("with_cuda") = true;
  auto cuda = m.def_submodule("cuda", "CUDA kernels");
  cuda.def("rms_norm_fwd", &ifast::cuda::rms_norm_fwd, nogil, py::arg("x"), py::arg("weight"),
           py::arg("residual"), py::arg("eps"));
  cuda.def("rms_norm_bwd", &ifast::cuda::rms_norm_bwd, nogil, py::arg("dy"), py::arg("x"), py::arg("weight"),
           py::arg("rstd"), py::arg("dresidual_out"));
  cuda.def("flatten_scale_fwd", &ifast::cuda::flatten_scale_fwd, nogil, py::arg("tensors"), py::arg("out"),
           py::arg("scale"));
  cuda.def("rotary_fwd", &ifast::cuda::rotary_fwd, nogil, py::arg("x"), py::arg("cos"), py::arg("sin"),
           py::arg("seqlen_offsets"), py::arg("cu_seqlens"), py::arg("interleaved"), py::arg("conjugate"),
           py::arg("out"));
  cuda.def("rotary_bwd", &ifast::cuda::rotary_bwd, nogil, py::arg("x"), py::arg("cos"), py::arg("sin"),
           py::arg("seqlen_offsets"), py::arg("cu_seqlens"), py::arg("interleaved"), py::arg("conjugate"),
           py::arg("out"));
  cuda.def("swiglu_fwd", &ifast::cuda::swiglu_fwd, nogil, py::arg("gate"), py::arg("up"));
  cuda.def("swiglu_bwd", &ifast::cuda::swiglu_bwd, nogil, py::arg("dout"), py::arg("gate"), py::arg("up"),
           py::arg("packed"));
  cuda.def("cross_entropy_fwd", &ifast::cuda::cross_entropy_fwd, nogil, py::arg("logits"), py::arg("labels"),
           py::arg("ignore_index"), py::arg("reduction"));
  cuda.def("cross_entropy_bwd", &ifast::cuda::cross_entropy_bwd, nogil, py::arg("dloss"), py::arg("logits"),
           py::arg("labels"), py::arg("lse"), py::arg("ignore_index"), py::arg("reduction"));
  cuda.def("fused_linear_cross_entropy_fwd", &ifast::cuda::fused_linear_cross_entropy_fwd, nogil,
           py::arg("hidden"), py::arg("weight"), py::arg("labels"), py::arg("ignore_index"),
           py::arg("reduction"), py::arg("chunk_size"), py::arg("need_dhidden"), py::arg("need_dweight"));
  cuda.def("fused_linear_cross_entropy_bwd", &ifast::cuda::fused_linear_cross_entropy_bwd, nogil,
           py::arg("dloss"), py::arg("dhidden"), py::arg("dweight"));
  cuda.def("flash_attn_kvcache_fwd", &ifast::cuda::flash_attn_kvcache_fwd, nogil, py::arg("q"),
           py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_lens"), py::arg("block_table"),
           py::arg("softmax_scale"), py::arg("causal"));
  cuda.def("decode_rotary_append", &ifast::cuda::decode_rotary_append, nogil, py::arg("qkv"), py::arg("cos"),
           py::arg("sin"), py::arg("positions"), py::arg("kv_rows"), py::arg("slots"), py::arg("q_heads"));
#else
  m.attr("with_cuda") = false;
#endif
}
