"""The Triton decoding kernels (triton_kernels/flash_attn_kvcache.py and decode_rotary_append.py)
called directly: flash_attn_kvcache_fwd against the fp64 oracle under the 2x rule, over every way
the work is cut (one cache chunk written directly, several merged, more chunks than a sequence has
blocks, several row blocks), on a paged pool through a block table as on a per-sequence cache, and
decode_rotary_append against apply_rotary_ref plus a copy into the cache rows.

Without a GPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), where the
kernels use 16-key blocks, so the lengths below span several blocks and end mid-block.
"""

from __future__ import annotations

import pytest
import torch

from internlm_fast.ops import available, backend, use_backend
from internlm_fast.ops.flash_attn_kvcache import (
    attention_kvcache_ref,
    flash_attn_with_kvcache,
    flash_attn_with_kvcache_ref,
)

from .conftest import ATOL, assert_matches_oracle
from .test_decode_rotary_append import _reference as _rotary_append_reference
from .test_decode_rotary_append import _tables

pytestmark = pytest.mark.skipif(not available("triton"), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def tk():
    return backend.kernels("triton")


def _randn(*shape, dtype, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def _cache(b, cap, hk, d, lens, dtype, g):
    """The model's layout: one (B, cap, 2, Hk, D) tensor, keys and values its strided views. Rows
    past each length hold NaN, so reading one shows in the output."""
    kv = _randn(b, cap, 2, hk, d, dtype=dtype, g=g)
    for i, n in enumerate(lens):
        kv[i, n:] = float("nan")
    return kv[:, :, 0], kv[:, :, 1]


def _assert_lse(name, lse, ref_lowp, ref64, atol):
    """Rows that see no key have lse +inf in all three; the rest follow the 2x rule."""
    inf = torch.isinf(ref64)
    assert torch.equal(torch.isinf(lse), inf) and torch.equal(torch.isinf(ref_lowp), inf), f"{name}: +inf rows"
    assert_matches_oracle(name, lse.masked_fill(inf, 0), ref_lowp.masked_fill(inf, 0), ref64.masked_fill(inf, 0), atol)


# (batch, seqlen_q, heads, kv_heads, head_dim, cache lengths); the query rows of a kv head
# (seqlen_q x group) are padded to 16 for tl.dot
SHAPES = [
    (1, 1, 4, 4, 64, [37]),  # MHA decode step: one query row per kv head
    (1, 1, 4, 2, 40, [50]),  # two rows per kv head, D 40 padded to 64
    (3, 3, 8, 2, 40, [0, 2, 50]),  # GQA 4; an empty cache; causal rows that see no key (2 < Sq)
    (3, 1, 8, 1, 128, [1, 16, 33]),  # MQA: 8 rows; a whole block, one key past a block
    (1, 3, 4, 1, 64, [70]),  # MQA, 12 rows padded to 16
    (3, 3, 2, 2, 128, [3, 31, 64]),  # MHA, 3 rows
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + "-" + "_".join(map(str, s[5])))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_kvcache_fwd_matches_oracle(tk, monkeypatch, shape, causal, dtype, num_splits):
    b, sq, hq, hk, d, lens = shape
    g = torch.Generator().manual_seed(sum(lens) + d + sq)
    q = _randn(b, sq, hq, d, dtype=dtype, g=g)
    k, v = _cache(b, max(lens) + 5, hk, d, lens, dtype, g)
    n = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = d**-0.5
    monkeypatch.setattr(tk.flash_attn_kvcache, "NUM_SPLITS", num_splits)
    out, lse = tk.flash_attn_kvcache_fwd(q, k, v, n, None, scale, causal)
    ref_out, ref_lse = attention_kvcache_ref(q, k, v, n, scale, causal)
    out64, lse64 = attention_kvcache_ref(q.double(), k.double(), v.double(), n, scale, causal)
    assert out.is_contiguous() and lse.dtype == torch.float32 and lse.shape == (b, hq, sq)
    assert_matches_oracle("out", out, ref_out, out64, atol=ATOL[dtype])
    _assert_lse("lse", lse, ref_lse.float(), lse64, atol=ATOL[torch.float32])


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_kvcache_fwd_row_blocks_and_empty_chunks(tk, monkeypatch, num_splits):
    """68 query rows of one kv head (two row blocks of 64, causal limits differing per block), and up to
    8 chunks for sequences of 1 to 5 blocks: chunks past a sequence's end hold nothing to merge."""
    g = torch.Generator().manual_seed(num_splits)
    b, sq, hq, hk, d, lens = 2, 17, 4, 1, 32, [20, 75]
    q = _randn(b, sq, hq, d, dtype=torch.float32, g=g)
    k, v = _cache(b, 128, hk, d, lens, torch.float32, g)
    n = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    monkeypatch.setattr(tk.flash_attn_kvcache, "NUM_SPLITS", num_splits)
    out, lse = tk.flash_attn_kvcache_fwd(q, k, v, n, None, 0.2, True)
    ref_out, ref_lse = attention_kvcache_ref(q, k, v, n, 0.2, True)
    out64, lse64 = attention_kvcache_ref(q.double(), k.double(), v.double(), n, 0.2, True)
    assert_matches_oracle("out", out, ref_out, out64, atol=ATOL[torch.float32])
    _assert_lse("lse", lse, ref_lse, lse64, atol=ATOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_kvcache_fwd_auto_splits_fp16_and_contiguous_cache(tk, dtype):
    g = torch.Generator().manual_seed(7)
    q = _randn(2, 1, 8, 64, dtype=dtype, g=g)
    k, v = (_randn(2, 90, 2, 64, dtype=dtype, g=g) for _ in range(2))
    n = torch.tensor([90, 41], dtype=torch.int32, device=DEVICE)
    out, lse = tk.flash_attn_kvcache_fwd(q, k, v, n, None, 0.125, True)
    ref_out, ref_lse = attention_kvcache_ref(q, k, v, n, 0.125, True)
    out64, lse64 = attention_kvcache_ref(q.double(), k.double(), v.double(), n, 0.125, True)
    assert_matches_oracle("out", out, ref_out, out64, atol=ATOL[dtype])
    _assert_lse("lse", lse, ref_lse.float(), lse64, atol=ATOL[torch.float32])


def test_kvcache_fwd_zero_length_cache_and_bad_arguments(tk):
    q = torch.randn(2, 1, 4, 32, device=DEVICE)
    k = v = torch.zeros(2, 0, 2, 32, device=DEVICE)
    out, lse = tk.flash_attn_kvcache_fwd(q, k, v, torch.zeros(2, dtype=torch.int32, device=DEVICE), None, 1.0, True)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isinf(lse).all())
    k = v = torch.zeros(2, 8, 3, 32, device=DEVICE)
    with pytest.raises(ValueError, match="Hq % Hk"):
        tk.flash_attn_kvcache_fwd(q, k, v, torch.zeros(2, dtype=torch.int32, device=DEVICE), None, 1.0, True)
    with pytest.raises(ValueError, match="int32"):
        tk.flash_attn_kvcache_fwd(q, k[:, :, :2], v[:, :, :2], torch.zeros(2, device=DEVICE), None, 1.0, True)


# ---------------------------------------------------------------- paged cache (block_table)


def _paged_cache(lens, max_blocks, block_size, hk, d, dtype, g, spare=3):
    """A paged pool (num_blocks, block_size, 2, Hk, D), keys and values its strided views, with each
    sequence's blocks drawn out of order from a shuffled pool larger than needed, and the contiguous
    caches (B, max_blocks * block_size, Hk, D) the table describes, for the oracle. Rows past each
    length, table entries past each sequence's blocks and the spare blocks they point to hold NaN, so
    reading any of them shows in the output. The table is a column slice of a wider tensor (its row
    stride is not max_blocks)."""
    used = [-(-n // block_size) for n in lens]
    num_blocks = sum(used) + spare
    kv = _randn(num_blocks, block_size, 2, hk, d, dtype=dtype, g=g)
    order = torch.randperm(num_blocks, generator=g)
    poison = int(order[-1])
    kv[order[sum(used) :]] = float("nan")
    wide = torch.full((len(lens), max_blocks + 2), poison, dtype=torch.int32)
    table = wide[:, 1 : max_blocks + 1]
    nxt = 0
    for i, (n, u) in enumerate(zip(lens, used)):
        table[i, :u] = order[nxt : nxt + u].to(torch.int32)
        nxt += u
        if n % block_size:
            kv[int(table[i, u - 1]), n % block_size :] = float("nan")
    contiguous = kv[table.long()].flatten(1, 2)
    table = table.to(DEVICE)
    assert table.stride() == (max_blocks + 2, 1)
    return kv[:, :, 0], kv[:, :, 1], table, contiguous[:, :, 0], contiguous[:, :, 1]


def _paged_matches_oracle(tk, q, lens, max_blocks, block_size, hk, scale, causal, g):
    b, _, _, d = q.shape
    k, v, table, k_flat, v_flat = _paged_cache(lens, max_blocks, block_size, hk, d, q.dtype, g)
    n = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out, lse = tk.flash_attn_kvcache_fwd(q, k, v, n, table, scale, causal)
    ref_out, ref_lse = attention_kvcache_ref(q, k_flat, v_flat, n, scale, causal)
    out64, lse64 = attention_kvcache_ref(q.double(), k_flat.double(), v_flat.double(), n, scale, causal)
    assert out.is_contiguous() and lse.dtype == torch.float32 and lse.shape == (b, q.shape[2], q.shape[1])
    assert_matches_oracle("out", out, ref_out, out64, atol=ATOL[q.dtype])
    _assert_lse("lse", lse, ref_lse.float(), lse64, atol=ATOL[torch.float32])


@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_kvcache_fwd_paged_matches_oracle(tk, monkeypatch, block_size, causal, dtype, num_splits):
    """GQA 2 with 3 query tokens against a paged pool: an empty sequence, one ending mid-block, one
    filling its table exactly. Block size 1 and 3 look a block up per key; 16 (the interpreter's key
    tile) one block per tile."""
    g = torch.Generator().manual_seed(block_size * 10 + num_splits)
    max_blocks = -(-40 // block_size)
    lens = [0, 21, max_blocks * block_size]
    q = _randn(3, 3, 4, 32, dtype=dtype, g=g)
    monkeypatch.setattr(tk.flash_attn_kvcache, "NUM_SPLITS", num_splits)
    _paged_matches_oracle(tk, q, lens, max_blocks, block_size, 2, 32**-0.5, causal, g)


@pytest.mark.parametrize("num_splits", [None, 8])
def test_kvcache_fwd_paged_blocks_of_several_tiles(tk, monkeypatch, num_splits):
    """Blocks of two key tiles each, MQA with one decode token, the automatic split count, and more
    chunks than the shorter sequences have tiles."""
    g = torch.Generator().manual_seed(11)
    q = _randn(2, 1, 4, 32, dtype=torch.float32, g=g)
    monkeypatch.setattr(tk.flash_attn_kvcache, "NUM_SPLITS", num_splits)
    _paged_matches_oracle(tk, q, [5, 70], 3, 32, 1, 0.2, True, g)


def test_kvcache_fwd_paged_bad_arguments(tk):
    q = torch.randn(2, 1, 4, 32, device=DEVICE)
    k = v = torch.zeros(5, 4, 2, 32, device=DEVICE)
    n = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    table = torch.zeros(2, 3, dtype=torch.int32, device=DEVICE)
    out, lse = tk.flash_attn_kvcache_fwd(q, k, v, n, table, 1.0, True)  # the pool's size is not the batch
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isinf(lse).all())
    with pytest.raises(ValueError, match="block_table"):
        tk.flash_attn_kvcache_fwd(q, k, v, n, table.long(), 1.0, True)
    with pytest.raises(ValueError, match="block_table"):
        tk.flash_attn_kvcache_fwd(q, k, v, n, table[:1], 1.0, True)
    with pytest.raises(ValueError, match="unit last stride"):
        tk.flash_attn_kvcache_fwd(q, k, v, n, torch.zeros(3, 2, dtype=torch.int32, device=DEVICE).t(), 1.0, True)


def test_public_op_appends_rotates_and_attends():
    """flash_attn_with_kvcache on the triton backend: append at per-sequence offsets, half-rotated
    rotary at the cache offset, then attention, as the reference does it."""
    g = torch.Generator().manual_seed(3)
    b, s, hq, hk, d, cap = 3, 2, 4, 2, 64, 60
    q = _randn(b, s, hq, d, dtype=torch.float32, g=g)
    k, v = (_randn(b, s, hk, d, dtype=torch.float32, g=g) for _ in range(2))
    kv = _randn(b, cap, 2, hk, d, dtype=torch.float32, g=g)
    kv_ref = kv.clone()
    cos, sin = (t.to(DEVICE) for t in _tables(cap, 32))
    lens = torch.tensor([0, 9, 41], dtype=torch.int32, device=DEVICE)
    kw = dict(
        rotary_cos=cos,
        rotary_sin=sin,
        rotary_interleaved=False,
        cache_seqlens=lens,
        causal=True,
        return_softmax_lse=True,
    )
    with use_backend("triton"):
        out, lse = flash_attn_with_kvcache(q, kv[:, :, 0], kv[:, :, 1], k, v, **kw)
    ref, ref_lse = flash_attn_with_kvcache_ref(q, kv_ref[:, :, 0], kv_ref[:, :, 1], k=k, v=v, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    assert torch.equal(kv, kv_ref)


# ---------------------------------------------------------------- decode_rotary_append


@pytest.mark.parametrize(
    ("hq", "hk", "d", "rotary_dim"), [(8, 8, 32, 32), (8, 2, 64, 64), (4, 1, 16, 8), (4, 2, 40, 24)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 5])
def test_rotary_append_matches_rotary_then_copy(tk, hq, hk, d, rotary_dim, dtype, n):
    g = torch.Generator().manual_seed(hq * 100 + d + n)
    cos, sin = _tables(64, rotary_dim)
    qkv = torch.randn(n, hq + 2 * hk, d, generator=g).to(dtype)
    kv_rows = torch.randn(40, 2, hk, d, generator=g).to(dtype)
    positions = torch.randint(0, 64, (n,), generator=g)
    slots = torch.randperm(40, generator=g)[:n]
    want_qkv, want_rows = _rotary_append_reference(qkv, cos, sin, positions, kv_rows, slots, hq)
    qkv, kv_rows, cos, sin, positions, slots = (t.to(DEVICE) for t in (qkv, kv_rows, cos, sin, positions, slots))
    tk.decode_rotary_append(qkv, cos, sin, positions, kv_rows, slots, hq)
    qkv, kv_rows = qkv.cpu(), kv_rows.cpu()
    # fp32 math rounded once to the storage dtype, as the reference: equal up to fp32 contraction
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=0, rtol=0)
    if DEVICE == "cuda" and dtype != torch.float32:
        tol = dict(atol=1e-2, rtol=1e-2)  # a fused multiply-add may round a tie the other way
    torch.testing.assert_close(qkv, want_qkv, **tol)
    torch.testing.assert_close(kv_rows, want_rows, **tol)
    # the cache holds exactly what qkv holds, and no other row changed
    assert torch.equal(kv_rows[slots.cpu()], qkv[:, hq:].reshape(n, 2, hk, d))
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert torch.equal(kv_rows[untouched], want_rows[untouched])
