"""The model's linear layers as it calls them: one or several nn.Linear on the same input, outputs
side by side (q/k/v, gate/up), for training and for decoding.

Training (autograd): with enough tokens one GEMM against the weights concatenated per call, so the
parameters keep their HF names; otherwise each linear on its own.

Decoding (a forward with a KV cache, no autograd): speed at small batch is Python overhead and
reading the weights, so each Projection keeps copies of its weights made once per parameter version:
a transposed (in, out) copy of the linears side by side, and for the few rows of a decode step the
same laid out as column panels, which ops.inference's few_rows_linear streams once on every thread.

Memory rule: fp32 models up to MAX_COPY_BYTES of linear weights keep both copies (the (in, out) one
for prefill, the panels for decode steps), larger ones neither. Where fp32 GEMMs run on oneDNN
(ops.linear) the prefill's copy is the weight in oneDNN's blocked layout instead, which spares
every prefill GEMM its reorder of the weight. bf16 models keep the bf16 panels
(few_rows_linear_bf16) whatever their size: a bf16 decode step is bound by reading the weights, and
F.linear reads the (out, in) parameters well below DRAM speed. Past MAX_COPY_BYTES the panels are the
only copy (prefill reads the parameters through F.linear), so such a model holds its linear weights
twice: the parameters, which training and prefill need, and the panels.

The bf16 inference layout (lay_out_bf16_, InternLMForCausalLM.prepare_inference_) keeps the panels
alone and releases the parameters: decode steps and inputs of up to PANEL_ROWS rows run
few_rows_linear_bf16 on them, longer ones rebuild the (out, in) weight of the one projection for an
F.linear, freed right after. The model then holds its linear weights once, and no longer trains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from internlm_fast.ops.inference import (
    PANEL_COLUMNS,
    InferenceKernels,
    dequantize_int8,
    few_rows_linear_bf16_panels,
    inference_kernels,
    int8_activations,
    quantize_int8,
    unpair_panels,
    write_panels,
)
from internlm_fast.ops.linear import fp32_gemm, linear, linear_prepacked, prepack

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

# Inputs of up to this many rows multiply against the bf16 inference layout's panels through
# few_rows_linear_bf16, which reads each panel once for all the rows; longer ones rebuild the (out, in)
# weight for F.linear. On 2 cores at InternLM-7B's shapes the kernel took 62 ms at 128 rows of q/k/v
# against 90 ms for the rebuild (first-touch page faults of a fresh buffer, mostly) and F.linear, and
# 110 against 115 ms at 256; gate/up and down alike.
PANEL_ROWS = 256
_PANEL_PROBE = torch.empty(PANEL_COLUMNS, 0, dtype=torch.bfloat16)  # asks whether the bf16 kernel runs
# lay_out_bf16_ reads a weight this many bytes (counted in fp32) at a time, so a checkpoint read from
# its file is held twice one slice at a time, not one whole lm_head (845 MB in bf16 at InternLM-7B's)
FILL_BYTES = 64 << 20


class WeightRows(Protocol):
    """An (out, in) weight that gives its rows as a tensor: a tensor, or weight_files.FileRows."""

    shape: torch.Size

    def __getitem__(self, rows: slice) -> Tensor: ...


def packed_linear(x: Tensor, linears: tuple[nn.Linear, ...]) -> Tensor:
    """The outputs of several linears on the same input side by side, [x W_1^T + b_1 | x W_2^T + b_2 | ...].

    With enough tokens it is one GEMM against the concatenated weights: one pass over x, and in the
    backward one input-gradient GEMM and one weight-gradient GEMM, N times larger, which run markedly
    faster than N small ones."""
    if x.numel() < FUSED_GEMM_MIN_TOKENS * x.shape[-1]:
        return torch.cat([linear(x, lin.weight, lin.bias) for lin in linears], dim=-1)
    weight = torch.cat([lin.weight for lin in linears])
    bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
    return linear(x, weight, bias)


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
        self._bf16: tuple | None = None  # (panels, bias, in_features): lay_out_bf16_'s weights

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_key": None, "_copies": None}  # derived data: remade on first use

    def __call__(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        if self._int8 is not None:
            return self.int8_linear(x, ctx.kernels)
        if self._bf16 is not None:
            return self.bf16_linear(x, ctx.kernels)
        if ctx.cache is None:
            if len(self.linears) == 1:
                return linear(x, self.linears[0].weight, self.linears[0].bias)
            return packed_linear(x, self.linears)
        c = self._copies
        if c is None or ctx.cu_seqlens is not None:
            c = self._refresh(ctx.kernels, ctx.copy_weights)
        wt, bias, panels, few_rows, packed = c
        if panels is not None and x.shape[0] <= FEW_ROWS:
            return few_rows(x, panels, bias)
        if packed is not None:
            y = linear_prepacked(x, packed, bias)
            if y is not None:
                return y
        if wt is not None:  # (in, out): F.linear of its transpose is addmm(bias, x, wt)
            return linear(x, wt.t(), bias)
        if len(self.linears) == 1:
            return linear(x, self.linears[0].weight, self.linears[0].bias)
        return torch.cat([linear(x, lin.weight, lin.bias) for lin in self.linears], dim=-1)

    def _versions(self) -> tuple:
        return tuple(
            (p.data_ptr(), p._version) for lin in self.linears for p in (lin.weight, lin.bias) if p is not None
        )

    def _refresh(self, kernels: InferenceKernels, copy: bool) -> tuple:
        """(wt, bias, panels, decode GEMM, packed): the copies, remade unless they were made from these
        very parameters for these kernels and this fp32 GEMM library. Where fp32 GEMMs run on oneDNN
        the prefill's copy is the weight in oneDNN's blocked layout (packed) instead of wt."""
        key = (kernels, copy, fp32_gemm(), self._versions())
        if self._copies is not None and self._key == key:
            return self._copies
        self._copies = None  # the old copies go before the new ones are made, not after
        wt = bias = panels = few_rows = packed = None
        bf16 = all(kernels.has_few_rows_linear_bf16(lin.weight) for lin in self.linears)
        with torch.no_grad():
            if (copy or bf16) and self.linears[0].bias is not None:
                bias = torch.cat([lin.bias for lin in self.linears])
            if copy:
                w = torch.cat([lin.weight for lin in self.linears]) if len(self.linears) > 1 else self.linears[0].weight
                wt = w.t().contiguous()
                if kernels.has_few_rows_linear(wt):
                    panels, few_rows = kernels.column_panels(wt), kernels.few_rows_linear
                packed = prepack(w)
                if packed is not None:
                    wt = None
                del w
            if bf16:
                w = torch.cat([lin.weight for lin in self.linears]) if len(self.linears) > 1 else self.linears[0].weight
                panels, few_rows = few_rows_linear_bf16_panels(w), kernels.few_rows_linear_bf16
        self._key, self._copies = key, (wt, bias, panels, few_rows, packed)
        return self._copies

    @property
    def quantized(self) -> bool:
        return self._int8 is not None

    @property
    def decode_weights(self) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
        """(panels, scales, bias) as the decode GEMMs take them: the int8 weights (scales given), the
        bf16 layout, or the decoding copies' panels (fp32 column panels, or bf16 ones) that the last
        prefill made (scales None); None when the projection holds none of them."""
        if self._int8 is not None:
            return self._int8
        if self._bf16 is not None:
            return self._bf16[0], None, self._bf16[1]
        if self._copies is not None and self._copies[2] is not None:
            return self._copies[2], None, self._copies[1]
        return None

    @property
    def laid_out(self) -> bool:
        """Whether lay_out_bf16_ made the bf16 panels this projection's weights."""
        return self._bf16 is not None

    @property
    def out_features(self) -> int:
        return sum(lin.out_features for lin in self.linears)

    def fits_bf16_layout(self, kernels: InferenceKernels) -> bool:
        """Whether few_rows_linear_bf16 runs on these kernels and takes this projection's linears,
        each a whole number of panels."""
        return kernels.has_few_rows_linear_bf16(_PANEL_PROBE) and all(
            lin.out_features % PANEL_COLUMNS == 0 for lin in self.linears
        )

    def lay_out_bf16_(
        self,
        read: Callable[[nn.Linear], WeightRows] | None = None,
        release: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        """Makes few_rows_linear_bf16's panels of the linears' weights side by side (bf16, whatever
        the weights' dtype) this projection's weights. read(linear) gives each weight (default: the
        parameter itself), or anything that slices into its rows, such as weight_files.FileRows; it is
        copied FILL_BYTES at a time. With release, the weights become empty bf16 parameters
        (inference only from then on); the biases stay."""
        k = self.linears[0].in_features
        shape = (self.out_features // PANEL_COLUMNS, (k + 1) // 2, 2 * PANEL_COLUMNS)
        panels = torch.empty(shape, dtype=torch.bfloat16, device=device)
        step = max(PANEL_COLUMNS, FILL_BYTES // (4 * k) // PANEL_COLUMNS * PANEL_COLUMNS)
        row = 0
        with torch.no_grad():
            for lin in self.linears:
                w = lin.weight if read is None else read(lin)
                for a in range(0, lin.out_features, step):
                    b = min(a + step, lin.out_features)
                    write_panels(panels, (row + a) // PANEL_COLUMNS, w[a:b].detach().to(torch.bfloat16))
                del w
                row += lin.out_features
            bias = None
            if self.linears[0].bias is not None:
                bias = torch.cat([lin.bias for lin in self.linears]).to(torch.bfloat16)
        self._key = self._copies = None
        self._bf16 = (panels, bias, k)
        if release:
            for lin in self.linears:
                lin.weight = nn.Parameter(torch.empty(0, dtype=torch.bfloat16, device=device), requires_grad=False)

    def bf16_linear(self, x: Tensor, kernels: object = None) -> Tensor:
        """x W^T + b with the bf16 layout's weights: up to PANEL_ROWS rows through few_rows_linear_bf16
        on the panels, longer inputs against the (out, in) weight rebuilt for the call and freed
        right after, so one projection at a time is ever held twice."""
        panels, bias, k = self._bf16
        if not isinstance(kernels, InferenceKernels):  # the forward without a cache passes the ops module
            kernels = inference_kernels(panels)
        rows = x.reshape(-1, x.shape[-1])
        if (
            rows.shape[0] <= PANEL_ROWS
            and x.dtype in (torch.float32, torch.bfloat16)
            and kernels.has_few_rows_linear_bf16(_PANEL_PROBE)
        ):
            out = kernels.few_rows_linear_bf16(rows.contiguous(), panels, None if bias is None else bias.to(x.dtype))
            return out.view(*x.shape[:-1], out.shape[-1])
        w = unpair_panels(panels, k).to(x.dtype)
        y = linear(x, w, None if bias is None else bias.to(x.dtype))
        del w
        return y

    def dense_weight(self) -> Tensor:
        """The linears' (out, in) weights side by side, from whatever this projection holds them in
        (a new tensor but for a single linear's parameter)."""
        if self._bf16 is not None:
            return unpair_panels(self._bf16[0], self._bf16[2])
        if len(self.linears) == 1:
            return self.linears[0].weight
        return torch.cat([lin.weight for lin in self.linears])

    def quantize_int8_(self, release: bool = True) -> None:
        """Replaces the decoding copies (or the bf16 layout) by the linears' weights side by side as
        quantize_int8 makes them; with release, the float weights become empty tensors (inference only
        from then on)."""
        with torch.no_grad():
            w = self.dense_weight()
            panels, scales = quantize_int8(w)
            del w
            bias = None
            if self._bf16 is not None:
                bias = self._bf16[1]
            elif self.linears[0].bias is not None:
                bias = torch.cat([lin.bias for lin in self.linears]).detach()
        self._key = self._copies = self._bf16 = None
        self._int8 = (panels, scales, bias)
        if release:
            for lin in self.linears:
                lin.weight.data = torch.empty(0, dtype=lin.weight.dtype, device=lin.weight.device)
                lin.weight.requires_grad_(False)

    def int8_linear(self, x: Tensor, kernels: object = None) -> Tensor:
        """x W^T + b with the int8 weights, x rounded by int8_activations: a decode step's few rows
        through few_rows_linear_int8, which multiplies in integers; longer inputs against the weight
        dequantized to x's dtype, freed as soon as the GEMM is done so one projection at a time is
        ever held in float."""
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
        w = dequantize_int8(panels, scales, x.shape[-1]).to(x.dtype)
        y = linear(int8_activations(x).to(x.dtype), w, None if bias is None else bias.to(x.dtype))
        del w
        return y
