// The one pybind11 module, internlm_fast._C: a submodule per compiled backend, each exposing the
// same kernel names, so Python picks a backend with getattr(_C, "cpu" | "cuda").
#include <torch/extension.h>

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

  auto cpu = m.def_submodule("cpu", "C++ CPU kernels");
  cpu.def("output_cache_clear", &ifast::cpu::output_cache_clear);
  cpu.def("output_cache_stats", &ifast::cpu::output_cache_stats);
  cpu.def("rms_norm_fwd", &ifast::cpu::rms_norm_fwd, nogil);
  cpu.def("rms_norm_bwd", &ifast::cpu::rms_norm_bwd, nogil);
  cpu.def("flash_attn_fwd", &ifast::cpu::flash_attn_fwd, nogil);
  cpu.def("flash_attn_bwd", &ifast::cpu::flash_attn_bwd, nogil);
  cpu.def("flash_attn_kvcache_fwd", &ifast::cpu::flash_attn_kvcache_fwd, nogil);
  cpu.def("rotary_fwd", &ifast::cpu::rotary_fwd, nogil, py::arg("x"), py::arg("cos"), py::arg("sin"),
          py::arg("seqlen_offsets"), py::arg("cu_seqlens"), py::arg("interleaved"), py::arg("conjugate"),
          py::arg("out"));
  cpu.def("rotary_bwd", &ifast::cpu::rotary_bwd, nogil, py::arg("x"), py::arg("cos"), py::arg("sin"),
          py::arg("seqlen_offsets"), py::arg("cu_seqlens"), py::arg("interleaved"), py::arg("conjugate"),
          py::arg("out"));
  cpu.def("swiglu_fwd", &ifast::cpu::swiglu_fwd, nogil);
  cpu.def("swiglu_bwd", &ifast::cpu::swiglu_bwd, nogil);
  cpu.def("cross_entropy_fwd", &ifast::cpu::cross_entropy_fwd, nogil);
  cpu.def("cross_entropy_bwd", &ifast::cpu::cross_entropy_bwd, nogil);
  cpu.def("fused_linear_cross_entropy_fwd", &ifast::cpu::fused_linear_cross_entropy_fwd, nogil);
  cpu.def("fused_linear_cross_entropy_bwd", &ifast::cpu::fused_linear_cross_entropy_bwd, nogil);
  cpu.def("flatten_scale_fwd", &ifast::cpu::flatten_scale_fwd, nogil);
  cpu.def("few_rows_linear", &ifast::cpu::few_rows_linear, nogil);
  cpu.def("argmax_rows", &ifast::cpu::argmax_rows, nogil);
  cpu.def("decode_rotary_append", &ifast::cpu::decode_rotary_append, nogil);

#ifdef IFAST_WITH_CUDA
  m.attr("with_cuda") = true;
  auto cuda = m.def_submodule("cuda", "CUDA kernels");
  cuda.def("rms_norm_fwd", &ifast::cuda::rms_norm_fwd, nogil);
  cuda.def("rms_norm_bwd", &ifast::cuda::rms_norm_bwd, nogil);
  cuda.def("flatten_scale_fwd", &ifast::cuda::flatten_scale_fwd, nogil);
  cuda.def("rotary_fwd", &ifast::cuda::rotary_fwd, nogil, py::arg("x"), py::arg("cos"), py::arg("sin"),
           py::arg("seqlen_offsets"), py::arg("cu_seqlens"), py::arg("interleaved"), py::arg("conjugate"),
           py::arg("out"));
  cuda.def("rotary_bwd", &ifast::cuda::rotary_bwd, nogil, py::arg("x"), py::arg("cos"), py::arg("sin"),
           py::arg("seqlen_offsets"), py::arg("cu_seqlens"), py::arg("interleaved"), py::arg("conjugate"),
           py::arg("out"));
  cuda.def("swiglu_fwd", &ifast::cuda::swiglu_fwd, nogil);
  cuda.def("swiglu_bwd", &ifast::cuda::swiglu_bwd, nogil);
  cuda.def("cross_entropy_fwd", &ifast::cuda::cross_entropy_fwd, nogil);
  cuda.def("cross_entropy_bwd", &ifast::cuda::cross_entropy_bwd, nogil);
  cuda.def("fused_linear_cross_entropy_fwd", &ifast::cuda::fused_linear_cross_entropy_fwd, nogil);
  cuda.def("fused_linear_cross_entropy_bwd", &ifast::cuda::fused_linear_cross_entropy_bwd, nogil);
  cuda.def("flash_attn_kvcache_fwd", &ifast::cuda::flash_attn_kvcache_fwd, nogil);
  cuda.def("decode_rotary_append", &ifast::cuda::decode_rotary_append, nogil);
#else
  m.attr("with_cuda") = false;
#endif
}
