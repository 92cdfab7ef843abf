"""Flash attention (FlashAttention-2) in Triton over packed variable-length sequences.

Kernel contract (identical to internlm_fast._C.cpu, see cpp/cpu/ops_cpu.h):
    flash_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal) -> [out, lse]
    flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
        -> [dq, dk, dv]
q (total_q, Hq, D), k/v (total_k, Hk, D) with a unit last stride and free other strides (views of a
packed qkv projection work as they are); cu_seqlens int32 (batch + 1,). Hq % Hk == 0: query head h
reads kv head h // (Hq / Hk), and the gradients of a kv head sum over its query heads. Causal masks
align bottom-right: query i of a sequence sees key j when j <= i + len_k - len_q; a row that sees
no key outputs zeros with lse = +inf. out is a new contiguous tensor in q's dtype, lse (Hq, total_q)
fp32 natural-log; dq/dk/dv new contiguous tensors in the inputs' dtype. fp16, bf16, fp32; head_dim
a multiple of 8 up to 256. Reference: internlm_fast/ops/flash_attn.py::attention_ref.

Forward: one program per (query block, head, sequence) streams the key blocks with an online
softmax in base 2. Key blocks split into a run that needs no mask (every key visible to every row
of the block) and a short tail that does (the causal diagonal and the end of the sequence); blocks
wholly above the causal diagonal are never visited.

Backward: delta = rowsum(dout * out) first, then two kernels that rebuild P from lse: one program
per (key block, kv head) accumulates dk/dv over the query heads of its group and the query blocks
and writes them once; one program per (query block, head) accumulates dq over the key blocks. No
atomics, so gradients are deterministic. When a GQA group leaves too few kv programs to fill the
GPU, the group's heads are split over several programs writing fp32 partials that are summed in a
fixed order.

Programs map to sequences by a grid of (blocks of the longest sequence, heads, sequences): the
longest length is the one host read of cu_seqlens; programs past their sequence's end return.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import emulate_bf16_rounding, interpreted, next_pow2, num_programs, store_cast

# kernels may read module globals only when they are constexpr; the host uses the plain float
_LOG2E = 1.4426950408889634
LOG2E = tl.constexpr(_LOG2E)
LN2 = tl.constexpr(0.6931471805599453)
MAX_GRID_Z = 65535  # CUDA's limit on grid dimensions 1 and 2

# (block_m, block_n) under Triton's interpreter, where every op costs the same whatever its size:
# small, so test shapes cross several blocks and partial ones, and unequal in the same sense as on a
# GPU (more query rows than keys per forward/dq step, more keys than query rows in dk/dv), so the
# causal block ranges are exercised with both orders. A module attribute so tests can change it.
INTERPRET_BLOCKS = {"fwd": (32, 16), "dq": (32, 16), "dkdv": (16, 32)}
# Force the number of programs a GQA group is split over in the dk/dv kernel (None: by occupancy).
DKDV_SPLIT: int | None = None

# Launch configurations on a GPU, tried in order: the next one takes over if Triton reports that one
# does not fit in shared memory. Keyed by the padded head dim; (block_m, block_n, warps, stages).
# Chosen so the sm_90 builds of bf16 kernels neither spill registers nor exceed 164 KB of shared
# memory (the A100's limit), checked with ptxas; not tuned by timing.
_FWD_CONFIGS = {
    64: [(128, 64, 4, 3), (64, 64, 4, 2), (32, 32, 4, 1)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (32, 32, 4, 1)],
    256: [(64, 32, 8, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
}
# dk/dv: block_n keys held per program, block_m the query step.
_DKDV_CONFIGS = {
    64: [(64, 128, 8, 3), (32, 64, 4, 2), (16, 32, 4, 1)],
    128: [(16, 128, 8, 3), (16, 128, 8, 2), (16, 64, 4, 1)],
    256: [(32, 32, 8, 2), (16, 32, 8, 1), (16, 16, 4, 1)],
}
_DQ_CONFIGS = {
    64: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 32, 4, 2), (32, 16, 4, 1)],
    128: [(128, 64, 8, 2), (64, 32, 4, 2), (32, 16, 4, 1)],
    256: [(64, 16, 8, 2), (32, 32, 8, 1), (16, 16, 4, 1)],
}
# fp32 products run on CUDA cores (IEEE, not TF32), whose dots hold whole operand rows per thread:
# much smaller tiles keep them from spilling. Per kernel.
_FP32_CONFIGS = {
    "fwd": {64: [(32, 32, 4, 2), (16, 16, 4, 1)], 128: [(16, 16, 4, 2), (16, 16, 4, 1)], 256: [(16, 16, 8, 2)]},
    "dq": {64: [(32, 32, 8, 2), (16, 16, 4, 1)], 128: [(32, 32, 8, 2), (16, 16, 4, 1)], 256: [(16, 16, 8, 2)]},
    "dkdv": {64: [(32, 32, 8, 2), (16, 16, 4, 1)], 128: [(32, 32, 8, 2), (16, 16, 4, 1)], 256: [(16, 32, 8, 2)]},
}
_chosen: dict[tuple, int] = {}


@triton.jit
def _load_tile(ptrs, row_ok, d_ok, ROW_MASK: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    if ROW_MASK:
        if EVEN_D:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    if UPCAST:
        # Triton's interpreter multiplies bf16 dot operands as their raw uint16 bits: there tiles
        # are widened on load (exact) and products are rounded to bf16 by hand before the dots
        x = x.to(tl.float32)
    return x


@triton.jit
def _seq_bounds(CU_Q, CU_K, b):
    q_start = tl.load(CU_Q + b)
    len_q = tl.load(CU_Q + b + 1) - q_start
    k_start = tl.load(CU_K + b)
    len_k = tl.load(CU_K + b + 1) - k_start
    return q_start, len_q, k_start, len_k


@triton.jit
def _key_range(start_m, len_q, len_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [0, full) are visible to every row of the query block starting at start_m and need no
    mask; [full, hi) need one; keys from hi on are invisible to all its rows."""
    if CAUSAL:
        off = len_k - len_q
        hi = tl.maximum(tl.minimum(len_k, start_m + BLOCK_M + off), 0)
        full = tl.maximum(tl.minimum(len_k, start_m + off + 1), 0)
    else:
        hi = len_k
        full = len_k
    full = (full // BLOCK_N) * BLOCK_N
    return full, hi


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, sk_t, sv_t, rows, offs_n, d_ok, lo, hi, len_k, causal_off, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, BF16_RNE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < len_k
        k = _load_tile(k_ptrs, col_ok, d_ok, MASKED, EVEN_D, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if MASKED:
            valid = col_ok[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None] + causal_off)
            qk = tl.where(valid, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # a row with nothing visible yet keeps m = -inf; subtracting 0 keeps exp2 at 0, not NaN
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_sub = m_new
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptrs, col_ok, d_ok, MASKED, EVEN_D, UPCAST)
        acc = tl.dot(
            store_cast(p, v_ptrs.dtype.element_ty, BF16_RNE).to(v.dtype), v, acc * alpha[:, None], input_precision=PREC
        )
        m_i = m_new
        k_ptrs += BLOCK_N * sk_t
        v_ptrs += BLOCK_N * sv_t
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, CU_Q, CU_K,
    b0, total_q, group, qk_scale,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
    D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, PREC: tl.constexpr, BF16_RNE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    if CAUSAL:
        # the longest rows first, so the short diagonal-only blocks fill in at the end
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2) + b0
    q_start, len_q, k_start, len_k = _seq_bounds(CU_Q, CU_K, b)
    start_m = pid_m * BLOCK_M
    if start_m >= len_q:
        return
    hk = h // group
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rows = start_m + offs_m
    row_ok = rows < len_q

    # 64-bit base offsets (token * stride overflows int32 on long packed batches); in-tile offsets
    # stay 32-bit
    q_ptrs = Q + (q_start + start_m).to(tl.int64) * sq_t + h.to(tl.int64) * sq_h
    q = _load_tile(q_ptrs + offs_m[:, None] * sq_t + offs_d[None, :], row_ok, d_ok, True, EVEN_D, UPCAST)
    k_ptrs = K + k_start.to(tl.int64) * sk_t + hk.to(tl.int64) * sk_h + offs_n[:, None] * sk_t + offs_d[None, :]
    v_ptrs = V + k_start.to(tl.int64) * sv_t + hk.to(tl.int64) * sv_h + offs_n[:, None] * sv_t + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full, hi = _key_range(start_m, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
    causal_off = len_k - len_q
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, sk_t, sv_t, rows, offs_n, d_ok, 0, full, len_k, causal_off, qk_scale,
        False, CAUSAL, EVEN_D, BLOCK_N, PREC, BF16_RNE, UPCAST,
    )  # fmt: skip
    full64 = full.to(tl.int64)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_ptrs + full64 * sk_t, v_ptrs + full64 * sv_t, sk_t, sv_t, rows, offs_n, d_ok,
        full, hi, len_k, causal_off, qk_scale,
        True, CAUSAL, EVEN_D, BLOCK_N, PREC, BF16_RNE, UPCAST,
    )  # fmt: skip

    # rows that saw no key: l = 0, acc = 0 -> zeros and lse = +inf
    empty = l_i == 0.0
    l_div = tl.where(empty, 1.0, l_i)
    out = acc / l_div[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_div)) * LN2)
    tl.store(LSE + h.to(tl.int64) * total_q + q_start + rows, lse, mask=row_ok)
    o_ptrs = OUT + (q_start + start_m).to(tl.int64) * so_t + h.to(tl.int64) * so_h
    o_ptrs += offs_m[:, None] * so_t + offs_d[None, :]
    tl.store(o_ptrs, store_cast(out, OUT.dtype.element_ty, BF16_RNE), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_delta_kernel(
    OUT, DO, DELTA, total_q,
    so_t, so_h, sdo_t, sdo_h,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (t < total_q)[:, None] & (offs_d < D)[None, :]
    o = tl.load(OUT + t[:, None] * so_t + h * so_h + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + t[:, None] * sdo_t + h * sdo_h + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + h * total_q + t, tl.sum(o * do, 1), mask=t < total_q)


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta, k_ptrs, v_ptrs, sk_t, sv_t, rows, offs_n, d_ok, lo, hi, len_k, causal_off, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, BF16_RNE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < len_k
        k = _load_tile(k_ptrs, col_ok, d_ok, MASKED, EVEN_D, UPCAST)
        v = _load_tile(v_ptrs, col_ok, d_ok, MASKED, EVEN_D, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        # rows that saw no key have lse = +inf: p = 0, they contribute nothing
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            valid = col_ok[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None] + causal_off)
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(store_cast(ds, k_ptrs.dtype.element_ty, BF16_RNE).to(k.dtype), k, dq, input_precision=PREC)
        k_ptrs += BLOCK_N * sk_t
        v_ptrs += BLOCK_N * sv_t
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    b0, total_q, group, qk_scale, sm_scale,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdq_t, sdq_h,
    D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, PREC: tl.constexpr, BF16_RNE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2) + b0
    q_start, len_q, k_start, len_k = _seq_bounds(CU_Q, CU_K, b)
    start_m = pid_m * BLOCK_M
    if start_m >= len_q:
        return
    hk = h // group
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rows = start_m + offs_m
    row_ok = rows < len_q
    tile = offs_m[:, None]
    q_row0 = (q_start + start_m).to(tl.int64)
    q = _load_tile(
        Q + q_row0 * sq_t + h.to(tl.int64) * sq_h + tile * sq_t + offs_d[None, :], row_ok, d_ok, True, EVEN_D, UPCAST
    )
    do = _load_tile(
        DO + q_row0 * sdo_t + h.to(tl.int64) * sdo_h + tile * sdo_t + offs_d[None, :],
        row_ok,
        d_ok,
        True,
        EVEN_D,
        UPCAST,
    )
    stat = h.to(tl.int64) * total_q + q_start + rows
    lse2 = tl.load(LSE + stat, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
    k_ptrs = K + k_start.to(tl.int64) * sk_t + hk.to(tl.int64) * sk_h + offs_n[:, None] * sk_t + offs_d[None, :]
    v_ptrs = V + k_start.to(tl.int64) * sv_t + hk.to(tl.int64) * sv_h + offs_n[:, None] * sv_t + offs_d[None, :]

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full, hi = _key_range(start_m, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
    causal_off = len_k - len_q
    dq = _dq_inner(
        dq, q, do, lse2, delta, k_ptrs, v_ptrs, sk_t, sv_t, rows, offs_n, d_ok, 0, full, len_k, causal_off, qk_scale,
        False, CAUSAL, EVEN_D, BLOCK_N, PREC, BF16_RNE, UPCAST,
    )  # fmt: skip
    full64 = full.to(tl.int64)
    dq = _dq_inner(
        dq, q, do, lse2, delta, k_ptrs + full64 * sk_t, v_ptrs + full64 * sv_t, sk_t, sv_t, rows, offs_n, d_ok,
        full, hi, len_k, causal_off, qk_scale,
        True, CAUSAL, EVEN_D, BLOCK_N, PREC, BF16_RNE, UPCAST,
    )  # fmt: skip
    dq_ptrs = DQ + q_row0 * sdq_t + h.to(tl.int64) * sdq_h + tile * sdq_t + offs_d[None, :]
    tl.store(dq_ptrs, store_cast(dq * sm_scale, DQ.dtype.element_ty, BF16_RNE), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_ptrs, do_ptrs, LSE_H, DELTA_H, sq_t, sdo_t, cols, offs_m, d_ok, lo, hi, len_q, causal_off,
    qk_scale,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
    PREC: tl.constexpr, BF16_RNE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # P^T is built directly (keys along rows) so dv += P^T dO and dk += dS^T Q need no transposes of
    # the accumulators. Keys past the sequence only touch their own (unstored) dk/dv rows.
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < len_q
        q = _load_tile(q_ptrs, row_ok, d_ok, True, EVEN_D, UPCAST)
        do = _load_tile(do_ptrs, row_ok, d_ok, True, EVEN_D, UPCAST)
        # rows past the sequence get lse = +inf (p = 0), as do rows that saw no key
        lse2 = tl.load(LSE_H + rows, mask=row_ok, other=float("inf")) * LOG2E
        delta = tl.load(DELTA_H + rows, mask=row_ok, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=PREC)
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        if MASKED:
            pT = tl.where(cols[:, None] <= rows[None, :] + causal_off, pT, 0.0)
        dv = tl.dot(store_cast(pT, do_ptrs.dtype.element_ty, BF16_RNE).to(do.dtype), do, dv, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(store_cast(dsT, q_ptrs.dtype.element_ty, BF16_RNE).to(q.dtype), q, dk, input_precision=PREC)
        q_ptrs += BLOCK_M * sq_t
        do_ptrs += BLOCK_M * sdo_t
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    b0, total_q, group, heads_per_split, Hk, qk_scale, sm_scale,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdk_s, sdk_t, sdk_h, sdv_s, sdv_t, sdv_h,
    D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, PREC: tl.constexpr, BF16_RNE: tl.constexpr, UPCAST: tl.constexpr, STORE_RNE: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    hk = tl.program_id(1) % Hk
    split = tl.program_id(1) // Hk
    b = tl.program_id(2) + b0
    q_start, len_q, k_start, len_k = _seq_bounds(CU_Q, CU_K, b)
    start_n = pid_n * BLOCK_N
    if start_n >= len_k:
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    cols = start_n + offs_n
    col_ok = cols < len_k
    k_row0 = (k_start + start_n).to(tl.int64)
    tile = offs_n[:, None]
    k = _load_tile(
        K + k_row0 * sk_t + hk.to(tl.int64) * sk_h + tile * sk_t + offs_d[None, :], col_ok, d_ok, True, EVEN_D, UPCAST
    )
    v = _load_tile(
        V + k_row0 * sv_t + hk.to(tl.int64) * sv_h + tile * sv_t + offs_d[None, :], col_ok, d_ok, True, EVEN_D, UPCAST
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    causal_off = len_k - len_q
    if CAUSAL:
        # query rows [lo, mid) see part of this key block (mask), [mid, len_q) all of it; rows before
        # the first one that sees key start_n are skipped
        first = tl.minimum(tl.maximum(start_n - causal_off, 0), len_q)
        lo = (first // BLOCK_M) * BLOCK_M
        all_from = tl.maximum(start_n + BLOCK_N - 1 - causal_off, 0)
        mid = tl.minimum(tl.cdiv(all_from, BLOCK_M) * BLOCK_M, len_q)
    q_base = Q + q_start.to(tl.int64) * sq_t + offs_m[:, None] * sq_t + offs_d[None, :]
    do_base = DO + q_start.to(tl.int64) * sdo_t + offs_m[:, None] * sdo_t + offs_d[None, :]
    h0 = hk * group + split * heads_per_split
    for g in range(heads_per_split):
        h = h0 + g
        q_ptrs = q_base + h.to(tl.int64) * sq_h
        do_ptrs = do_base + h.to(tl.int64) * sdo_h
        stat = h.to(tl.int64) * total_q + q_start
        if CAUSAL:
            lo64 = lo.to(tl.int64)
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_ptrs + lo64 * sq_t, do_ptrs + lo64 * sdo_t, LSE + stat, DELTA + stat, sq_t, sdo_t,
                cols, offs_m, d_ok, lo, mid, len_q, causal_off, qk_scale,
                True, EVEN_D, BLOCK_M, PREC, BF16_RNE, UPCAST,
            )  # fmt: skip
            mid64 = mid.to(tl.int64)
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_ptrs + mid64 * sq_t, do_ptrs + mid64 * sdo_t, LSE + stat, DELTA + stat, sq_t, sdo_t,
                cols, offs_m, d_ok, mid, len_q, len_q, causal_off, qk_scale,
                False, EVEN_D, BLOCK_M, PREC, BF16_RNE, UPCAST,
            )  # fmt: skip
        else:
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_ptrs, do_ptrs, LSE + stat, DELTA + stat, sq_t, sdo_t,
                cols, offs_m, d_ok, 0, len_q, len_q, causal_off, qk_scale,
                False, EVEN_D, BLOCK_M, PREC, BF16_RNE, UPCAST,
            )  # fmt: skip

    mask = col_ok[:, None] & d_ok[None, :]
    split64 = split.to(tl.int64)
    dk_ptrs = DK + split64 * sdk_s + k_row0 * sdk_t + hk.to(tl.int64) * sdk_h + tile * sdk_t + offs_d[None, :]
    dv_ptrs = DV + split64 * sdv_s + k_row0 * sdv_t + hk.to(tl.int64) * sdv_h + tile * sdv_t + offs_d[None, :]
    tl.store(dk_ptrs, store_cast(dk * sm_scale, DK.dtype.element_ty, STORE_RNE), mask=mask)
    tl.store(dv_ptrs, store_cast(dv, DV.dtype.element_ty, STORE_RNE), mask=mask)


# ---------------------------------------------------------------------------------------------
# host side


def _check_qkv(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q, cu_k) -> None:
    # second line of defence: the public op validates first; a wrong layout here would read out of
    # bounds, so refuse it
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{name} (triton): q, k, v must be (tokens, heads, head_dim)")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"{name} (triton): q, k, v must be contiguous in their last dimension")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{name} (triton): q, k, v must share one dtype of fp16, bf16, fp32, got {q.dtype}")
    if k.shape != v.shape or k.shape[2] != q.shape[2] or k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{name} (triton): k and v must match, share q's head_dim, and divide q's heads")
    d = q.shape[2]
    if d % 8 != 0 or not 8 <= d <= 256:
        raise ValueError(f"{name} (triton): head_dim must be a multiple of 8 between 8 and 256, got {d}")
    for cname, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1 or cu.device != q.device:
            raise ValueError(f"{name} (triton): {cname} must be int32 (batch + 1,) on q's device")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"{name} (triton): cu_seqlens_q and cu_seqlens_k must have the same length")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"{name} (triton): q, k, v must be on one device")


def _max_lens(cu_q: torch.Tensor, cu_k: torch.Tensor) -> tuple[int, int]:
    if cu_q.numel() < 2:
        return 0, 0
    lens = torch.stack((cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]))
    mq, mk = lens.amax(1).tolist()  # the one host read
    return int(mq), int(mk)


