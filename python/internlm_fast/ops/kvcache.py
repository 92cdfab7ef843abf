"""Attention against a preallocated KV cache, flash-attn's `flash_attn_with_kvcache`.

New keys/values (k, v), when given, are rotated (optional rotary) and written into the caches in
place at each sequence's `cache_seqlens`; q attends over cache[:cache_seqlens + seqlen_new]. The
caller advances cache_seqlens afterwards, as with flash-attn. Differences from flash-attn: causal
defaults to True (the decoding case), and there is no paged cache, cache_batch_idx or left padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, backend
from .attention import ATTN_DTYPES, _check_qkv, _scale, attention_ref
from .rotary import apply_rotary


def _lens_tensor(cache_seqlens: object, batch: int, device: torch.device) -> Tensor:
    if isinstance(cache_seqlens, bool) or cache_seqlens is None:
        raise TypeError("cache_seqlens must be an int or an int32/int64 tensor of shape (batch,)")
    if isinstance(cache_seqlens, int):
        lens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    else:
        lens = _checks.tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32, torch.int64), dim=1)
        if lens.shape[0] != batch:
            raise ValueError(f"cache_seqlens has {lens.shape[0]} entries but q has batch {batch}")
        if lens.device != device:
            raise ValueError(f"cache_seqlens is on {lens.device} but q is on {device}")
        lens = lens.to(torch.int32)
    if lens.numel() and int(lens.min()) < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got {lens.tolist()}")
    return lens


def _check(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens) -> Tensor:
    _check_qkv(q, k_cache, v_cache, 4)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new keys and values to append)")
    if k is not None:
        _checks.tensor("k", k, dtypes=ATTN_DTYPES + (torch.float64,), dim=4)
        _checks.tensor("v", v, dtypes=ATTN_DTYPES + (torch.float64,), dim=4)
        _checks.same_dtype("q", q, k=k, v=v)
        _checks.same_device("q", q, k=k, v=v)
        want = (q.shape[0], k.shape[1], k_cache.shape[2], k_cache.shape[3])
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != want:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}; expected (batch, seqlen_new, kv_heads, head_dim) = {want}"
                )
    lens = _lens_tensor(cache_seqlens, q.shape[0], q.device)
    new = 0 if k is None else k.shape[1]
    if lens.numel() and int(lens.max()) + new > k_cache.shape[1]:
        raise ValueError(
            f"cache_seqlens + seqlen_new = {int(lens.max()) + new} exceeds the cache length {k_cache.shape[1]}"
        )
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    return lens


def _rotate(q, k, rotary_cos, rotary_sin, lens, causal, interleaved) -> tuple[Tensor, Tensor | None]:
    """Rotary at the cache offset: k's token t at lens + t; q likewise when causal, else every
    query token at position lens (flash-attn's rule)."""
    if k is not None:
        k = apply_rotary(k, rotary_cos, rotary_sin, interleaved=interleaved, seqlen_offsets=lens)
    if causal or q.shape[1] == 1:
        q = apply_rotary(q, rotary_cos, rotary_sin, interleaved=interleaved, seqlen_offsets=lens)
    else:
        b, s, h, d = q.shape
        q_tok = q.reshape(b * s, 1, h, d)
        q = apply_rotary(
            q_tok, rotary_cos, rotary_sin, interleaved=interleaved, seqlen_offsets=lens.repeat_interleave(s)
        ).view(b, s, h, d)
    return q, k


def _append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, lens: Tensor) -> None:
    """Writes k, v into the caches at rows lens[b] + t, in place."""
    b, s = k.shape[0], k.shape[1]
    rows = lens.to(torch.int64)[:, None] + torch.arange(s, device=k.device)[None, :]
    batch = torch.arange(b, device=k.device)[:, None].expand(b, s)
    k_cache[batch, rows] = k
    v_cache[batch, rows] = v


@torch.library.custom_op("internlm_fast::flash_attn_kvcache_fwd", mutates_args=())
def _fwd(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, lens: Tensor, scale: float, causal: bool, impl: str
) -> tuple[Tensor, Tensor]:
    out, lse = backend.kernels(impl).flash_attn_kvcache_fwd(q, k_cache, v_cache, lens, scale, causal)
    return out, lse


@_fwd.register_fake
def _(q, k_cache, v_cache, lens, scale, causal, impl):
    b, s, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(b, h, s, dtype=torch.float32)


def _attend_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, lens: Tensor, scale: float, causal: bool):
    outs, lses = [], []
    for b, n in enumerate(lens.tolist()):
        o, lse = attention_ref(q[b : b + 1], k_cache[b : b + 1, :n], v_cache[b : b + 1, :n], causal, scale)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
    cache_seqlens: int | Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = True,
    rotary_interleaved: bool = True,
    return_softmax_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """q (batch, seqlen_q, heads, head_dim) against k_cache/v_cache (batch, cache_len, kv_heads,
    head_dim). k/v (batch, seqlen_new, kv_heads, head_dim), when given, are appended in place at
    cache_seqlens (int or (batch,) tensor: each sequence's length before this call). rotary_cos/sin
    (seqlen_ro, rotary_dim / 2) rotate k and q at the cache offset (interleaved by default, as in
    flash-attn; pass rotary_interleaved=False for InternLM/LLaMA's half-rotated layout).
    Returns out (batch, seqlen_q, heads, head_dim), and lse (batch, heads, seqlen_q) on request."""
    lens = _check(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens)
    scale = _scale(softmax_scale, q.shape[-1])
    causal = bool(causal)
    impl = backend.select("flash_attn_kvcache", q)
    if rotary_cos is not None:
        q, k = _rotate(q, k, rotary_cos, rotary_sin, lens, causal, bool(rotary_interleaved))
    if k is not None:
        _append(k_cache, v_cache, k, v, lens)
        lens = lens + k.shape[1]
    if impl == "ref":
        out, lse = _attend_ref(q, k_cache, v_cache, lens, scale, causal)
    else:
        out, lse = _fwd(q, k_cache, v_cache, lens, scale, causal, impl)
    return (out, lse) if return_softmax_lse else out


def flash_attn_with_kvcache_ref(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, **kwargs
) -> Tensor | tuple[Tensor, Tensor]:
    """The same call through the pure-torch reference (appends into the caches too)."""
    with backend.use_backend("ref"):
        return flash_attn_with_kvcache(q, k_cache, v_cache, **kwargs)
