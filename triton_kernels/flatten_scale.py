"""Flatten and scale in Triton: tensors copied end to end into one flat buffer, times a scale.

Kernel contract (identical to internlm_fast._C.cpu):
    flatten_scale_fwd(tensors, out, scale) -> None
        tensors: contiguous, one dtype; out: contiguous 1-D of that dtype (or fp32 for 16-bit
        tensors), at least as long as all tensors together. out[o_i : o_i + n_i] = scale * tensors[i],
        the product in fp32 (fp64 for fp64) and rounded once to out's dtype. Reference:
        internlm_fast/ops/flatten_scale.py.

Memory-bound: one launch per tensor of BLOCK-element programs. A bucket holds tens of tensors, so
the launches are few; a single launch over a pointer table would save them but not bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, emulate_bf16_rounding, store_cast

BLOCK = 4096


@triton.jit
def _flatten_scale_kernel(X, OUT, offset, n, scale, ACC: tl.constexpr, BLOCK: tl.constexpr, BF16_RNE: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = i < n
    x = tl.load(X + i, mask=mask, other=0.0).to(ACC)
    tl.store(OUT + offset + i, store_cast(x * scale, OUT.dtype.element_ty, BF16_RNE), mask=mask)


def flatten_scale_fwd(tensors: list[torch.Tensor], out: torch.Tensor, scale: float) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        if n:
            _flatten_scale_kernel[(triton.cdiv(n, BLOCK),)](
                t, out, offset, n, scale,
                ACC=acc_dtype(t.dtype), BLOCK=BLOCK, BF16_RNE=emulate_bf16_rounding(out.dtype),
            )  # fmt: skip
        offset += n
