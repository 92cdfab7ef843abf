"""Attention against a preallocated KV cache, flash-attn's `flash_attn_with_kvcache` (same
arguments, order and defaults as flash-attn v2, causal=False included).

New keys/values (k, v), when given, are rotated (optional rotary) and written into the caches in
place at each sequence's `cache_seqlens`; q attends over cache[:cache_seqlens + seqlen_new]. The
caller advances cache_seqlens afterwards, as with flash-attn. cache_seqlens=None means every row of
the cache is valid; appending needs to know where, so k/v then raise (flash-attn refuses the same
call). With a block_table the caches are a paged pool (num_blocks, page_block_size, kv_heads,
head_dim), flash-attn's and vLLM's layout: token t of sequence b lives in block block_table[b, t //
page_block_size], row t % page_block_size, so sequences share one pool and hold only the blocks
their tokens need. Not implemented, refused with a ValueError naming the argument when not at
flash-attn's default: cache_batch_idx, cache_leftpad, window_size, softcap and alibi_slopes.
num_splits is a scheduling hint in flash-attn and is accepted and ignored: the kernels choose their
own split of the cache. As in flash-attn there is no backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, backend
from .flash_attn import (
    ATTN_DTYPES,
    _check_qkv,
    _kernel_dtype,
    _reject_given,
    _reject_unsupported,
    _scale,
    attention_ref,
)
from .rotary import apply_rotary


def _lens_tensor(cache_seqlens: object, batch: int, cache_len: int, device: torch.device) -> Tensor:
    if isinstance(cache_seqlens, bool):
        raise TypeError("cache_seqlens must be None, an int or an int32/int64 tensor of shape (batch,)")
    if cache_seqlens is None:
        return torch.full((batch,), cache_len, dtype=torch.int32, device=device)
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


def _check_block_table(block_table: object, q: Tensor) -> Tensor:
    table = _checks.tensor("block_table", block_table, dtypes=(torch.int32,), dim=2)
    if table.device != q.device:
        raise ValueError(f"block_table is on {table.device} but q is on {q.device}")
    if table.shape[0] != q.shape[0]:
        raise ValueError(f"block_table has {table.shape[0]} rows but q has batch {q.shape[0]}")
    if table.shape[1] > 1 and table.stride(1) != 1:
        raise ValueError("block_table must have a contiguous last dim")
    return table


def _check_blocks(table: Tensor, lens: Tensor, new: int, num_blocks: int, page: int) -> None:
    """Every block a sequence reads or writes must be in the pool (one host read of both tensors)."""
    need = ((lens.cpu().long() + new + page - 1) // page).tolist()
    for b, (n, row) in enumerate(zip(need, table.cpu().tolist())):
        if n > len(row):
            raise ValueError(
                f"sequence {b} needs {n} blocks of {page} tokens (cache_seqlens + seqlen_new) but block_table "
                f"has {len(row)} columns"
            )
        bad = [i for i in row[:n] if not 0 <= i < num_blocks]
        if bad:
            raise ValueError(f"block_table row {b} holds block id {bad[0]} outside the cache's {num_blocks} blocks")


def _check(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, block_table) -> Tensor:
    paged = block_table is not None
    _check_qkv(q, k_cache, v_cache, 4, same_batch=not paged)  # a pool's first dim is its blocks
    table = _check_block_table(block_table, q) if paged else None
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
    if cache_seqlens is None and k is not None:
        raise ValueError(
            "cache_seqlens=None means the whole cache is already valid, so k/v have nowhere to be appended: "
            "pass cache_seqlens (each sequence's length before this call)"
        )
    capacity = k_cache.shape[1] * (table.shape[1] if paged else 1)
    lens = _lens_tensor(cache_seqlens, q.shape[0], capacity, q.device)
    new = 0 if k is None else k.shape[1]
    if paged:
        _check_blocks(table, lens, new, k_cache.shape[0], k_cache.shape[1])
    elif lens.numel() and int(lens.max()) + new > k_cache.shape[1]:
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


def _append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, lens: Tensor, table: Tensor | None) -> None:
    """Writes k, v into the caches at positions lens[b] + t (through the block table), in place."""
    b, s = k.shape[0], k.shape[1]
    pos = lens.to(torch.int64)[:, None] + torch.arange(s, device=k.device)[None, :]
    if table is None:
        blocks, rows = torch.arange(b, device=k.device)[:, None].expand(b, s), pos
    else:
        page = k_cache.shape[1]
        blocks, rows = table.long().gather(1, pos // page), pos % page
    k_cache[blocks, rows] = k
    v_cache[blocks, rows] = v


def gather_pages(cache: Tensor, block_table: Tensor) -> Tensor:
    """A paged cache (num_blocks, page, heads, d) as contiguous per-sequence caches (batch,
    max_blocks * page, heads, d): block_table's blocks in order (ids outside the pool read block 0)."""
    ids = block_table.long().clamp(0, cache.shape[0] - 1).reshape(-1)
    return cache[ids].view(block_table.shape[0], -1, *cache.shape[2:])


