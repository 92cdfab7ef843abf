"""The forward kernels without autograd, for decoding: a lean path beside the public ops.

A public op goes through a torch.library custom op, its autograd wrapper and its argument checks:
about 45 us of Python per call. A decode step of a small model makes ~10 op calls per layer, so that
overhead, not the arithmetic, would set the speed. `InferenceKernels` binds each op's backend kernel
once (by device and the forced backend, as the public ops choose) and calls it directly.

Contract: inference only (no autograd; under torch.inference_mode or no_grad), and the caller checks
shapes, dtypes and positions once per generation instead of on every call (infer/decoder.py does);
the kernels still refuse malformed tensors themselves (TORCH_CHECK), so nothing reaches memory
unchecked. The "ref" backend maps to the pure-torch references, so the lean path can be tested against
the oracle too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backend
from .attention import attention_varlen_ref
from .kvcache import _attend_ref
from .rms_norm import rms_norm_ref
from .rotary import apply_rotary_ref
from .swiglu import swiglu_ref

# A decode attention over at most this many cached elements (batch x tokens x kv_heads x head_dim)
# takes ~100 us on one thread, less than waking a second one costs: the CPU kernel would still fork
# its thread pool for a single task, and on shared cores a woken thread can wait milliseconds for a
# time slice (measured: 8 ms per call with 2 threads on a loaded 2-core machine, 50 us with one).
SERIAL_DECODE_ELEMENTS = 1 << 20

_OPS = ("rms_norm", "rotary", "swiglu", "flash_attn", "flash_attn_kvcache")


class InferenceKernels:
    """The forward kernels for tensors living where `like` lives, chosen once."""

    def __init__(self, like: Tensor) -> None:
        self.impl = {op: backend.select(op, like) for op in _OPS}
        self._k = {op: None if impl == "ref" else backend.kernels(impl) for op, impl in self.impl.items()}

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

    def swiglu(self, gate: Tensor, up: Tensor) -> Tensor:
        """silu(gate) * up of two (rows, F) tensors with unit last stride."""
        k = self._k["swiglu"]
        return swiglu_ref(gate, up) if k is None else k.swiglu_fwd(gate, up)

    def attend_varlen(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float) -> Tensor:
        """Causal attention of packed sequences (total, heads, d) delimited by int32 cu_seqlens."""
        kern = self._k["flash_attn"]
        if kern is None:
            return attention_varlen_ref(q, k, v, cu_seqlens, cu_seqlens, True, scale)[0]
        return kern.flash_attn_fwd(q, k, v, cu_seqlens, cu_seqlens, scale, True)[0]

    def attend_cache(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, lens: Tensor, scale: float, longest: int
    ) -> Tensor:
        """q (batch, seqlen_q, heads, d), causal, against the first lens[b] (int32, already counting
        q's own tokens) rows of each sequence's cache; longest = max(lens), known to the caller."""
        kern = self._k["flash_attn_kvcache"]
        if kern is None:
            return _attend_ref(q, k_cache, v_cache, lens, scale, True)[0]
        threads = torch.get_num_threads()
        small = q.shape[0] * longest * k_cache.shape[2] * k_cache.shape[3] <= SERIAL_DECODE_ELEMENTS
        if threads == 1 or not small or self.impl["flash_attn_kvcache"] != "cpu":
            return kern.flash_attn_kvcache_fwd(q, k_cache, v_cache, lens, scale, True)[0]
        torch.set_num_threads(1)
        try:
            return kern.flash_attn_kvcache_fwd(q, k_cache, v_cache, lens, scale, True)[0]
        finally:
            torch.set_num_threads(threads)
