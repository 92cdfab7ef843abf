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
few_rows_linear_ref, argmax_rows_ref) or in their op module (attention_kvcache_ref).
"""

from __future__ import annotations

import torch
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
    "argmax_rows",
)

# columns per panel of few_rows_linear's weight layout (cpp/cpu/few_rows_linear.cpp)
PANEL_COLUMNS = 16


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
