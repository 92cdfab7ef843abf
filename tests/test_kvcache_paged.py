"""flash_attn_with_kvcache over a paged cache (block_table, flash-attn's and vLLM's layout): the kernels
read each sequence's blocks through the table, in any order, for any block size, and give what the
same tokens give in a contiguous cache."""

import pytest
import torch

from internlm_fast.ops import use_backend
from internlm_fast.ops.flash_attn import attention_ref
from internlm_fast.ops.flash_attn_kvcache import attention_kvcache_ref, flash_attn_with_kvcache, gather_pages
from internlm_fast.ops.inference import InferenceKernels
from internlm_fast.ops.rotary import apply_rotary_ref

from .conftest import ATOL, assert_matches_oracle

OP = "flash_attn_kvcache"  # the tests taking impl_device run on every backend of this op


def _paged_case(g, b, page, max_blocks, hk, d, dtype, device, spare=3):
    """A pool with more blocks than needed and each sequence's blocks scattered in it, shuffled."""
    num_blocks = b * max_blocks + spare
    kv = torch.randn(num_blocks, page, 2, hk, d, generator=g).to(device, dtype)
    table = torch.randperm(num_blocks, generator=g)[: b * max_blocks].view(b, max_blocks).to(device, torch.int32)
    return kv[:, :, 0], kv[:, :, 1], table


