"""The op registry: for every op, the kernels a backend must expose to run it and the backends
to try on each device, in order. `backend.select`, `InferenceKernels`, `python -m
internlm_fast.info` and the tests all read this one table.

Backends:
    cpu     C++ kernels, internlm_fast._C.cpu
    cuda    CUDA C++ kernels, internlm_fast._C.cuda
    triton  Triton kernels, internlm_fast.triton_kernels (CUDA tensors; CPU tensors only in
            Triton's interpreter, TRITON_INTERPRET=1)
    aten    PyTorch's own kernel (cuBLAS GEMM, torch.argmax): listed only for decode-only ops whose
            best implementation on that device is the library's, never as a stand-in for a missing
            kernel of ours
    ref     the pure-torch reference, the oracle (never chosen automatically)

Every backend that implements an op exposes the same kernel names with the same arguments (the
contract is written once, in cpp/cpu/ops_cpu.h).
"""

from __future__ import annotations

from dataclasses import dataclass

GPU_ORDER = ("cuda", "triton")


@dataclass(frozen=True)
class Op:
    name: str
    kernels: tuple[str, ...]  # the functions a backend module must have to run this op
    cpu: tuple[str, ...] = ("cpu",)  # backends for CPU tensors, in order
    cuda: tuple[str, ...] = GPU_ORDER  # backends for CUDA tensors, in order
    inference_only: bool = False  # no autograd: decoding's lean path calls the kernel directly

    def order(self, device: str) -> tuple[str, ...]:
        return {"cpu": self.cpu, "cuda": self.cuda}.get(device, ())


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        # RMSNorm, optionally fused with the residual add
        Op("rms_norm", ("rms_norm_fwd", "rms_norm_bwd")),
        # rotary position embedding (flash-attn's apply_rotary_emb)
        Op("rotary", ("rotary_fwd", "rotary_bwd")),
        # silu(gate) * up, plain and packed
        Op("swiglu", ("swiglu_fwd", "swiglu_bwd")),
        # cross-entropy, online softmax
        Op("cross_entropy", ("cross_entropy_fwd", "cross_entropy_bwd")),
        # lm-head GEMM + cross-entropy by chunks, never the full logits
        Op("fused_linear_cross_entropy", ("fused_linear_cross_entropy_fwd", "fused_linear_cross_entropy_bwd")),
        # gradients end to end into a flat bucket, scaled
        Op("flatten_scale", ("flatten_scale_fwd",)),
        # flash attention, dense and varlen. On the GPU the Triton kernel is the flash attention
        # (FlashAttention-2's algorithm, tensor cores through tl.dot); a CUDA C++ one would add compile
        # time for no gain
        Op("flash_attn", ("flash_attn_fwd", "flash_attn_bwd"), cuda=("triton",)),
        # attention of new tokens against a KV cache (split over the cache)
        Op("flash_attn_kvcache", ("flash_attn_kvcache_fwd",), inference_only=True),
        # a decode step's rotary of q and k and the KV-cache append, one pass
        Op("decode_rotary_append", ("decode_rotary_append",), inference_only=True),
        # decode GEMM (few rows x column-panelled weight); cuBLAS on the GPU
        Op("few_rows_linear", ("few_rows_linear",), cpu=("cpu", "aten"), cuda=("aten",), inference_only=True),
        # the same with bf16 weights (pairs of rows interleaved), and with int8 weights and a scale per
        # 64 inputs, dequantized in registers
        Op("few_rows_linear_bf16", ("few_rows_linear_bf16",), cpu=("cpu", "aten"), cuda=("aten",), inference_only=True),
        Op("few_rows_linear_int8", ("few_rows_linear_int8",), cpu=("cpu", "aten"), cuda=("aten",), inference_only=True),
        # a decode step's whole decoder layer (norms, projections in decode-GEMM layout, rotary + append,
        # attention, SwiGLU) in one call: the kernels above, without the Python and dispatch between
        # them; elsewhere (aten) the model calls the layer's ops one by one
        Op("decode_layer", ("decode_layer",), cpu=("cpu", "aten"), cuda=("aten",), inference_only=True),
        # greedy pick, torch.argmax's answer
        Op("argmax_rows", ("argmax_rows",), cpu=("cpu", "aten"), cuda=("aten",), inference_only=True),
    )
}

# Functions of a backend module that are not kernels of an op: the CPU output allocator's controls, the
# run-time instruction-set choice of the kernels that dispatch (isa, and set_isa_cap for tests), and the
# library fp32 GEMMs run on (fp32_gemm, set_fp32_gemm: oneDNN where torch's BLAS leaves AVX-512 idle), the
# route of its bf16 GEMMs (bf16_gemm, set_bf16_gemm: widened to fp32 where ATen's bf16 GEMM is a slow loop),
# what bf16 attention multiplies with (attn_bf16_gemm, set_attn_bf16_gemm: our tiles, or oneDNN's AMX brgemm),
# and the transpose the oneDNN route's backward GEMMs take their operands through (transpose_fp32, transpose_fp32_into).
UTILITIES = frozenset(
    {
        "output_cache_clear",
        "output_cache_stats",
        "isa",
        "set_isa_cap",
        "fp32_gemm",
        "set_fp32_gemm",
        "bf16_gemm",
        "set_bf16_gemm",
        "attn_bf16_gemm",
        "set_attn_bf16_gemm",
        "transpose_fp32",
        "transpose_fp32_into",
    }
)


def op(name: str) -> Op:
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; the registry has {', '.join(OPS)}") from None


def kernel_names() -> set[str]:
    """Every kernel name any op needs."""
    return {k for entry in OPS.values() for k in entry.kernels}