def _configs(kind: str, table: dict, block_d: int, dtype: torch.dtype) -> list[tuple[int, int, int, int]]:
    if interpreted():
        return [(*INTERPRET_BLOCKS[kind], 1, 1)]
    src = _FP32_CONFIGS[kind] if dtype == torch.float32 else table
    return src[max(block_d, 64)]


def _launch(kind: str, kernel, table: dict, block_d: int, dtype: torch.dtype, device: torch.device, grid_for, **kw):
    """Launch `kernel` over the batch in chunks of at most MAX_GRID_Z sequences, with the first
    configuration of `table` that compiles (the choice is remembered per kind, head dim, dtype and
    device). grid_for(block_m, block_n) -> (x, y, batch)."""
    configs = _configs(kind, table, block_d, dtype)
    key = (kind, block_d, dtype, device.type, device.index)
    start = _chosen.get(key, 0)
    for i in range(start, len(configs)):
        bm, bn, warps, stages = configs[i]
        gx, gy, batch = grid_for(bm, bn)
        if gx == 0 or gy == 0 or batch == 0:
            return configs[i]
        try:
            for b0 in range(0, batch, MAX_GRID_Z):
                kernel[(gx, gy, min(MAX_GRID_Z, batch - b0))](
                    b0=b0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages, **kw
                )
        except triton.runtime.errors.OutOfResources:
            if i + 1 == len(configs):
                raise
            continue
        _chosen[key] = i
        return configs[i]
    raise AssertionError("unreachable")


