"""The forward kernels without autograd, for decoding: a lean path beside the public ops.

A public op goes through a torch.library custom op, its autograd wrapper and its argument checks:
about 45 us of Python per call. A decode step of a small model makes ~10 op calls per layer, so that
overhead, not the arithmetic, would set the speed. `InferenceKernels` binds each op's backend kernel
once (by device and the forced backend, as the public ops choose) and calls it directly.

Contract: inference only (no autograd; under torch.inference_mode or no_grad), and the caller checks
shapes, dtypes and positions once per forward instead of on every call (the model's cached forward does);
the kernels still refuse malformed tensors themselves (TORCH_CHECK), so nothing reaches memory
unchecked. The "ref" backend maps to the pure-torch references, so the lean path can be tested against
the oracle too; the decode-only kernels' references are public here (decode_rotary_append_ref,
few_rows_linear_ref, few_rows_linear_bf16_ref, few_rows_linear_int8_ref, argmax_rows_ref) or in their
op module (attention_kvcache_ref), and so are the weight layouts of the decode GEMMs
(InferenceKernels.column_panels, few_rows_linear_bf16_panels, quantize_int8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend
from .flash_attn import attention_varlen_ref
from .flash_attn_kvcache import attention_kvcache_ref
from .rms_norm import rms_norm_ref
from .rotary import apply_rotary_ref
from .swiglu import swiglu_ref

# every op a decode step calls; each resolves through the registry (ops/registry.py) once
_OPS = (
    "rms_norm",
    "rotary",
    "swiglu",
    "flash_attn",
    "flash_attn_kvcache",
    "decode_rotary_append",
    "few_rows_linear",
    "few_rows_linear_bf16",
    "few_rows_linear_int8",
    "argmax_rows",
    "decode_layer",
)
# the kernels decode_layer runs: it stands in for them only where all are the C++ ones
_DECODE_LAYER_OPS = (
    "rms_norm",
    "swiglu",
    "flash_attn_kvcache",
    "decode_rotary_append",
    "few_rows_linear",
    "few_rows_linear_bf16",
    "few_rows_linear_int8",
    "decode_layer",
)

# columns per panel of few_rows_linear's weight layout (cpp/cpu/few_rows_linear.cpp), and of the bf16
# and int8 kernels'
PANEL_COLUMNS = 16
# panels per group of the bf16 and int8 kernels' layout (cpp/cpu/few_rows_panels.h says why)
PANEL_GROUP = 4
# input values per scale of few_rows_linear_int8's weights (cpp/cpu/few_rows_linear_int8.cpp says why 64)
INT8_GROUP = 64


def decode_rotary_append_ref(
    qkv: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, kv_rows: Tensor, slots: Tensor, q_heads: int
) -> None:
    """The reference of the kernel decode_rotary_append: rotates q and k of qkv (tokens, q_heads +
    2 * kv_heads, d) in place, token t at positions[t], and copies k and v into row slots[t] of kv_rows
    (rows, 2, kv_heads, d)."""
    n, heads, d = qkv.shape
    kv_heads = (heads - q_heads) // 2
    qk = qkv.view(n, 1, heads, d)[:, :, : q_heads + kv_heads]
    qk.copy_(apply_rotary_ref(qk, cos, sin, False, False, positions))
    kv_rows.index_copy_(0, slots, qkv[:, q_heads:].reshape(n, 2, kv_heads, d))


def few_rows_linear_ref(x: Tensor, wt: Tensor, bias: Tensor | None) -> Tensor:
    """The reference of the kernel few_rows_linear: x (rows, in) @ wt (in, out) + bias, wt being the
    weight the kernel reads as column_panels(wt)."""
    return x @ wt if bias is None else torch.addmm(bias, x, wt)


def _pairs_as_one(t: Tensor) -> torch.dtype:
    """The integer dtype twice as wide as t's: a pair of t's values moves as one element of it."""
    return {1: torch.int16, 2: torch.int32, 4: torch.int64}[t.element_size()]


def _panel_views(panels: Tensor, first: int, end: int):
    """(a, b, view) for panels [first, end) of a pair_panels layout `panels`: panels [a, b) and a view of
    their lines, each pair of values one element twice as wide, shaped (groups, panels of a group, 16,
    pairs) (a run of whole groups, or part of one group as a single group)."""
    total, pairs, _ = panels.shape
    flat = panels.view(-1).view(_pairs_as_one(panels))
    p = first
    while p < end:
        g0 = p - p % PANEL_GROUP
        size = min(PANEL_GROUP, total - g0)
        if p == g0 and size == PANEL_GROUP and end - p >= PANEL_GROUP:
            b = p + (end - p) // PANEL_GROUP * PANEL_GROUP  # every group of [p, end) is whole: end <= total
            lines = flat[p * pairs * PANEL_COLUMNS : b * pairs * PANEL_COLUMNS]
            view = lines.view(-1, pairs, PANEL_GROUP, PANEL_COLUMNS).permute(0, 2, 3, 1)
        else:
            b = min(end, g0 + size)
            lines = flat[g0 * pairs * PANEL_COLUMNS : (g0 + size) * pairs * PANEL_COLUMNS]
            view = lines.view(pairs, size, PANEL_COLUMNS)[:, p - g0 : b - g0].permute(1, 2, 0).unsqueeze(0)
        yield p, b, view
        p = b


def write_panels(panels: Tensor, first: int, weight: Tensor) -> None:
    """Writes the rows of an (out, in) weight, out a multiple of 16, into panels [first, first + out / 16)
    of `panels` (pair_panels' layout, the dtype of weight), without a copy of the whole weight (but
    for an odd in, which is padded first)."""
    n, k = weight.shape
    if k % 2:
        weight = F.pad(weight, (0, 1))
    rows = weight.contiguous().view(_pairs_as_one(weight)).view(n // PANEL_COLUMNS, PANEL_COLUMNS, -1)
    for a, b, view in _panel_views(panels, first, first + n // PANEL_COLUMNS):
        view.copy_(rows[a - first : b - first].view(view.shape))


def pair_panels(weight: Tensor) -> Tensor:
    """An (out, in) weight of any dtype, out a multiple of 16, in the layout of the bf16 and int8
    decode GEMMs: out / 16 panels of 16 columns, ceil(in / 2) pairs each, where pair j of panel p
    holds inputs 2j and 2j + 1 of its 16 columns interleaved, [2c + t] = weight[16p + c, 2j + t]
    (zero past an odd in). The panels are stored in groups of PANEL_GROUP that take turns pair by
    pair (pair j of panel q of the group starting at panel g: line g * pairs + j * size + q, size
    PANEL_GROUP but in a shorter last group), so a thread reads its groups as one sequential stream.
    Shaped (out / 16, ceil(in / 2), 32) for its sizes; index it only through unpair_panels."""
    n, k = weight.shape
    panels = weight.new_empty(n // PANEL_COLUMNS, (k + 1) // 2, 2 * PANEL_COLUMNS)
    write_panels(panels, 0, weight)
    return panels


def unpair_panels(panels: Tensor, in_features: int) -> Tensor:
    """The (out, in) weight that pair_panels laid out as `panels`: a new tensor. The pairs move as
    single elements of twice the width, half the strided copies of moving each value."""
    blocks, pairs, _ = panels.shape
    w = torch.empty(blocks, PANEL_COLUMNS, pairs, dtype=_pairs_as_one(panels), device=panels.device)
    for a, b, view in _panel_views(panels, 0, blocks):
        w[a:b].view(view.shape).copy_(view)
    w = w.view(panels.dtype).view(blocks * PANEL_COLUMNS, 2 * pairs)
    return w if in_features == 2 * pairs else w[:, :in_features]


def few_rows_linear_bf16_panels(weight: Tensor) -> Tensor:
    """An (out, in) weight, out a multiple of 16, as few_rows_linear_bf16 reads it: pair_panels of it in
    bf16, (out / 16, ceil(in / 2), 32) in size: each 64-byte line holds two input rows of 16 columns,
    split into fp32 by two integer ops."""
    n, _ = weight.shape
    if n % PANEL_COLUMNS:
        raise ValueError(f"few_rows_linear_bf16: {n} output features are not whole panels of {PANEL_COLUMNS}")
    return pair_panels(weight.detach().to(torch.bfloat16))


def few_rows_linear_bf16_ref(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The reference of the kernel few_rows_linear_bf16: x (rows, in) @ weight^T + bias with fp32
    accumulation, in x's dtype; weight (out, in) bf16 is what the kernel reads as
    few_rows_linear_bf16_panels(weight)."""
    y = x.float() @ weight.float().t()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """An (out, in) float weight, out a multiple of 16, as few_rows_linear_int8 reads it: symmetric
    int8 with one fp32 scale per INT8_GROUP consecutive inputs of an output feature (scale =
    absmax / 127, q = round(w / scale)), laid out by int8_panels. Each weight is off by at most
    scale / 2."""
    n, k = weight.shape
    if n % PANEL_COLUMNS:
        raise ValueError(f"few_rows_linear_int8: {n} output features are not whole panels of {PANEL_COLUMNS}")
    g = -(-k // INT8_GROUP)
    w = F.pad(weight.detach().float(), (0, g * INT8_GROUP - k)).view(n, g, INT8_GROUP)
    scale = w.abs().amax(-1) / 127
    q = torch.round(w / scale.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).clamp_(-127, 127)
    return int8_panels(q.to(torch.int8).view(n, g * INT8_GROUP)[:, :k], scale)


def int8_panels(q: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """(out, in) int8 weights and their (out, ceil(in / INT8_GROUP)) fp32 scales in few_rows_linear_int8's
    layout: the weights as pair_panels, (out / 16, ceil(in / 2), 32) int8 in size (a 32-byte pair of a
    panel holds 2 inputs x 16 columns, which one sign extension turns into the 16-bit pairs the kernel
    multiplies), the scales (out / 16, ceil(in / INT8_GROUP), 16)."""
    n, g = scale.shape
    scales = scale.reshape(n // PANEL_COLUMNS, PANEL_COLUMNS, g).transpose(1, 2).contiguous()
    return pair_panels(q), scales


def int8_weights(panels: Tensor, scales: Tensor, in_features: int) -> tuple[Tensor, Tensor]:
    """The (out, in) int8 weights and (out, groups) fp32 scales that int8_panels laid out: new tensors."""
    blocks, groups, cols = scales.shape
    return unpair_panels(panels, in_features), scales.transpose(1, 2).reshape(blocks * cols, groups)


def dequantize_int8(panels: Tensor, scales: Tensor, in_features: int) -> Tensor:
    """The (out, in) fp32 weight that quantize_int8's (panels, scales) stand for."""
    q, s = int8_weights(panels, scales, in_features)
    return q.float() * s.repeat_interleave(INT8_GROUP, dim=1)[:, :in_features]


def int8_activations(x: Tensor) -> Tensor:
    """x (..., in) as few_rows_linear_int8 multiplies it, in fp32: each group of INT8_GROUP inputs of
    a row rounded to 16-bit integers on a scale of its own, absmax / 32767 (block floating point with
    a 16-bit mantissa, finer than bf16's 8 bits; each value off by at most half a step); a group
    holding inf or NaN turns to NaN. An int8 model's linears all take their input so, decode kernel
    and dequantized GEMM alike."""
    k = x.shape[-1]
    g = -(-k // INT8_GROUP)
    xg = F.pad(x.float().reshape(-1, k), (0, g * INT8_GROUP - k)).view(-1, g, INT8_GROUP)
    absmax = torch.linalg.vector_norm(xg, float("inf"), dim=-1, keepdim=True)
    # an all-zero group divides by 1 (its values stay 0); one holding inf or NaN by NaN
    scale = torch.where(absmax > 0, absmax / 32767, 1.0).masked_fill_(~absmax.isfinite(), float("nan"))
    q = (xg / scale).round_().clamp_(-32767, 32767).mul_(scale)  # one tensor the size of x beside it
    return q.view(-1, g * INT8_GROUP)[:, :k].reshape(x.shape)


def few_rows_linear_int8_ref(x: Tensor, panels: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """The reference of the kernel few_rows_linear_int8: int8_activations(x) (rows, in) @ W^T + bias
    with fp32 accumulation, in x's dtype, W = dequantize_int8(panels, scales)."""
    y = int8_activations(x) @ dequantize_int8(panels, scales, x.shape[-1]).t()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def argmax_rows_ref(x: Tensor) -> Tensor:
    """The reference of the kernel argmax_rows: the index of each row's maximum, (rows,) int64."""
    return x.argmax(dim=-1)


class InferenceKernels:
    """The forward kernels for tensors living where `like` lives, chosen once from the registry
    (`inference_kernels` keeps one per device type and forced backend)."""

    def __init__(self, like: Tensor) -> None:
        self.impl = {op: backend.select(op, like) for op in _OPS}
        self._k = {op: backend.kernels(impl) if impl not in ("ref", "aten") else None for op, impl in self.impl.items()}
        if self._k["few_rows_linear"] is not None:
            # a decode step makes one call per projection: the kernel itself, without a Python frame
            # (it refuses a non-contiguous x; the model's activations are contiguous)
            self.few_rows_linear = self._k["few_rows_linear"].few_rows_linear
        if self._k["few_rows_linear_bf16"] is not None:
            self.few_rows_linear_bf16 = self._k["few_rows_linear_bf16"].few_rows_linear_bf16
        if self._k["few_rows_linear_int8"] is not None:
            self.few_rows_linear_int8 = self._k["few_rows_linear_int8"].few_rows_linear_int8
        # a decode step's layer in one call (model/modeling.py: DecoderLayer), or None
        self.decode_layer = None
        if all(self.impl[op] == "cpu" for op in _DECODE_LAYER_OPS):
            self.decode_layer = self._k["decode_layer"].decode_layer

    def has_few_rows_linear(self, wt: Tensor) -> bool:
        """Whether few_rows_linear serves this (in, out) weight: the C++ kernel, fp32, whole panels.
        Elsewhere (the GPU) the decode GEMM is the library's (cuBLAS through torch.mm)."""
        return self._k["few_rows_linear"] is not None and wt.dtype == torch.float32 and wt.shape[1] % PANEL_COLUMNS == 0

    @staticmethod
    def column_panels(wt: Tensor) -> Tensor:
        """The (in, out) weight as few_rows_linear reads it: (out / 16, in, 16), each panel contiguous."""
        k, n = wt.shape
        return wt.view(k, n // PANEL_COLUMNS, PANEL_COLUMNS).permute(1, 0, 2).contiguous()

    def few_rows_linear(self, x: Tensor, panels: Tensor, bias: Tensor | None) -> Tensor:
        """x (rows, in) contiguous @ W + bias for a few rows (a decode step), W as column_panels(W).
        Only where has_few_rows_linear: the kernel replaces this method then."""
        raise NotImplementedError(f"few_rows_linear has no kernel on backend {self.impl['few_rows_linear']!r}")

    def has_few_rows_linear_bf16(self, weight: Tensor) -> bool:
        """Whether few_rows_linear_bf16 serves this (out, in) bf16 weight: the C++ kernel, whole panels."""
        return (
            self._k["few_rows_linear_bf16"] is not None
            and weight.dtype == torch.bfloat16
            and weight.shape[0] % PANEL_COLUMNS == 0
        )

    def few_rows_linear_bf16(self, x: Tensor, panels: Tensor, bias: Tensor | None) -> Tensor:
        """x (rows, in) contiguous, fp32 or bf16, @ W^T + bias in x's dtype, W (out, in) bf16 given as
        few_rows_linear_bf16_panels(W). Only where has_few_rows_linear_bf16: the kernel replaces this
        method then."""
        raise NotImplementedError(
            f"few_rows_linear_bf16 has no kernel on backend {self.impl['few_rows_linear_bf16']!r}"
        )

    def has_few_rows_linear_int8(self) -> bool:
        """Whether few_rows_linear_int8 runs here (the C++ kernel)."""
        return self._k["few_rows_linear_int8"] is not None

    def few_rows_linear_int8(self, x: Tensor, panels: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
        """x (rows, in) contiguous, fp32 or bf16, @ W^T + bias in x's dtype, W given as quantize_int8(W).
        Only where has_few_rows_linear_int8: the kernel replaces this method then."""
        raise NotImplementedError(
            f"few_rows_linear_int8 has no kernel on backend {self.impl['few_rows_linear_int8']!r}"
        )

    def argmax(self, x: Tensor) -> Tensor:
        """torch.argmax(x, dim=-1) of (rows, V) logits, by the C++ kernel where it serves (CPU fp32)."""
        kernel = self._k["argmax_rows"]
        if kernel is not None and x.dtype == torch.float32:
            return kernel.argmax_rows(x if x.stride(-1) == 1 else x.contiguous())
        return argmax_rows_ref(x)

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
        """x (rows, hidden) contiguous. Returns y, or (y, x + residual) with a residual."""
        k = self._k["rms_norm"]
        if k is None:
            return rms_norm_ref(x, weight, eps, residual)
        y, summed, _ = k.rms_norm_fwd(x, weight, residual, eps)
        return y if residual is None else (y, summed)

    def rotary_(self, x: Tensor, cos: Tensor, sin: Tensor, offsets: Tensor, cu_seqlens: Tensor | None = None) -> None:
        """Half-rotated rotary of x in place; x (batch, seqlen, heads, d), or (total, heads, d) with
        cu_seqlens; offsets int64 (batch,), the position of each sequence's first token."""
        k = self._k["rotary"]
        if k is None:
            x.copy_(apply_rotary_ref(x, cos, sin, False, False, offsets, cu_seqlens))
        else:
            k.rotary_fwd(x, cos, sin, offsets, cu_seqlens, False, False, x)

    def rotary_append_(
        self, qkv: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, kv_rows: Tensor, slots: Tensor, q_heads: int
    ) -> None:
        """A decode step's new tokens, one per sequence: qkv (tokens, q_heads + 2 * kv_heads, d)
        contiguous. Rotates q and k in place, token t at positions[t] (int64), and writes its k and v
        into row slots[t] (int64) of kv_rows (rows, 2, kv_heads, d): one kernel pass (cos/sin fp32)."""
        k = self._k["decode_rotary_append"]
        if k is None or cos.dtype != torch.float32:
            decode_rotary_append_ref(qkv, cos, sin, positions, kv_rows, slots, q_heads)
        else:
            k.decode_rotary_append(qkv, cos, sin, positions, kv_rows, slots, q_heads)

    def swiglu(self, gate: Tensor, up: Tensor) -> Tensor:
        """silu(gate) * up of two (rows, F) tensors with unit last stride."""
        k = self._k["swiglu"]
        return swiglu_ref(gate, up) if k is None else k.swiglu_fwd(gate, up)

    def swiglu_packed(self, x: Tensor) -> Tensor:
        """silu(x[:, :F]) * x[:, F:] of a (rows, 2F) tensor with unit last stride."""
        return self.swiglu(*x.chunk(2, dim=-1))

    def attend_varlen(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float) -> Tensor:
        """Causal attention of packed sequences (total, heads, d) delimited by int32 cu_seqlens."""
        kern = self._k["flash_attn"]
        if kern is None:
            return attention_varlen_ref(q, k, v, cu_seqlens, cu_seqlens, True, scale)[0]
        return kern.flash_attn_fwd(q, k, v, cu_seqlens, cu_seqlens, scale, True)[0]

    def attend_cache(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, lens: Tensor, scale: float, block_table: Tensor | None = None
    ) -> Tensor:
        """q (batch, seqlen_q, heads, d), causal, against the first lens[b] (int32, already counting
        q's own tokens) tokens of each sequence's cache: (batch, cache_len, kv_heads, d), or pages
        (num_blocks, page, kv_heads, d) through block_table int32 (batch, max_blocks)."""
        kern = self._k["flash_attn_kvcache"]
        if kern is None:
            return attention_kvcache_ref(q, k_cache, v_cache, lens, scale, True, block_table)[0]
        return kern.flash_attn_kvcache_fwd(q, k_cache, v_cache, lens, block_table, scale, True)[0]


_bound: dict[tuple[str, str], InferenceKernels] = {}


def inference_kernels(like: Tensor) -> InferenceKernels:
    """The InferenceKernels for tensors living where `like` lives under the backend forced now, made
    once (choosing them reads the registry: too slow for every decode step)."""
    key = (backend.forced_backend(), like.device.type)
    kernels = _bound.get(key)
    if kernels is None:
        kernels = _bound[key] = InferenceKernels(like)
    return kernels
