"""flash-attn's packed-input variants: q, k and v as views into one packed tensor (no copy). The
kernels read strided rows, and autograd sums the three gradients back into the packed tensor's
gradient. Arguments, order and defaults as flash-attn's; see flash_attn.py for the ones refused."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from .flash_attn import ATTN_DTYPES, flash_attn_func, flash_attn_varlen_func


def _packed(name: str, t: object, ndim: int, axis: int, n: int, layout: str) -> tuple[Tensor, ...]:
    t = _checks.tensor(name, t, dtypes=ATTN_DTYPES + (torch.float64,), dim=ndim)
    if t.shape[axis] != n:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {layout} with {n} at dimension {axis}")
    return t.unbind(axis)


def flash_attn_qkvpacked_func(
    qkv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, None]:
    """flash-attn's `flash_attn_qkvpacked_func`: qkv (batch, seqlen, 3, heads, head_dim). Returns as
    `flash_attn_func`."""
    q, k, v = _packed("qkv", qkv, 5, 2, 3, "(batch, seqlen, 3, heads, head_dim)")
    flags = (dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)
    return flash_attn_func(q, k, v, *flags, return_lse=return_lse)


def flash_attn_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, None]:
    """flash-attn's `flash_attn_kvpacked_func`: q (batch, seqlen_q, heads, head_dim), kv (batch,
    seqlen_k, 2, kv_heads, head_dim). Returns as `flash_attn_func`."""
    k, v = _packed("kv", kv, 5, 2, 2, "(batch, seqlen_k, 2, kv_heads, head_dim)")
    flags = (dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)
    return flash_attn_func(q, k, v, *flags, return_lse=return_lse)


def flash_attn_varlen_qkvpacked_func(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, None]:
    """flash-attn's `flash_attn_varlen_qkvpacked_func`: qkv (total, 3, heads, head_dim), one
    cu_seqlens/max_seqlen for queries and keys. Returns as `flash_attn_varlen_func`."""
    q, k, v = _packed("qkv", qkv, 4, 1, 3, "(total, 3, heads, head_dim)")
    flags = (dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, *flags, return_lse=return_lse
    )


def flash_attn_varlen_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, None]:
    """flash-attn's `flash_attn_varlen_kvpacked_func`: q (total_q, heads, head_dim), kv (total_k, 2,
    kv_heads, head_dim). Returns as `flash_attn_varlen_func`."""
    k, v = _packed("kv", kv, 4, 1, 2, "(total_k, 2, kv_heads, head_dim)")
    flags = (dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)
    cu_and_max = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return flash_attn_varlen_func(q, k, v, *cu_and_max, *flags, return_lse=return_lse)