@pytest.mark.parametrize("page", [1, 5, 16, 64])
@pytest.mark.parametrize("seqlen_q", [1, 4, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_matches_the_gathered_cache(impl_device, page, seqlen_q, dtype):
    impl, device = impl_device
    g = torch.Generator().manual_seed(page * 100 + seqlen_q)
    b, hq, hk, d, max_blocks = 4, 8, 2, 64, -(-300 // page)
    kp, vp, table = _paged_case(g, b, page, max_blocks, hk, d, dtype, device)
    cap = max_blocks * page
    lens = torch.tensor([seqlen_q, 37, 300, cap][:b], dtype=torch.int32, device=device).clamp(min=seqlen_q)
    q = torch.randn(b, seqlen_q, hq, d, generator=g).to(device, dtype)
    with use_backend(impl):
        out, lse = flash_attn_with_kvcache(
            q, kp, vp, cache_seqlens=lens, block_table=table, causal=True, return_softmax_lse=True
        )
    kc, vc = gather_pages(kp, table), gather_pages(vp, table)
    ref64, lse64 = attention_kvcache_ref(q.double(), kc.double(), vc.double(), lens, d**-0.5, True)
    ref_lowp, _ = attention_kvcache_ref(q, kc, vc, lens, d**-0.5, True)
    assert_matches_oracle("out", out, ref_lowp, ref64, ATOL[dtype])
    torch.testing.assert_close(lse.double(), lse64.double(), atol=2e-2 if dtype == torch.bfloat16 else 1e-4, rtol=0)


def test_append_through_the_block_table_writes_only_the_new_rows(impl_device):
    impl, device = impl_device
    g = torch.Generator().manual_seed(1)
    b, hq, hk, d, page = 3, 4, 2, 32, 4
    kp, vp, table = _paged_case(g, b, page, 5, hk, d, torch.float32, device)
    lens = torch.tensor([0, 3, 13], dtype=torch.int32, device=device)
    q = torch.randn(b, 3, hq, d, generator=g).to(device)
    k, v = (torch.randn(b, 3, hk, d, generator=g).to(device) for _ in range(2))
    kp_before, vp_before = kp.clone(), vp.clone()
    with use_backend(impl):
        out = flash_attn_with_kvcache(q, kp, vp, k, v, cache_seqlens=lens, block_table=table, causal=True)
    written = torch.zeros(kp.shape[:2], dtype=torch.bool, device=device)
    for s, n in enumerate(lens.tolist()):
        for t in range(3):
            blk, row = int(table[s, (n + t) // page]), (n + t) % page
            assert torch.equal(kp[blk, row], k[s, t]) and torch.equal(vp[blk, row], v[s, t])
            written[blk, row] = True
    assert torch.equal(kp[~written], kp_before[~written]) and torch.equal(vp[~written], vp_before[~written])
    ref, _ = attention_kvcache_ref(q, gather_pages(kp, table), gather_pages(vp, table), lens + 3, d**-0.5, True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_paged_decoding_token_by_token_equals_full_causal_forward(impl_device):
    impl, device = impl_device
    g = torch.Generator().manual_seed(2)
    b, s, hq, hk, d, page, prompt = 2, 40, 4, 2, 32, 8, 11
    q, k, v = (torch.randn(b, s, h, d, generator=g).to(device) for h in (hq, hk, hk))
    cos, sin = (t.to(device) for t in _rope(64, d))
    full, _ = attention_ref(apply_rotary_ref(q, cos, sin), apply_rotary_ref(k, cos, sin), v, causal=True)
    kp, vp, table = _paged_case(g, b, page, s // page, hk, d, torch.float32, device)
    kw = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False, causal=True, block_table=table)
    with use_backend(impl):
        outs = [flash_attn_with_kvcache(q[:, :prompt], kp, vp, k[:, :prompt], v[:, :prompt], cache_seqlens=0, **kw)]
        for t in range(prompt, s):
            step = (q[:, t : t + 1], kp, vp, k[:, t : t + 1], v[:, t : t + 1])
            outs.append(flash_attn_with_kvcache(*step, cache_seqlens=t, **kw))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


def _rope(seqlen, rotary_dim):
    inv = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).double() / rotary_dim)
    ang = torch.arange(seqlen).double()[:, None] * inv
    return ang.cos().float(), ang.sin().float()


def test_lean_kernel_reads_pages_too(impl_device):
    """The decode step's kernel (InferenceKernels.attend_cache) with a block table."""
    impl, device = impl_device
    g = torch.Generator().manual_seed(3)
    kp, vp, table = _paged_case(g, 3, 16, 4, 2, 64, torch.float32, device)
    q = torch.randn(3, 1, 8, 64, generator=g).to(device)
    lens = torch.tensor([1, 33, 64], dtype=torch.int32, device=device)
    with use_backend(impl):
        out = InferenceKernels(q).attend_cache(q, kp, vp, lens, 0.125, table)
    ref, _ = attention_kvcache_ref(q, kp, vp, lens, 0.125, True, table)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "table, lens, match",
    [
        (torch.tensor([[0, 1], [2, 99]], dtype=torch.int32), [3, 7], "block_table row 1 holds block id 99"),
        (torch.tensor([[0, 1], [2, -1]], dtype=torch.int32), [3, 7], "block_table row 1 holds block id -1"),
        (torch.tensor([[0], [2]], dtype=torch.int32), [3, 7], "sequence 1 needs 2 blocks"),
        (torch.tensor([[0, 1], [2, 3]], dtype=torch.int64), [3, 7], "block_table has dtype int64; expected .*int32"),
        (torch.tensor([[0, 1]], dtype=torch.int32), [3, 7], "block_table has 1 rows but q has batch 2"),
    ],
)
@pytest.mark.parametrize("impl", ["cpu", "ref"])
def test_bad_block_tables_name_the_problem(impl, table, lens, match):
    kv = torch.zeros(6, 4, 2, 2, 32)
    q = torch.zeros(2, 1, 4, 32)
    with use_backend(impl), pytest.raises((ValueError, TypeError), match=match):
        flash_attn_with_kvcache(q, kv[:, :, 0], kv[:, :, 1], cache_seqlens=torch.tensor(lens), block_table=table)


def test_cpu_kernel_refuses_a_stray_block_id_itself():
    """The lean path skips the Python checks: the kernel's own check keeps it inside the pool."""
    from internlm_fast import _C

    kv = torch.zeros(6, 4, 2, 2, 32)
    q = torch.zeros(1, 1, 4, 32)
    table = torch.tensor([[0, 6]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="block id outside the cache"):
        lens = torch.tensor([5], dtype=torch.int32)
        _C.cpu.flash_attn_kvcache_fwd(q, kv[:, :, 0], kv[:, :, 1], lens, table, 1.0, True)
