import pytest
import torch

from internlm_fast.ops import use_backend
from internlm_fast.ops.flash_attn import attention_ref
from internlm_fast.ops.flash_attn_kvcache import (
    attention_kvcache_ref,
    flash_attn_with_kvcache,
    flash_attn_with_kvcache_ref,
)
from internlm_fast.ops.inference import InferenceKernels, decode_rotary_append_ref
from internlm_fast.ops.rotary import apply_rotary_ref

from .conftest import ATOL, assert_matches_oracle

OP = "flash_attn_kvcache"  # the tests taking impl_device run on every backend of this op


def _rope(seqlen, rotary_dim):
    inv = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).double() / rotary_dim)
    ang = torch.arange(seqlen).double()[:, None] * inv
    return ang.cos().float(), ang.sin().float()


@pytest.mark.parametrize("hq, hk", [(8, 8), (8, 2), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decoding_token_by_token_equals_full_causal_forward(impl_device, hq, hk, dtype):
    """Prefill a prompt into the cache, then decode one token at a time with rotary applied at the
    cache offset: every step equals the same positions of one full causal forward."""
    impl, device = impl_device
    g = torch.Generator().manual_seed(hq + hk)
    b, s, d, prompt = 2, 48, 64, 20
    q, k, v = (torch.randn(b, s, h, d, generator=g).to(device, dtype) for h in (hq, hk, hk))
    cos, sin = (t.to(device) for t in _rope(64, d))
    full, _ = attention_ref(apply_rotary_ref(q, cos, sin), apply_rotary_ref(k, cos, sin), v, causal=True)
    with use_backend(impl):
        kc = torch.zeros(b, 64, hk, d, dtype=dtype, device=device)
        vc = torch.zeros(b, 64, hk, d, dtype=dtype, device=device)
        kw = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False, causal=True)
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
def test_per_sequence_cache_lengths_match_reference(impl_device, seqlen_q):
    impl, device = impl_device
    g = torch.Generator().manual_seed(seqlen_q)
    b, hq, hk, d, cap = 3, 8, 2, 128, 300
    q = torch.randn(b, seqlen_q, hq, d, generator=g).to(device)
    k, v = (torch.randn(b, seqlen_q, hk, d, generator=g).to(device) for _ in range(2))
    kc, vc = (torch.randn(b, cap, hk, d, generator=g).to(device) for _ in range(2))
    lens = torch.tensor([0, 5, 270], dtype=torch.int32, device=device)
    kc2, vc2 = kc.clone(), vc.clone()
    with use_backend(impl):
        out, lse = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=True, return_softmax_lse=True)
    ref, ref_lse = flash_attn_with_kvcache_ref(
        q, kc2, vc2, k=k, v=v, cache_seqlens=lens, causal=True, return_softmax_lse=True
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-5, rtol=1e-5)
    # appended in place at each sequence's own offset, nothing else touched
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    for i, n in enumerate(lens.tolist()):
        assert torch.equal(kc[i, n : n + seqlen_q], k[i])


