"""Rotary position embedding in Triton (flash-attn's apply_rotary semantics).

Kernel contract (identical to internlm_fast._C.cpu):
    rotary_fwd(x, cos, sin, seqlen_offsets, cu_seqlens, interleaved, conjugate, out) -> Tensor
    rotary_bwd(...same arguments...) = rotary_fwd with `conjugate` flipped (rotating by -angle is the
        transpose of rotating by +angle, so the backward is the forward of the gradient).
x: (batch, seqlen, heads, d), or (total, heads, d) with cu_seqlens (int32, (batch+1,)); unit last
stride, other strides free. cos/sin: (seqlen_ro, rotary_dim / 2), rotary_dim <= d; dims past
rotary_dim are copied. seqlen_offsets: int64 (batch,); token t of sequence b (t counted from the
start of its sequence) sits at position seqlen_offsets[b] + t. Pairs are (i, i + rotary_dim/2), or
(2i, 2i+1) when interleaved. conjugate rotates by -angle. The result goes into `out` when given
(it may be x itself: in place), else into a new contiguous tensor. Positions past seqlen_ro are
left unrotated (cos 1, sin 0) rather than read out of bounds.

The grid runs over tokens, not (batch, seqlen), so varlen needs no max_seqlen from the host (which
would sync a GPU): each token finds its sequence by a binary search over cu_seqlens, a handful of
cached loads. A program handles BLOCK_M tokens x BLOCK_H heads, so the cos/sin rows it loads are
reused across heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, emulate_bf16_rounding, next_pow2, store_cast

TILE = 4096  # rotated pairs per program


@triton.jit
def _rotary_kernel(
    X, OUT, COS, SIN, OFFSETS, CU,
    ntok, seqlen, batch, heads, half, tail, seqlen_ro, search_steps,
    sx_b, sx_s, sx_h, so_b, so_s, so_h, sc_r, sc_c, ss_r, ss_c,
    ACC: tl.constexpr, VARLEN: tl.constexpr, INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr,
    COPY_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BF16_RNE: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    tok_ok = tok < ntok
    if VARLEN:
        # largest b in [0, batch) with cu[b] <= tok: the sequence holding tok (skips empty ones)
        lo = tl.zeros([BLOCK_M], dtype=tl.int64)
        hi = tl.zeros([BLOCK_M], dtype=tl.int64) + batch
        for _ in range(search_steps):
            mid = (lo + hi) // 2
            go = hi - lo > 1
            start = tl.load(CU + mid, mask=tok_ok & go, other=0).to(tl.int64)
            right = start <= tok
            lo = tl.where(go & right, mid, lo)
            hi = tl.where(go & ~right, mid, hi)
        b = lo
        t = tok - tl.load(CU + b, mask=tok_ok, other=0).to(tl.int64)
        x_row = tok * sx_s
        o_row = tok * so_s
    else:
        b = tok // seqlen
        t = tok - b * seqlen
        x_row = b * sx_b + t * sx_s
        o_row = b * so_b + t * so_s
    pos = tl.load(OFFSETS + b, mask=tok_ok, other=0) + t
    pos_ok = tok_ok & (pos >= 0) & (pos < seqlen_ro)

    i = tl.arange(0, BLOCK_K)
    cs_mask = pos_ok[:, None] & (i[None, :] < half)
    cos = tl.load(COS + pos[:, None] * sc_r + i[None, :] * sc_c, mask=cs_mask, other=1.0).to(ACC)
    sin = tl.load(SIN + pos[:, None] * ss_r + i[None, :] * ss_c, mask=cs_mask, other=0.0).to(ACC)
    if CONJUGATE:
        sin = -sin
    cos = cos[:, None, :]
    sin = sin[:, None, :]

    x_base = X + x_row[:, None, None] + h[None, :, None] * sx_h
    o_base = OUT + o_row[:, None, None] + h[None, :, None] * so_h
    row_mask = tok_ok[:, None, None] & (h[None, :, None] < heads)
    mask = row_mask & (i[None, None, :] < half)
    if INTERLEAVED:
        c0 = 2 * i[None, None, :]
        c1 = c0 + 1
    else:
        c0 = i[None, None, :]
        c1 = c0 + half
    x0 = tl.load(x_base + c0, mask=mask, other=0.0).to(ACC)
    x1 = tl.load(x_base + c1, mask=mask, other=0.0).to(ACC)
    tl.store(o_base + c0, store_cast(x0 * cos - x1 * sin, OUT.dtype.element_ty, BF16_RNE), mask=mask)
    tl.store(o_base + c1, store_cast(x0 * sin + x1 * cos, OUT.dtype.element_ty, BF16_RNE), mask=mask)

    if COPY_TAIL:
        for t0 in range(0, tail, BLOCK_T):
            j = 2 * half + t0 + tl.arange(0, BLOCK_T)[None, None, :]
            tmask = row_mask & (j < 2 * half + tail)
            tl.store(o_base + j, tl.load(x_base + j, mask=tmask, other=0.0), mask=tmask)


def _launch(x, cos, sin, seqlen_offsets, cu_seqlens, interleaved, conjugate, out):
    varlen = cu_seqlens is not None
    if x.dim() != (3 if varlen else 4) or x.stride(-1) != 1:
        raise ValueError(
            "rotary (triton): x must be (batch, seqlen, heads, d), or (total, heads, d) with cu_seqlens, "
            "with a unit last stride"
        )
    if cos.dim() != 2 or sin.shape != cos.shape or cos.device != x.device or sin.device != x.device:
        raise ValueError("rotary (triton): cos and sin must be (seqlen_ro, rotary_dim / 2) on x's device")
    half, d = cos.shape[1], x.shape[-1]
    if 2 * half > d:
        raise ValueError(f"rotary (triton): rotary_dim {2 * half} exceeds x's last dimension {d}")
    if varlen:
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1 or cu_seqlens.dtype != torch.int32:
            raise ValueError("rotary (triton): cu_seqlens must be int32 of shape (batch + 1,)")
        cu_seqlens = cu_seqlens.contiguous()
        batch = cu_seqlens.shape[0] - 1
        ntok, heads = x.shape[0], x.shape[1]
        seqlen = 0
        sx_b = so_b = 0
    else:
        batch, seqlen, heads = x.shape[0], x.shape[1], x.shape[2]
        ntok = batch * seqlen
    if isinstance(seqlen_offsets, int):
        seqlen_offsets = torch.full((batch,), seqlen_offsets, dtype=torch.int64, device=x.device)
    if seqlen_offsets.shape != (batch,):
        raise ValueError(f"rotary (triton): seqlen_offsets must have shape ({batch},)")
    seqlen_offsets = seqlen_offsets.to(torch.int64).contiguous()

    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or out.stride(-1) != 1:
        raise ValueError("rotary (triton): out must match x in shape, dtype and device, with a unit last stride")
    if ntok == 0 or heads == 0 or d == 0:
        return out
    if varlen and batch == 0:
        out.copy_(x)  # no sequences: nothing rotates
        return out
    in_place = out.data_ptr() == x.data_ptr() and out.stride() == x.stride()
    tail = d - 2 * half

    if varlen:
        sx_s, sx_h = x.stride(0), x.stride(1)
        so_s, so_h = out.stride(0), out.stride(1)
    else:
        sx_b, sx_s, sx_h = x.stride(0), x.stride(1), x.stride(2)
        so_b, so_s, so_h = out.stride(0), out.stride(1), out.stride(2)
    block_k = next_pow2(half)
    block_h = min(next_pow2(heads), max(TILE // block_k, 1), 16)
    block_m = min(max(TILE // (block_k * block_h), 1), next_pow2(ntok))
    grid = (triton.cdiv(ntok, block_m), triton.cdiv(heads, block_h))
    warps = min(max(block_m * block_h * block_k // 256, 1), 8)
    _rotary_kernel[grid](
        x, out, cos, sin, seqlen_offsets, cu_seqlens if varlen else seqlen_offsets,
        ntok, seqlen, batch, heads, half, tail, cos.shape[0], max(batch, 1).bit_length() if varlen else 0,
        sx_b, sx_s, sx_h, so_b, so_s, so_h, cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        ACC=acc_dtype(x.dtype), VARLEN=varlen, INTERLEAVED=bool(interleaved), CONJUGATE=bool(conjugate),
        COPY_TAIL=tail > 0 and not in_place,
        BLOCK_M=block_m, BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_T=min(next_pow2(tail), 2 * block_k),
        BF16_RNE=emulate_bf16_rounding(x.dtype),
        num_warps=warps,
    )  # fmt: skip
    return out


def rotary_fwd(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    seqlen_offsets: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    interleaved: bool,
    conjugate: bool,
    out: torch.Tensor | None,
) -> torch.Tensor:
    return _launch(x, cos, sin, seqlen_offsets, cu_seqlens, interleaved, conjugate, out)


def rotary_bwd(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    seqlen_offsets: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    interleaved: bool,
    conjugate: bool,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """x is the incoming gradient (the C++ kernels' name: the backward is the forward's signature)."""
    return _launch(x, cos, sin, seqlen_offsets, cu_seqlens, interleaved, not conjugate, out)
