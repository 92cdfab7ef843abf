"""A decode step's rotary + KV-cache append in Triton, one pass over the new tokens' qkv.

Kernel contract (identical to internlm_fast._C.cpu):
    decode_rotary_append(qkv, cos, sin, positions, kv_rows, slots, q_heads) -> None
        qkv (tokens, q_heads + 2 * kv_heads, D) contiguous: rotates the q and k heads in place
        (half-rotated pairs (i, i + rd / 2), rd = 2 * cos.shape[1] <= D, dims past rd untouched),
        token t at row positions[t] (int64) of the fp32 tables cos/sin (positions, rd / 2), then
        copies its rotated k heads and its v heads into kv_rows[slots[t]] (rows, 2, kv_heads, D).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, emulate_bf16_rounding, next_pow2, store_cast


@triton.jit
def _rotary_append_kernel(
    QKV, COS, SIN, POS, KV, SLOTS,
    q_heads, kv_heads, n_pos, n_rows, sr_row, sr_kv, sr_h,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, ACC: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_TAIL: tl.constexpr, BF16_RNE: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0).to(tl.int64)
    heads = q_heads + 2 * kv_heads
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pos = tl.load(POS + tok)
    slot = tl.load(SLOTS + tok)
    # the host checks both on CPU tensors; on a GPU (where that would sync) a token out of range is
    # skipped rather than read or written out of bounds
    ok = (pos >= 0) & (pos < n_pos) & (slot >= 0) & (slot < n_rows)
    # bounds folded into scalars: Triton's interpreter types scalar & block masks as int32
    pos = tl.where(ok, pos, 0)
    h_ok = h < tl.where(ok, heads, 0)
    rot = h < q_heads + kv_heads  # q and k heads rotate, v heads are only copied
    to_cache = h >= q_heads
    kv = (h - q_heads) // kv_heads  # 0: key, 1: value
    hc = (h - q_heads) % kv_heads
    x_base = QKV + (tok * heads + h[:, None]) * HEAD_DIM
    c_base = KV + slot * sr_row + kv[:, None].to(tl.int64) * sr_kv + hc[:, None] * sr_h

    i = tl.arange(0, BLOCK_K)
    i_ok = i < HALF
    cos = tl.load(COS + pos * HALF + i, mask=i_ok, other=1.0).to(ACC)[None, :]
    sin = tl.load(SIN + pos * HALF + i, mask=i_ok, other=0.0).to(ACC)[None, :]
    mask = h_ok[:, None] & i_ok[None, :]
    x0 = tl.load(x_base + i[None, :], mask=mask, other=0.0)
    x1 = tl.load(x_base + HALF + i[None, :], mask=mask, other=0.0)
    a0, a1 = x0.to(ACC), x1.to(ACC)
    # rounded once to the storage dtype; the cache gets the same bits as qkv
    y0 = store_cast(a0 * cos - a1 * sin, QKV.dtype.element_ty, BF16_RNE)
    y1 = store_cast(a0 * sin + a1 * cos, QKV.dtype.element_ty, BF16_RNE)
    y0 = tl.where(rot[:, None], y0, x0)
    y1 = tl.where(rot[:, None], y1, x1)
    rmask = mask & rot[:, None]
    tl.store(x_base + i[None, :], y0, mask=rmask)
    tl.store(x_base + HALF + i[None, :], y1, mask=rmask)
    cmask = mask & to_cache[:, None]
    tl.store(c_base + i[None, :], y0, mask=cmask)
    tl.store(c_base + HALF + i[None, :], y1, mask=cmask)
    if HAS_TAIL:
        tmask = h_ok[:, None] & to_cache[:, None]
        for t0 in range(2 * HALF, HEAD_DIM, BLOCK_T):
            j = t0 + tl.arange(0, BLOCK_T)[None, :]
            jm = tmask & (j < HEAD_DIM)
            tl.store(c_base + j, tl.load(x_base + j, mask=jm, other=0.0), mask=jm)


def decode_rotary_append(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    kv_rows: torch.Tensor,
    slots: torch.Tensor,
    q_heads: int,
) -> None:
    if qkv.dim() != 3 or not qkv.is_contiguous():
        raise RuntimeError("decode_rotary_append: qkv must be a contiguous tensor (tokens, q_heads + 2 * kv_heads, D)")
    n, heads, D = qkv.shape
    hk = (heads - q_heads) // 2
    if not (q_heads > 0 and hk > 0 and q_heads + 2 * hk == heads):
        raise RuntimeError("decode_rotary_append: qkv's heads must be q_heads + 2 * kv_heads")
    if (
        kv_rows.dim() != 4
        or tuple(kv_rows.shape[1:]) != (2, hk, D)
        or kv_rows.stride(-1) != 1
        or kv_rows.dtype != qkv.dtype
        or kv_rows.device != qkv.device
    ):
        raise RuntimeError(
            "decode_rotary_append: kv_rows must be (rows, 2, kv_heads, D) of qkv's dtype with a unit last stride"
        )
    if (
        cos.dim() != 2
        or sin.shape != cos.shape
        or not (cos.is_contiguous() and sin.is_contiguous())
        or cos.dtype != torch.float32
        or sin.dtype != torch.float32
        or 2 * cos.shape[1] > D
        or cos.device != qkv.device
        or sin.device != qkv.device
    ):
        raise RuntimeError("decode_rotary_append: cos and sin must be contiguous fp32 (positions, rotary_dim / 2)")
    if (
        positions.dtype != torch.int64
        or slots.dtype != torch.int64
        or positions.numel() != n
        or slots.numel() != n
        or not (positions.is_contiguous() and slots.is_contiguous())
        or positions.device != qkv.device
        or slots.device != qkv.device
    ):
        raise RuntimeError("decode_rotary_append: positions and slots must be contiguous int64 (tokens,)")
    n_pos, rows = cos.shape[0], kv_rows.shape[0]
    if qkv.device.type == "cpu":
        for t, (p, s) in enumerate(zip(positions.tolist(), slots.tolist())):
            if not 0 <= p < n_pos:
                raise RuntimeError(
                    f"decode_rotary_append: position {p} of token {t} is outside the rotary table ({n_pos} positions)"
                )
            if not 0 <= s < rows:
                raise RuntimeError(f"decode_rotary_append: slot {s} of token {t} is outside the cache ({rows} rows)")
    if n == 0:
        return
    half = cos.shape[1]
    tail = D - 2 * half
    block_k = next_pow2(half)
    block_h = min(next_pow2(heads), max(1, 2048 // block_k))
    _rotary_append_kernel[(n, triton.cdiv(heads, block_h))](
        qkv, cos, sin, positions, kv_rows, slots,
        q_heads, hk, n_pos, rows, kv_rows.stride(0), kv_rows.stride(1), kv_rows.stride(2),
        HEAD_DIM=D, HALF=half, ACC=acc_dtype(qkv.dtype),
        BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_T=min(next_pow2(tail), 128),
        HAS_TAIL=tail > 0, BF16_RNE=emulate_bf16_rounding(qkv.dtype),
        num_warps=4,
    )  # fmt: skip