def test_long_cache_split_mqa(impl_device):
    # batch 1, one kv head: the cache length is split into chunks whose softmaxes are merged
    impl, device = impl_device
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 8, 64, generator=g).to(device)
    kc, vc = (torch.randn(1, 5000, 1, 64, generator=g).to(device) for _ in range(2))
    with use_backend(impl):
        out = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=4321)
    ref = flash_attn_with_kvcache_ref(q, kc, vc, cache_seqlens=4321)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d", [40, 72, 96, 128])  # 8 mod 16, 8 mod 16, a multiple of 32 not 64, of 64
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_head_dims_and_cache_dtypes(impl_device, d, dtype):
    """A decode step of 2 sequences reads its caches in place in every dtype, whatever slice of the
    head dimension the vector loops leave over, against the reference on the same cache values."""
    impl, device = impl_device
    g = torch.Generator().manual_seed(d)
    q = torch.randn(2, 1, 4, d, generator=g).to(device, dtype)
    kc, vc = (torch.randn(2, 150, 2, d, generator=g).to(device, dtype) for _ in range(2))
    lens = torch.tensor([150, 61], dtype=torch.int32, device=device)
    with use_backend(impl):
        out = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)
    ref = flash_attn_with_kvcache_ref(q.double(), kc.double(), vc.double(), cache_seqlens=lens)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_no_new_tokens_and_empty_cache(impl_device):
    impl, device = impl_device
    q = torch.randn(2, 1, 2, 32, device=device)
    kc, vc = torch.randn(2, 8, 2, 32, device=device), torch.randn(2, 8, 2, 32, device=device)
    lens = torch.tensor([0, 4], dtype=torch.int32, device=device)
    with use_backend(impl):
        out = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # nothing to attend to
    ref = flash_attn_with_kvcache_ref(q, kc, vc, cache_seqlens=lens)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_decode_step_matches_the_references(impl_device, dtype):
    """A decode step as the model's cached forward runs it, through the lean kernels of the backend
    (decode_rotary_append, then flash_attn_kvcache on the cache it wrote): q, the cache rows and the
    output against the references (decode_rotary_append_ref, attention_kvcache_ref), the output
    under the 2x rule against the fp64 oracle. Rows of 5 cached tokens and 0 (a first token)."""
    impl, device = impl_device
    g = torch.Generator().manual_seed(7)
    b, hq, hk, d, cap = 2, 4, 2, 32, 9
    cos, sin = (t.to(device) for t in _rope(16, d))
    qkv = torch.randn(b, hq + 2 * hk, d, generator=g, dtype=torch.float64)
    kv = torch.randn(b, cap, 2, hk, d, generator=g, dtype=torch.float64)
    positions = torch.tensor([5, 0], device=device)
    slots = torch.arange(b, device=device) * cap + positions
    visible = (positions + 1).to(torch.int32)
    runs = {}
    for name, dt in (("lean", dtype), ("ref", dtype), ("oracle", torch.float64)):
        x, cache = qkv.to(device, dt), kv.to(device, dt)
        rows = cache.view(-1, 2, hk, d)
        if name == "lean":
            with use_backend(impl):
                kern = InferenceKernels(x)
                kern.rotary_append_(x, cos, sin, positions, rows, slots, hq)
                out = kern.attend_cache(x[:, None, :hq], cache[:, :, 0], cache[:, :, 1], visible, d**-0.5)
        else:
            decode_rotary_append_ref(x, cos, sin, positions, rows, slots, hq)
            out = attention_kvcache_ref(x[:, None, :hq], cache[:, :, 0], cache[:, :, 1], visible, d**-0.5, True)[0]
        runs[name] = x, cache, out
    (x, cache, out), (x_ref, cache_ref, out_ref), (_, _, out64) = runs["lean"], runs["ref"], runs["oracle"]
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(x, x_ref, **tol)
    torch.testing.assert_close(cache, cache_ref, **tol)
    assert_matches_oracle("decode step output", out, out_ref, out64, atol=ATOL[dtype])


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
        with pytest.raises(TypeError, match="cache_seqlens must be None, an int"):
            flash_attn_with_kvcache(q, kc, vc, cache_seqlens=True)
        with pytest.raises(ValueError, match="cache_seqlens=None means the whole cache"):
            flash_attn_with_kvcache(q, kc, vc, k, v)
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
                out, lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=n, causal=True, return_softmax_lse=True)
            ref, ref_lse = flash_attn_with_kvcache_ref(q, kc, vc, cache_seqlens=n, causal=True, return_softmax_lse=True)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
            # the reference's lse is computed in the input dtype: bf16-accurate only
            torch.testing.assert_close(lse, ref_lse.float(), atol=tol, rtol=tol)
    finally:
        torch.set_num_threads(before)


# flash-attn v2's flash_attn_with_kvcache arguments after q, k_cache, v_cache, at their defaults, in
# its order (flash_attn_interface.py)
FA_KVCACHE_DEFAULTS = dict(
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
)


