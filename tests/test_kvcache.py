import pytest
import torch

from internlm_fast.ops import use_backend
from internlm_fast.ops.attention import flash_attn_func
from internlm_fast.ops.kvcache import flash_attn_with_kvcache, flash_attn_with_kvcache_ref
from internlm_fast.ops.rotary import apply_rotary


def _rope(seqlen, rotary_dim):
    inv = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).double() / rotary_dim)
    ang = torch.arange(seqlen).double()[:, None] * inv
    return ang.cos().float(), ang.sin().float()


@pytest.mark.parametrize("hq, hk", [(8, 8), (8, 2), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_token_by_token_equals_full_causal_forward(hq, hk, dtype):
    """Prefill a prompt into the cache, then decode one token at a time with rotary applied at the
    cache offset: every step equals the same positions of one full causal forward."""
    g = torch.Generator().manual_seed(hq + hk)
    b, s, d, prompt = 2, 48, 64, 20
    q, k, v = (torch.randn(b, s, h, d, generator=g).to(dtype) for h in (hq, hk, hk))
    cos, sin = _rope(64, d)
    with use_backend("cpu"):
        full = flash_attn_func(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, causal=True)
        kc = torch.zeros(b, 64, hk, d, dtype=dtype)
        vc = torch.zeros(b, 64, hk, d, dtype=dtype)
        kw = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False)
        outs = [flash_attn_with_kvcache(q[:, :prompt], kc, vc, k[:, :prompt], v[:, :prompt], cache_seqlens=0, **kw)]
        for t in range(prompt, s):
            outs.append(
                flash_attn_with_kvcache(
                    q[:, t : t + 1], kc, vc, k[:, t : t + 1], v[:, t : t + 1], cache_seqlens=t, **kw
                )
            )
    got = torch.cat(outs, dim=1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), full.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("seqlen_q", [1, 3, 17])
def test_per_sequence_cache_lengths_match_reference(seqlen_q):
    g = torch.Generator().manual_seed(seqlen_q)
    b, hq, hk, d, cap = 3, 8, 2, 128, 300
    q = torch.randn(b, seqlen_q, hq, d, generator=g)
    k, v = (torch.randn(b, seqlen_q, hk, d, generator=g) for _ in range(2))
    kc, vc = (torch.randn(b, cap, hk, d, generator=g) for _ in range(2))
    lens = torch.tensor([0, 5, 270], dtype=torch.int32)
    kc2, vc2 = kc.clone(), vc.clone()
    with use_backend("cpu"):
        out, lse = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, return_softmax_lse=True)
    ref, ref_lse = flash_attn_with_kvcache_ref(q, kc2, vc2, k=k, v=v, cache_seqlens=lens, return_softmax_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-5, rtol=1e-5)
    # appended in place at each sequence's own offset, nothing else touched
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    for i, n in enumerate(lens.tolist()):
        assert torch.equal(kc[i, n : n + seqlen_q], k[i])


def test_long_cache_split_across_threads_mqa():
    # batch 1, one kv head: the cache length is split into chunks whose softmaxes are merged
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 8, 64, generator=g)
    kc, vc = (torch.randn(1, 5000, 1, 64, generator=g) for _ in range(2))
    with use_backend("cpu"):
        out = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=4321)
    ref = flash_attn_with_kvcache_ref(q, kc, vc, cache_seqlens=4321)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_no_new_tokens_and_empty_cache():
    q = torch.randn(2, 1, 2, 32)
    kc, vc = torch.randn(2, 8, 2, 32), torch.randn(2, 8, 2, 32)
    with use_backend("cpu"):
        out = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # nothing to attend to
    ref = flash_attn_with_kvcache_ref(q, kc, vc, cache_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_bad_kvcache_arguments():
    q = torch.randn(1, 1, 4, 64)
    kc, vc = torch.zeros(1, 8, 2, 64), torch.zeros(1, 8, 2, 64)
    k, v = torch.randn(1, 1, 2, 64), torch.randn(1, 1, 2, 64)
    with use_backend("cpu"):
        with pytest.raises(ValueError, match="exceeds the cache length 8"):
            flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=8)
        with pytest.raises(ValueError, match="k and v must be given together"):
            flash_attn_with_kvcache(q, kc, vc, k, None, cache_seqlens=0)
        with pytest.raises(ValueError, match="cache_seqlens has 2 entries"):
            flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([1, 2]))
        with pytest.raises(ValueError, match="cache_seqlens must be >= 0"):
            flash_attn_with_kvcache(q, kc, vc, cache_seqlens=-1)
        with pytest.raises(TypeError, match="cache_seqlens must be an int"):
            flash_attn_with_kvcache(q, kc, vc)
        with pytest.raises(ValueError, match="k has shape"):
            flash_attn_with_kvcache(q, kc, vc, torch.randn(1, 1, 4, 64), torch.randn(1, 1, 4, 64), cache_seqlens=0)
        with pytest.raises(ValueError, match="rotary_cos and rotary_sin"):
            flash_attn_with_kvcache(q, kc, vc, k, v, rotary_cos=torch.ones(8, 32), cache_seqlens=0)


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize(
    ("b", "hq", "hk", "d", "lens"),
    [
        (1, 8, 8, 32, [203]),  # batch 1: kv heads split across the threads, no merge
        (1, 4, 1, 64, [1000]),  # one kv head, long: the cache length split, chunks merged
        (3, 6, 2, 16, [0, 7, 601]),  # D not a multiple of 32, an empty sequence, GQA
        (8, 8, 8, 32, [128, 37, 90, 128, 64, 17, 110, 75]),  # the batch-8 bench's shape
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_task_splits_match_reference(threads, b, hq, hk, d, lens, dtype):
    """Every way the decode kernel splits the work (kv heads, cache chunks, both, neither) gives the
    reference's output and lse, for one new token and for a few."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(b * 100 + d)
        cap = max(lens) + 8
        for seqlen_q in (1, 3):
            q = torch.randn(b, seqlen_q, hq, d, generator=g).to(dtype)
            kc, vc = (torch.randn(b, cap, hk, d, generator=g).to(dtype) for _ in range(2))
            n = torch.tensor(lens, dtype=torch.int32)
            with use_backend("cpu"):
                out, lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=n, return_softmax_lse=True)
            ref, ref_lse = flash_attn_with_kvcache_ref(q, kc, vc, cache_seqlens=n, return_softmax_lse=True)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
            # the reference's lse is computed in the input dtype: bf16-accurate only
            torch.testing.assert_close(lse, ref_lse.float(), atol=tol, rtol=tol)
    finally:
        torch.set_num_threads(before)
