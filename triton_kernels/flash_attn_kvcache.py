"""Attention against a KV cache in Triton (flash-decoding).

Kernel contract (identical to internlm_fast._C.cpu):
    flash_attn_kvcache_fwd(q, k_cache, v_cache, cache_lens, block_table, softmax_scale, causal)
        -> [out, lse]
        q (B, Sq, Hq, D); cache_lens int32 (B,): the first cache_lens[b] tokens of sequence b are
        valid. Causal aligned to the end (query i sees key j when j <= i + len - Sq). Hq % Hk == 0.
        A row that sees no key gets out 0 and lse +inf. out (B, Sq, Hq, D) contiguous in q's dtype,
        lse (B, Hq, Sq) fp32.
        block_table None: k_cache/v_cache (B, cache_len, Hk, D), last dim contiguous, other strides
        free (the model's cache is one (B, max_len, 2, Hk, D) tensor, keys and values its views).
        block_table int32 (B, max_blocks), last dim contiguous: k_cache/v_cache are a paged pool
        (num_blocks, block_size, Hk, D) with the same stride freedom, and token t of sequence b is
        at [block_table[b, t // block_size], t % block_size]; cache_lens[b] <= max_blocks *
        block_size.

Attention is split-K ("flash-decoding"): decoding reads the whole cache for a handful of query
rows, so a grid over (batch, kv head) alone leaves most SMs idle at small batch. Each program takes
one kv head with all the query rows that share it (Sq x the GQA group, so every K/V tile is read
once per group) and one chunk of the cache, and writes a partial (max, sum, unnormalised output);
a second kernel merges the chunks by log-sum-exp. Chunks are cut on the device from each
sequence's own length, so the host never reads cache_lens (no sync) and short sequences in a long
cache do not leave whole programs with nothing but masked keys. With one chunk the first kernel
normalises and writes the output itself.

A paged cache changes only where a key tile's rows are read from: each key's row offset comes
from its block's id in the table. The chunks are planned from the table's capacity
(max_blocks * block_size), as the unpaged ones are from cache_len.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import emulate_bf16_rounding, interpreted, next_pow2, num_programs, store_cast

# Forces the number of cache chunks per (sequence, kv head) when set (tests use it to reach the
# merge); None lets _num_splits choose.
NUM_SPLITS: int | None = None
MAX_SPLITS = 128
# fewest keys a chunk gets on a GPU: below this a chunk's fixed costs (q load, partial write, merge)
# outweigh the parallelism it adds
MIN_CHUNK_KEYS = 256

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """a @ b accumulated in fp32; fp32 operands in full fp32, not TF32. Triton's interpreter
    multiplies bf16 operands as their raw uint16 bits, so there they are widened first (exactly:
    bf16 -> fp32 loses nothing)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _decode_split_kernel(
    Q, K, V, LENS, TABLE, OUT, LSE, PART_O, PART_ML,
    Sq, Hk, group, rows, num_splits, qk_scale,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, s_table,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DIRECT: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BF16_RNE: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // Hk).to(tl.int64)
    hk = (bh % Hk).to(tl.int64)
    n_keys = tl.load(LENS + b).to(tl.int32)
    per = tl.cdiv(tl.cdiv(n_keys, BLOCK_N), num_splits) * BLOCK_N
    j_begin = split * per
    j_end = tl.minimum(n_keys, j_begin + per)

    # query row r of this kv head: token r // group, query head hk * group + r % group
    r = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < rows
    t = r // group
    h = hk * group + (r % group)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_ptrs = Q + b * sq_b + t[:, None].to(tl.int64) * sq_t + h[:, None] * sq_h + d[None, :]
    q = tl.load(q_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    # causal, end-aligned: token t sees keys j <= t + n_keys - Sq; keys past the block's last
    # token's limit are never visible to it
    limit = t + n_keys - Sq
    if CAUSAL:
        last_t = (tl.minimum(tl.program_id(2) * BLOCK_M + BLOCK_M, rows) - 1) // group
        j_end = tl.minimum(j_end, last_t + n_keys - Sq + 1)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if PAGED:
        # sk_b / sv_b step over the pool's blocks; sequence b's blocks come from its table row
        k_base = K + hk * sk_h
        v_base = V + hk * sv_h
        table_row = TABLE + b * s_table
    else:
        k_base = K + b * sk_b + hk * sk_h
        v_base = V + b * sv_b + hk * sv_h
    for j0 in range(j_begin, j_end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_ok = j < j_end
        if PAGED:
            if PAGE_SIZE % BLOCK_N == 0:
                # tiles start at multiples of BLOCK_N, so the whole tile lies in one block
                page = tl.load(table_row + j0 // PAGE_SIZE).to(tl.int64)
            else:
                # masked keys may lie past the table's row: block 0 stands in for them, never read
                page = tl.load(table_row + j // PAGE_SIZE, mask=j_ok, other=0).to(tl.int64)
            slot = (j % PAGE_SIZE).to(tl.int64)
            k_off = page * sk_b + slot * sk_t
            v_off = page * sv_b + slot * sv_t
        else:
            jj = j.to(tl.int64)
            k_off = jj * sk_t
            v_off = jj * sv_t
        kt = tl.load(k_base + k_off[None, :] + d[:, None], mask=d_ok[:, None] & j_ok[None, :], other=0.0)
        s = _dot(q, kt, UPCAST) * qk_scale
        vis = j_ok[None, :]
        if CAUSAL:
            vis = vis & (j[None, :] <= limit[:, None])
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # a row that has seen no visible key keeps m = -inf; shift by 0 there so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + v_off[:, None] + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(store_cast(p, V.dtype.element_ty, BF16_RNE), v, UPCAST)
        m = m_new

    if DIRECT:
        has = row_sum > 0.0
        sum_safe = tl.where(has, row_sum, 1.0)
        o = acc * tl.where(has, 1.0 / sum_safe, 0.0)[:, None]
        Hq = Hk * group
        o_ptrs = OUT + ((b * Sq + t[:, None]) * Hq + h[:, None]) * HEAD_DIM + d[None, :]
        tl.store(o_ptrs, store_cast(o, OUT.dtype.element_ty, BF16_RNE), mask=r_ok[:, None] & d_ok[None, :])
        lse = tl.where(has, (m + tl.log2(sum_safe)) * 0.6931471805599453, float("inf"))
        tl.store(LSE + (b * Hq + h) * Sq + t, lse, mask=r_ok)
    else:
        # partials: (B * Hk, num_splits, rows) rows of D outputs, and (max, sum) pairs
        idx = (bh.to(tl.int64) * num_splits + split) * rows + r
        tl.store(PART_O + idx[:, None] * HEAD_DIM + d[None, :], acc, mask=r_ok[:, None] & d_ok[None, :])
        tl.store(PART_ML + 2 * idx, m, mask=r_ok)
        tl.store(PART_ML + 2 * idx + 1, row_sum, mask=r_ok)


@triton.jit
def _decode_merge_kernel(
    PART_O, PART_ML, OUT, LSE,
    Sq, Hk, group, rows, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BF16_RNE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // rows
    r = pid % rows
    b = bh // Hk
    h = (bh % Hk) * group + r % group
    t = r // group
    first = bh * num_splits * rows + r  # partial row of chunk 0; chunk c is c * rows further
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    big = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for c0 in range(0, num_splits, BLOCK_S):
        c = c0 + s
        big = tl.maximum(big, tl.load(PART_ML + 2 * (first + c * rows), mask=c < num_splits, other=float("-inf")))
    mx = tl.max(big, axis=0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)

    total = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for c0 in range(0, num_splits, BLOCK_S):
        c = c0 + s
        c_ok = c < num_splits
        row = first + c * rows
        w = tl.exp2(tl.load(PART_ML + 2 * row, mask=c_ok, other=float("-inf")) - mx_safe)  # 0 for empty chunks
        total += w * tl.load(PART_ML + 2 * row + 1, mask=c_ok, other=0.0)
        o = tl.load(PART_O + row[:, None] * HEAD_DIM + d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(o * w[:, None], axis=0)
    L = tl.sum(total, axis=0)
    has = L > 0.0
    L_safe = tl.where(has, L, 1.0)
    Hq = Hk * group
    o = acc * tl.where(has, 1.0 / L_safe, 0.0)
    tl.store(OUT + ((b * Sq + t) * Hq + h) * HEAD_DIM + d, store_cast(o, OUT.dtype.element_ty, BF16_RNE), mask=d_ok)
    tl.store(LSE + (b * Hq + h) * Sq + t, tl.where(has, (mx + tl.log2(L_safe)) * 0.6931471805599453, float("inf")))


def _num_splits(programs: int, cache_len: int, device: torch.device, block_n: int) -> int:
    """Chunks per (sequence, kv head, row block): enough programs for a couple of waves over the
    SMs, but no chunk (of the longest possible sequence) shorter than the minimum."""
    if NUM_SPLITS is not None:
        return max(1, int(NUM_SPLITS))
    min_chunk = block_n if interpreted() else MIN_CHUNK_KEYS
    by_len = triton.cdiv(cache_len, min_chunk)
    by_device = triton.cdiv(num_programs(device, per_sm=2), programs)
    return max(1, min(by_len, by_device, MAX_SPLITS))


def _split_config(rows: int, head_dim: int, elem_bytes: int, interpret: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, warps, stages) of the split kernel for `rows` query rows per kv
    head. Rows are padded to 16, tl.dot's least M, even for a single row: the kernel is bound by
    reading the cache, so the idle tensor-core lanes cost nothing, and it keeps one code path
    (multiply-and-sum over a (rows, D, keys) product needs far more registers). fp32 takes full-fp32
    dots, which run on CUDA cores and hold their operands in registers: smaller tiles over 8 warps
    keep them from spilling. Pipeline stages are capped so K and V tiles in flight fit an A100's
    shared memory too. Under the interpreter, 16-key blocks keep tests' caches several blocks long."""
    block_d = max(16, next_pow2(head_dim))
    if elem_bytes >= 4:
        block_m, block_n, warps = min(32, max(16, next_pow2(rows))), 16, 8
    else:
        block_m = min(64, max(16, next_pow2(rows)))
        block_n = 64 if block_d <= 128 else 32
        warps = 4 if block_m * block_d <= 64 * 64 else 8
    if interpret:
        block_n = 16
    stages = max(1, min(3, (96 * 1024) // (2 * block_n * block_d * elem_bytes)))
    return block_m, block_n, block_d, warps, stages


def _merge_block_s(num_splits: int, block_d: int) -> int:
    return min(next_pow2(num_splits), max(1, 4096 // block_d))


def _check_kvcache(q, k_cache, v_cache, cache_lens, block_table) -> None:
    paged = block_table is not None
    layout = "a paged pool (num_blocks, block_size, Hk, D)" if paged else "(B, cache_len, Hk, D)"
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"flash_attn_kvcache (triton): q must be (B, Sq, Hq, D), k/v caches {layout}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"flash_attn_kvcache (triton): dtype {q.dtype} is not supported (fp32, bf16, fp16)")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError("flash_attn_kvcache (triton): q, k_cache and v_cache must share one dtype")
    B, _, Hq, D = q.shape
    if (not paged and k_cache.shape[0] != B) or k_cache.shape[3] != D or k_cache.shape[2] == 0 or Hq % k_cache.shape[2]:
        raise ValueError("flash_attn_kvcache (triton): caches must match q's batch and head_dim, Hq % Hk == 0")
    if D > 256 or any(x.stride(-1) != 1 for x in (q, k_cache, v_cache)):
        raise ValueError("flash_attn_kvcache (triton): head_dim <= 256 with a unit last stride")
    if cache_lens.dtype != torch.int32 or cache_lens.shape != (B,):
        raise ValueError(f"flash_attn_kvcache (triton): cache_lens must be int32 of shape ({B},)")
    if paged:
        if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"flash_attn_kvcache (triton): block_table must be int32 of shape ({B}, max_blocks)")
        if block_table.shape[1] > 1 and block_table.stride(1) != 1:
            raise ValueError("flash_attn_kvcache (triton): block_table needs a unit last stride")
    if any(x.device != q.device for x in (k_cache, v_cache, cache_lens) + ((block_table,) if paged else ())):
        raise ValueError("flash_attn_kvcache (triton): all tensors must be on q's device")


def flash_attn_kvcache_fwd(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    block_table: torch.Tensor | None,
    softmax_scale: float,
    causal: bool,
) -> list[torch.Tensor]:
    _check_kvcache(q, k_cache, v_cache, cache_lens, block_table)
    B, Sq, Hq, D = q.shape
    paged = block_table is not None
    Hk = k_cache.shape[2]
    page_size = k_cache.shape[1] if paged else 1
    # the longest any sequence can be: the splits are planned from it, never from cache_lens
    cache_len = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    group = Hq // Hk
    out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return [out, lse]
    if cache_len == 0:  # every length is 0: nothing to attend to
        out.zero_()
        lse.fill_(float("inf"))
        return [out, lse]
    cache_lens = cache_lens.contiguous()
    table = block_table if paged else cache_lens  # never read unpaged
    table_stride = block_table.stride(0) if paged else 0

    rows = Sq * group
    block_m, block_n, block_d, warps, stages = _split_config(rows, D, q.element_size(), interpreted())
    row_blocks = triton.cdiv(rows, block_m)
    num_splits = _num_splits(B * Hk * row_blocks, cache_len, q.device, block_n)
    num_splits = max(1, min(num_splits, MAX_SPLITS, triton.cdiv(cache_len, block_n)))
    direct = num_splits == 1
    if direct:
        part_o = part_ml = out  # never touched
    else:
        part_o = torch.empty((B * Hk * num_splits * rows, D), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((B * Hk * num_splits * rows, 2), dtype=torch.float32, device=q.device)
    bf16_rne = emulate_bf16_rounding(q.dtype)
    _decode_split_kernel[(B * Hk, num_splits, row_blocks)](
        q, k_cache, v_cache, cache_lens, table, out, lse, part_o, part_ml,
        Sq, Hk, group, rows, num_splits, float(softmax_scale) * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), table_stride,
        HEAD_DIM=D, CAUSAL=bool(causal), DIRECT=direct, PAGED=paged, PAGE_SIZE=page_size,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BF16_RNE=bf16_rne,
        UPCAST=q.dtype == torch.bfloat16 and interpreted(), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if not direct:
        block_s = _merge_block_s(num_splits, block_d)
        _decode_merge_kernel[(B * Hk * rows,)](
            part_o, part_ml, out, lse,
            Sq, Hk, group, rows, num_splits,
            HEAD_DIM=D, BLOCK_S=block_s, BLOCK_D=block_d, BF16_RNE=bf16_rne,
            num_warps=4 if block_s * block_d <= 2048 else 8,
        )  # fmt: skip
    return [out, lse]
