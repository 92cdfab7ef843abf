"""The model's linear layers as it calls them: one or several nn.Linear on the same input, outputs
side by side (q/k/v, gate/up), for training and for decoding.

Training (autograd): with enough tokens one GEMM against the weights concatenated per call, so the
parameters keep their HF names; otherwise each linear on its own.

Decoding (a forward with a KV cache, no autograd): speed at small batch is Python overhead and
reading the weights, so each Projection keeps copies of its weights made once per parameter version:
a transposed (in, out) copy of the linears side by side, and for the few rows of a decode step the
same laid out as column panels, which ops.inference's few_rows_linear streams once on every thread.

Memory rule: fp32 models up to MAX_COPY_BYTES of linear weights keep both copies (the (in, out) one
for prefill, the panels for decode steps), larger ones neither. bf16 models keep the bf16 panels
(few_rows_linear_bf16) whatever their size: a bf16 decode step is bound by reading the weights, and
F.linear reads the (out, in) parameters well below DRAM speed. Past MAX_COPY_BYTES the panels are the
only copy (prefill reads the parameters through F.linear), so such a model holds its linear weights
twice: the parameters, which training and prefill need and nothing frees, and the panels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from internlm_fast.ops.inference import (
    InferenceKernels,
    dequantize_int8,
    few_rows_linear_bf16_panels,
    quantize_int8,
)

if TYPE_CHECKING:
    from .modeling import ForwardContext

# Below this many tokens (decoding, short prompts) concatenating the weights on every call would
# copy more bytes than the one larger GEMM saves; the outputs are concatenated instead.
FUSED_GEMM_MIN_TOKENS = 512

# A (rows, in) x (in, out) product streams the weight rows in order, about twice as fast at one row
# as F.linear's (out, in) layout on the CPU, and one GEMM instead of three saves the calls. Past
# this many bytes of linear weights in the model (a 7B model) the memory of the copies matters
# more: the parameters are used as they are.
MAX_COPY_BYTES = 1 << 30

# Decode steps of at most this many rows (sequences) run through few_rows_linear on the column
# panels; longer inputs (prefill) use the GEMM on the (in, out) copy.
FEW_ROWS = 16


def packed_linear(x: Tensor, linears: tuple[nn.Linear, ...]) -> Tensor:
    """The outputs of several linears on the same input side by side, [x W_1^T + b_1 | x W_2^T + b_2 | ...].

    With enough tokens it is one GEMM against the concatenated weights: one pass over x, and in the
    backward one input-gradient GEMM and one weight-gradient GEMM, N times larger, which run markedly
    faster than N small ones."""
    if x.numel() < FUSED_GEMM_MIN_TOKENS * x.shape[-1]:
        return torch.cat([lin(x) for lin in linears], dim=-1)
    weight = torch.cat([lin.weight for lin in linears])
    bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
    return F.linear(x, weight, bias)


class Projection:
    """x W^T + b of one or several nn.Linear (its owner's submodules) on the same input.

    Not a module: the linears stay where the HF names put them; this holds them and the decoding
    copies of their weights. A prefill checks the copies against the parameters (rebuilt when one
    was updated in place, replaced or moved, or the kernels changed); the decode steps after it reuse
    them unchecked, since weights do not change within a generation and a check costs more than
    the few-rows GEMM of a small projection."""

    def __init__(self, *linears: nn.Linear) -> None:
        self.linears = linears
        self._key: tuple | None = None  # (kernels, copy, parameter versions) the copies were made for
        self._copies: tuple | None = None  # (wt, bias, panels, decode GEMM)
        self._int8: tuple | None = None  # (panels, scales, bias): quantize_int8_'s weights, then the only ones

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_key": None, "_copies": None}  # derived data: remade on first use

    def __call__(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        if self._int8 is not None:
            return self.int8_linear(x, ctx.kernels)
        if ctx.cache is None:
            if len(self.linears) == 1:
                return self.linears[0](x)
            return packed_linear(x, self.linears)
        c = self._copies
        if c is None or ctx.cu_seqlens is not None:
            c = self._refresh(ctx.kernels, ctx.copy_weights)
        wt, bias, panels, few_rows = c
        if panels is not None and x.shape[0] <= FEW_ROWS:
            return few_rows(x, panels, bias)
        if wt is not None:
            return torch.mm(x, wt) if bias is None else torch.addmm(bias, x, wt)
        if len(self.linears) == 1:
            return F.linear(x, self.linears[0].weight, self.linears[0].bias)
        return torch.cat([F.linear(x, lin.weight, lin.bias) for lin in self.linears], dim=-1)

    def _versions(self) -> tuple:
        return tuple(
            (p.data_ptr(), p._version) for lin in self.linears for p in (lin.weight, lin.bias) if p is not None
        )

    def _refresh(self, kernels: InferenceKernels, copy: bool) -> tuple:
        """(wt, bias, panels, decode GEMM): the copies, remade unless they were made from these very
        parameters for these kernels."""
        key = (kernels, copy, self._versions())
        if self._copies is not None and self._key == key:
            return self._copies
        self._copies = None  # the old copies go before the new ones are made, not after
        wt = bias = panels = few_rows = None
        bf16 = all(kernels.has_few_rows_linear_bf16(lin.weight) for lin in self.linears)
        with torch.no_grad():
            if (copy or bf16) and self.linears[0].bias is not None:
                bias = torch.cat([lin.bias for lin in self.linears])
            if copy:
                wt = torch.cat([lin.weight for lin in self.linears]).t().contiguous()
                if kernels.has_few_rows_linear(wt):
                    panels, few_rows = kernels.column_panels(wt), kernels.few_rows_linear
            if bf16:
                w = torch.cat([lin.weight for lin in self.linears]) if len(self.linears) > 1 else self.linears[0].weight
                panels, few_rows = few_rows_linear_bf16_panels(w), kernels.few_rows_linear_bf16
        self._key, self._copies = key, (wt, bias, panels, few_rows)
        return self._copies

    @property
    def quantized(self) -> bool:
        return self._int8 is not None

    def quantize_int8_(self, release: bool = True) -> None:
        """Replaces the decoding copies by the linears' weights side by side as quantize_int8 makes
        them; with release, the float weights become empty tensors (inference only from then on)."""
        with torch.no_grad():
            w = torch.cat([lin.weight for lin in self.linears]) if len(self.linears) > 1 else self.linears[0].weight
            panels, scales = quantize_int8(w)
            del w
            bias = None
            if self.linears[0].bias is not None:
                bias = torch.cat([lin.bias for lin in self.linears]).detach()
        self._key = self._copies = None
        self._int8 = (panels, scales, bias)
        if release:
            for lin in self.linears:
                lin.weight.data = torch.empty(0, dtype=lin.weight.dtype, device=lin.weight.device)
                lin.weight.requires_grad_(False)

    def int8_linear(self, x: Tensor, kernels: object = None) -> Tensor:
        """x W^T + b with the int8 weights: a decode step's few rows through few_rows_linear_int8,
        which dequantizes in registers; longer inputs against the weight dequantized to x's dtype,
        freed as soon as the GEMM is done so one projection at a time is ever held in float."""
        panels, scales, bias = self._int8
        if (
            x.dim() == 2
            and x.shape[0] <= FEW_ROWS
            and isinstance(kernels, InferenceKernels)
            and kernels.has_few_rows_linear_int8()
            and x.dtype in (torch.float32, torch.bfloat16)
            and x.is_contiguous()
        ):
            return kernels.few_rows_linear_int8(x, panels, scales, bias)
        w = dequantize_int8(panels, scales).to(x.dtype)
        y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
        del w
        return y