def _block_d(d: int) -> int:
    return max(16, next_pow2(d))


def _upcast(dtype: torch.dtype) -> bool:
    """bf16 tiles widened to fp32 on load: only in Triton's interpreter (see _load_tile)."""
    return dtype == torch.bfloat16 and interpreted()


def _dot_precision(dtype: torch.dtype) -> str | None:
    # fp32 products in full precision, not TF32 (which would fail the accuracy rule); fp16/bf16
    # operands keep the default
    return "ieee" if dtype == torch.float32 or _upcast(dtype) else None


def flash_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float,
    causal: bool,
) -> list[torch.Tensor]:
    _check_qkv("flash_attn_fwd", q, k, v, cu_seqlens_q, cu_seqlens_k)
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    total_q, hq, d = q.shape
    out = torch.empty((total_q, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((hq, total_q), dtype=torch.float32, device=q.device)
    batch = cu_q.numel() - 1
    if total_q == 0 or hq == 0:
        return [out, lse]
    max_q, _ = _max_lens(cu_q, cu_k)
    block_d = _block_d(d)
    _launch(
        "fwd", _fwd_kernel, _FWD_CONFIGS, block_d, q.dtype, q.device,
        lambda bm, bn: (triton.cdiv(max_q, bm), hq, batch),
        Q=q, K=k, V=v, OUT=out, LSE=lse, CU_Q=cu_q, CU_K=cu_k,
        total_q=total_q, group=hq // k.shape[1], qk_scale=float(softmax_scale) * _LOG2E,
        sq_t=q.stride(0), sq_h=q.stride(1), sk_t=k.stride(0), sk_h=k.stride(1), sv_t=v.stride(0), sv_h=v.stride(1),
        so_t=out.stride(0), so_h=out.stride(1),
        D=d, CAUSAL=bool(causal), EVEN_D=block_d == d, PREC=_dot_precision(q.dtype), UPCAST=_upcast(q.dtype),
        BF16_RNE=emulate_bf16_rounding(q.dtype),
    )  # fmt: skip
    return [out, lse]


def _dkdv_split(group: int, programs: int, device: torch.device) -> int:
    """How many programs share a GQA group's query heads: 1 unless the kv programs alone would leave
    the GPU half idle."""
    if DKDV_SPLIT is not None:
        if group % DKDV_SPLIT != 0:
            raise ValueError(f"DKDV_SPLIT={DKDV_SPLIT} must divide the GQA group size {group}")
        return DKDV_SPLIT
    if device.type != "cuda":
        return 1
    want = num_programs(device, per_sm=2)
    split = 1
    while programs * split < want and split < group:
        split += 1
        while group % split:
            split += 1
    return split


def flash_attn_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float,
    causal: bool,
) -> list[torch.Tensor]:
    _check_qkv("flash_attn_bwd", q, k, v, cu_seqlens_q, cu_seqlens_k)
    for name, t in (("dout", dout), ("out", out)):
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device or t.stride(-1) != 1:
            raise ValueError(f"flash_attn_bwd (triton): {name} must match q (shape, dtype, device, unit last stride)")
    if lse.shape != (q.shape[1], q.shape[0]) or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError("flash_attn_bwd (triton): lse must be fp32 (heads, total_q) on q's device")
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    lse = lse.contiguous()
    total_q, hq, d = q.shape
    total_k, hk, _ = k.shape
    group = hq // hk
    dq = torch.empty((total_q, hq, d), dtype=q.dtype, device=q.device)
    batch = cu_q.numel() - 1
    if total_q == 0 or total_k == 0 or batch == 0 or hq == 0:
        # no query or no key: every gradient is zero
        zeros = [torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (k, v)]
        return [dq.zero_(), *zeros]
    max_q, max_k = _max_lens(cu_q, cu_k)
    block_d = _block_d(d)
    bf16_rne = emulate_bf16_rounding(q.dtype)
    prec = _dot_precision(q.dtype)
    qk_scale = float(softmax_scale) * _LOG2E

    delta = torch.empty((hq, total_q), dtype=torch.float32, device=q.device)
    block_t = max(1, min(next_pow2(total_q), 4096 // block_d))
    _bwd_delta_kernel[(triton.cdiv(total_q, block_t), hq)](
        out, dout, delta, total_q,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        D=d, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip

    strides = dict(
        sq_t=q.stride(0), sq_h=q.stride(1), sk_t=k.stride(0), sk_h=k.stride(1), sv_t=v.stride(0), sv_h=v.stride(1),
        sdo_t=dout.stride(0), sdo_h=dout.stride(1),
    )  # fmt: skip
    common = dict(
        Q=q, K=k, V=v, DO=dout, LSE=lse, DELTA=delta, CU_Q=cu_q, CU_K=cu_k,
        total_q=total_q, D=d, group=group, qk_scale=qk_scale, sm_scale=float(softmax_scale),
        CAUSAL=bool(causal), EVEN_D=block_d == d, PREC=prec, BF16_RNE=bf16_rne, UPCAST=_upcast(q.dtype),
        **strides,
    )  # fmt: skip

    # the split is decided with the first config's block_n; a fallback config only changes occupancy
    bn0 = _configs("dkdv", _DKDV_CONFIGS, block_d, q.dtype)[0][1]
    split = _dkdv_split(group, triton.cdiv(max_k, bn0) * hk * batch, q.device)
    if split == 1:
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        dk_buf, dv_buf = dk[None], dv[None]
    else:
        dk_buf = torch.empty((split, *k.shape), dtype=torch.float32, device=k.device)
        dv_buf = torch.empty((split, *v.shape), dtype=torch.float32, device=v.device)
    # every key row is written, zeros for keys no query sees (a sequence without queries, causal tails)
    _launch(
        "dkdv", _bwd_dkdv_kernel, _DKDV_CONFIGS, block_d, q.dtype, q.device,
        lambda bm, bn: (triton.cdiv(max_k, bn), hk * split, batch),
        DK=dk_buf, DV=dv_buf, heads_per_split=group // split, Hk=hk,
        sdk_s=dk_buf.stride(0), sdk_t=dk_buf.stride(1), sdk_h=dk_buf.stride(2),
        sdv_s=dv_buf.stride(0), sdv_t=dv_buf.stride(1), sdv_h=dv_buf.stride(2),
        STORE_RNE=emulate_bf16_rounding(dk_buf.dtype), **common,
    )  # fmt: skip
    if split != 1:
        dk = dk_buf.sum(0).to(k.dtype)
        dv = dv_buf.sum(0).to(v.dtype)
    _launch(
        "dq", _bwd_dq_kernel, _DQ_CONFIGS, block_d, q.dtype, q.device,
        lambda bm, bn: (triton.cdiv(max_q, bm), hq, batch),
        DQ=dq, sdq_t=dq.stride(0), sdq_h=dq.stride(1), **common,
    )  # fmt: skip
    return [dq, dk, dv]