def _cache_case(seed, b=2, sq=3, hq=4, hk=2, d=32, cap=11):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g)
    kc, vc = (torch.randn(b, cap, hk, d, generator=g) for _ in range(2))
    return q, kc, vc


def test_every_flash_attn_default_is_accepted_by_keyword_and_position():
    q, kc, vc = _cache_case(0)
    with use_backend("cpu"):
        plain = flash_attn_with_kvcache(q, kc, vc)
        assert torch.equal(flash_attn_with_kvcache(q, kc, vc, **FA_KVCACHE_DEFAULTS), plain)
        assert torch.equal(flash_attn_with_kvcache(q, kc, vc, *FA_KVCACHE_DEFAULTS.values()), plain)
        assert torch.equal(flash_attn_with_kvcache(q, kc, vc, num_splits=3), plain)  # a hint only


@pytest.mark.parametrize("impl", ["cpu", "ref"])
def test_cache_seqlens_none_is_the_whole_cache(impl):
    q, kc, vc = _cache_case(1)
    with use_backend(impl):
        out, lse = flash_attn_with_kvcache(q, kc, vc, return_softmax_lse=True)
        want, want_lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=kc.shape[1], return_softmax_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    ref, _ = attention_ref(q.double(), kc.double(), vc.double(), False)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["cpu", "ref"])
def test_causal_defaults_to_false_as_in_flash_attn(impl):
    q, kc, vc = _cache_case(2)
    lens = torch.tensor([4, 8], dtype=torch.int32)
    with use_backend(impl):
        default = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)
        full = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=False)
        causal = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True)
    assert torch.equal(default, full)
    for b, n in enumerate(lens.tolist()):
        for is_causal, got in ((False, full), (True, causal)):
            want, _ = attention_ref(
                q[b : b + 1].double(), kc[b : b + 1, :n].double(), vc[b : b + 1, :n].double(), is_causal
            )
            torch.testing.assert_close(got[b : b + 1].double(), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full, causal)  # 3 query tokens: the first two see fewer keys when causal


@pytest.mark.parametrize(
    "kw, value, what",
    [
        ("cache_batch_idx", torch.tensor([1, 0], dtype=torch.int32), "a tensor of shape \\(2,\\)"),
        ("cache_leftpad", torch.tensor([0, 2], dtype=torch.int32), "a tensor of shape \\(2,\\)"),
        ("window_size", (8, 0), "\\(8, 0\\)"),
        ("softcap", 50.0, "50.0"),
        ("alibi_slopes", torch.ones(4), "a tensor of shape \\(4,\\)"),
        ("num_splits", -1, "-1"),
    ],
)
@pytest.mark.parametrize("impl", ["cpu", "ref"])
def test_unsupported_flash_attn_features_name_the_argument(impl, kw, value, what):
    q, kc, vc = _cache_case(3)
    k, v = torch.randn(2, 1, 2, 32), torch.randn(2, 1, 2, 32)
    before = kc.clone()
    with use_backend(impl), pytest.raises(ValueError, match=f"^{kw}={what}"):
        flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=2, **{kw: value})
    assert torch.equal(kc, before)  # refused before anything is appended


def test_fp64_runs_on_ref_and_the_cpu_backend_says_so():
    q, kc, vc = (t.double() for t in _cache_case(4))
    k, v = torch.randn(2, 3, 2, 32, dtype=torch.float64), torch.randn(2, 3, 2, 32, dtype=torch.float64)
    before = kc.clone()
    with use_backend("cpu"), pytest.raises(TypeError, match='q has dtype float64.*use_backend\\("ref"\\)'):
        flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=5, causal=True)
    assert torch.equal(kc, before)  # refused before anything is appended
    with use_backend("ref"):
        out = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=5, causal=True)
    assert out.dtype == torch.float64 and torch.equal(kc[:, 5:8], k)
    want, _ = attention_ref(q, kc[:, :8], vc[:, :8], True)
    torch.testing.assert_close(out, want)