@torch.library.custom_op("internlm_fast::flash_attn_kvcache_fwd", mutates_args=())
def _fwd(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lens: Tensor,
    block_table: Tensor | None,
    scale: float,
    causal: bool,
    impl: str,
) -> tuple[Tensor, Tensor]:
    out, lse = backend.kernels(impl).flash_attn_kvcache_fwd(q, k_cache, v_cache, lens, block_table, scale, causal)
    return out, lse


@_fwd.register_fake
def _(q, k_cache, v_cache, lens, block_table, scale, causal, impl):
    b, s, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(b, h, s, dtype=torch.float32)


def attention_kvcache_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_lens: Tensor,
    scale: float,
    causal: bool,
    block_table: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The reference of the kernel flash_attn_kvcache_fwd (the oracle): q (batch, seqlen_q, heads, d)
    against the first cache_lens[b] rows of each sequence's cache (batch, cache_len, kv_heads, d), or
    of its pages (num_blocks, page, kv_heads, d) through block_table, causal aligned to the end of the
    cache. Returns out (batch, seqlen_q, heads, d) and lse (batch, heads, seqlen_q)."""
    if block_table is not None:
        k_cache, v_cache = gather_pages(k_cache, block_table), gather_pages(v_cache, block_table)
    outs, lses = [], []
    for b, n in enumerate(cache_lens.tolist()):
        o, lse = attention_ref(q[b : b + 1], k_cache[b : b + 1, :n], v_cache[b : b + 1, :n], causal, scale)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _check_hints(num_splits: object) -> None:
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits={num_splits!r} must be an int >= 0 (0: choose automatically)")


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
    cache_seqlens: int | Tensor | None = None,
    cache_batch_idx: Tensor | None = None,
    cache_leftpad: Tensor | None = None,
    block_table: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """q (batch, seqlen_q, heads, head_dim) against k_cache/v_cache (batch, cache_len, kv_heads, head_dim), or a paged
    pool (num_blocks, page_block_size, kv_heads, head_dim) with block_table int32 (batch, max_num_blocks_per_seq)
    naming each sequence's blocks in order. k/v (batch, seqlen_new, kv_heads, head_dim), when given, are appended in
    place (through the block table) at cache_seqlens (int or (batch,) tensor: each sequence's length before this
    call; None: the whole cache, no append). causal defaults to False as in flash-attn: a decoding step with several
    new tokens wants causal=True (with one query token both agree). rotary_cos/sin (seqlen_ro, rotary_dim / 2)
    rotate k and q at the cache offset (interleaved by default, as in flash-attn; pass rotary_interleaved=False for
    InternLM/LLaMA's half-rotated layout).
    Returns out (batch, seqlen_q, heads, head_dim), and lse (batch, heads, seqlen_q) on request."""
    # first, so that a paged or batch-indexed cache is named as such, not as a shape mismatch
    _reject_given("cache_batch_idx", cache_batch_idx, "indexing the cache by batch")
    _reject_given("cache_leftpad", cache_leftpad, "a left-padded cache")
    _reject_unsupported(window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes)
    _check_hints(num_splits)
    lens = _check(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, block_table)
    scale = _scale(softmax_scale, q.shape[-1])
    causal = bool(causal)
    impl = backend.select("flash_attn_kvcache", q)
    _kernel_dtype(impl, q)
    if rotary_cos is not None:
        q, k = _rotate(q, k, rotary_cos, rotary_sin, lens, causal, bool(rotary_interleaved))
    if k is not None:
        _append(k_cache, v_cache, k, v, lens, block_table)
        lens = lens + k.shape[1]
    if impl == "ref":
        out, lse = attention_kvcache_ref(q, k_cache, v_cache, lens, scale, causal, block_table)
    else:
        out, lse = _fwd(q, k_cache, v_cache, lens, block_table, scale, causal, impl)
    return (out, lse) if return_softmax_lse else out


def flash_attn_with_kvcache_ref(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, **kwargs
) -> Tensor | tuple[Tensor, Tensor]:
    """The same call through the pure-torch reference (appends into the caches too)."""
    with backend.use_backend("ref"):
        return flash_attn_with_kvcache(q, k_cache, v_cache, **kwargs)
