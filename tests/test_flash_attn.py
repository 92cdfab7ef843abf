import subprocess
import sys

import pytest
import torch

from internlm_fast import ops
from internlm_fast.ops import use_backend
from internlm_fast.ops.flash_attn import attention_ref, attention_varlen_ref, flash_attn_func, flash_attn_varlen_func
from internlm_fast.ops.flash_attn_packed import (
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)

from .conftest import ATOL, assert_matches_oracle

OP = "flash_attn"

# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim)
DENSE = [
    (1, 1, 1, 2, 2, 64),
    (2, 97, 97, 4, 4, 64),
    (1, 128, 128, 32, 8, 80),  # GQA 32/8
    (2, 61, 61, 6, 1, 128),  # MQA
    (1, 33, 200, 4, 2, 128),  # seqlen_q < seqlen_k: causal aligned bottom-right
    (1, 90, 40, 2, 2, 96),  # seqlen_q > seqlen_k: early rows see no key
    (1, 20, 20, 2, 2, 256),
    (1, 15, 15, 2, 2, 40),  # head_dim % 16 == 8
]


def _grads(fn, q, k, v, dout):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return out, q.grad, k.grad, v.grad


def _check_all(name, ours, lowp, fp64, dtype):
    for label, a, b, c in zip(("out", "dq", "dk", "dv"), ours, lowp, fp64):
        assert_matches_oracle(f"{name} {label}", a, b, c, atol=ATOL[dtype])


@pytest.mark.parametrize("shape", DENSE, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_forward_backward_match_oracle(impl_device, shape, causal, dtype):
    impl, device = impl_device
    b, sq, sk, hq, hk, d = shape
    if impl == "triton" and device == "cpu" and hq >= 16:
        # the Triton interpreter runs every program of the grid in Python: the same group ratio on
        # a quarter of the heads runs the same kernel code in a third of the time (2 Zen 1 cores: 28-56
        # s a case at 32 heads, 8-19 s at 8)
        hq, hk = hq // 4, hk // 4
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(b, sq, hq, d, generator=g).to(device, dtype)
    k = torch.randn(b, sk, hk, d, generator=g).to(device, dtype)
    v = torch.randn(b, sk, hk, d, generator=g).to(device, dtype)
    dout = torch.randn(b, sq, hq, d, generator=g).to(device, dtype)
    with use_backend(impl):
        ours = _grads(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), q, k, v, dout)
    ref = lambda q, k, v: attention_ref(q, k, v, causal)[0]  # noqa: E731
    lowp = _grads(ref, q, k, v, dout)
    fp64 = _grads(ref, q.double(), k.double(), v.double(), dout.double())
    _check_all("dense", ours, lowp, fp64, dtype)


def test_lse_and_rows_without_keys():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, 2, 64, generator=g) for n in (6, 3, 3))
    with use_backend("cpu"):
        out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    ref_out, ref_lse = attention_ref(q.double(), k.double(), v.double(), True)
    assert lse.shape == (1, 2, 6) and lse.dtype == torch.float32
    # rows 0..2 see no key (seqlen_q 6 > seqlen_k 3, bottom-right): zero output, lse +inf (flash-attn)
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert torch.isinf(lse[..., :3]).all() and (lse[..., :3] > 0).all()
    torch.testing.assert_close(lse[..., 3:].double(), ref_lse[..., 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)


def _varlen_case(lens_q, lens_k, hq, hk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), hq, d, generator=g).to(dtype)
    k = torch.randn(int(cu_k[-1]), hk, d, generator=g).to(dtype)
    v = torch.randn(int(cu_k[-1]), hk, d, generator=g).to(dtype)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize(
    "lens_q, lens_k",
    [
        ([1, 97, 5, 64], [1, 97, 5, 64]),  # includes a 1-token sequence
        ([3, 0, 40], [3, 0, 40]),  # an empty batch element
        ([2, 7], [10, 7]),  # seqlen_q < seqlen_k per sequence
    ],
)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_matches_oracle_and_never_crosses_sequences(lens_q, lens_k, causal, dtype):
    q, k, v, cu_q, cu_k = _varlen_case(lens_q, lens_k, 8, 2, 64, dtype, seed=len(lens_q))
    dout = torch.randn_like(q)
    mq, mk = max(lens_q), max(lens_k)

    def ours(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, causal=causal)

    def ref(q, k, v):
        return attention_varlen_ref(q, k, v, cu_q, cu_k, causal)[0]

    with use_backend("cpu"):
        got = _grads(ours, q, k, v, dout)
    lowp = _grads(ref, q, k, v, dout)
    fp64 = _grads(ref, q.double(), k.double(), v.double(), dout.double())
    _check_all("varlen", got, lowp, fp64, dtype)


def test_varlen_equals_dense_per_sequence():
    q, k, v, cu_q, cu_k = _varlen_case([5, 33, 1], [5, 33, 1], 4, 4, 64, torch.float32, seed=7)
    with use_backend("cpu"):
        packed = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 33, 33, causal=True)
        for b in range(3):
            s, e = int(cu_q[b]), int(cu_q[b + 1])
            alone = flash_attn_func(q[None, s:e], k[None, s:e], v[None, s:e], causal=True)[0]
            torch.testing.assert_close(packed[s:e], alone, atol=1e-6, rtol=1e-6)


def test_strided_qkv_from_packed_projection():
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(2, 50, 3, 4, 64, generator=g)
    q, k, v = qkv.unbind(2)  # strided views
    with use_backend("cpu"):
        out = flash_attn_func(q, k, v, causal=True)
    ref, _ = attention_ref(q.double(), k.double(), v.double(), True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "seqlen, head_dim, scale, causal",
    [(1023, 64, 0.3, True), (2048, 128, None, False), (2048, 128, None, True)],
)
def test_long_sequences_and_softmax_scale(seqlen, head_dim, scale, causal):
    g = torch.Generator().manual_seed(seqlen)
    q, k, v = (torch.randn(1, seqlen, 2, head_dim, generator=g) for _ in range(3))
    with use_backend("cpu"):
        out = flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
    ref, _ = attention_ref(q.double(), k.double(), v.double(), causal, scale)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


def test_gradcheck_small_fp32_against_fp64_autograd():
    # the cpu kernels are fp32-only, so compare gradients with fp64 autograd on the reference
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 9, 4, 16, generator=g) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]
    dout = torch.randn(2, 9, 4, 16, generator=g)
    with use_backend("cpu"):
        got = _grads(lambda q, k, v: flash_attn_func(q, k, v, causal=True), q, k, v, dout)
    exp = _grads(lambda q, k, v: attention_ref(q, k, v, True)[0], q.double(), k.double(), v.double(), dout.double())
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_ref_backend_gradcheck_fp64():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 5, 2, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    with use_backend("ref"):
        assert torch.autograd.gradcheck(lambda q, k, v: flash_attn_func(q, k, v, causal=True), (q, k, v))


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 40, 4, 64, generator=g, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return flash_attn_func(q, k, v, causal=True).square().sum()

    with use_backend("cpu"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v).backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (attention_ref(q, k, v, True)[0].square().sum()).backward()
    for a, t in zip(got, (q, k, v)):
        torch.testing.assert_close(a, t.grad, atol=1e-4, rtol=1e-4)


def _qkv(b=1, s=8, h=4, hk=4, d=64, dtype=torch.float32):
    return (
        torch.randn(b, s, h, d, dtype=dtype),
        torch.randn(b, s, hk, d, dtype=dtype),
        torch.randn(b, s, hk, d, dtype=dtype),
    )


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: (*_qkv(d=60),), ValueError, "head_dim must be a multiple of 8"),
        (lambda: (*_qkv(d=264),), ValueError, "head_dim must be a multiple of 8 between 8 and 256"),
        (lambda: (*_qkv(h=6, hk=4),), ValueError, "not a multiple of k/v's 4 heads"),
        (lambda: (_qkv()[0], _qkv()[1], _qkv()[2].double()), TypeError, "v has dtype"),
        (lambda: (_qkv()[0][0], *_qkv()[1:]), ValueError, "q must have 4 dimensions"),
        (lambda: (_qkv()[0], _qkv(b=2)[1], _qkv(b=2)[2]), ValueError, "k has batch 2"),
        (lambda: (_qkv()[0], _qkv()[1], _qkv()[2][:, :5]), ValueError, "k has shape"),
        (lambda: (_qkv()[0].int(), *_qkv()[1:]), TypeError, "q has dtype int32"),
        (lambda: (_qkv()[0], _qkv()[1].to("meta"), _qkv()[2].to("meta")), ValueError, "is on meta"),
        (lambda: (torch.randn(1, 8, 4, 128)[..., ::2], *_qkv()[1:]), ValueError, "q must be contiguous in its last"),
    ],
)
def test_bad_arguments_name_the_argument(make, exc, match):
    with use_backend("cpu"), pytest.raises(exc, match=match):
        flash_attn_func(*make(), causal=True)


def test_bad_varlen_arguments():
    q, k, v, cu_q, cu_k = _varlen_case([3, 4], [3, 4], 2, 2, 64, torch.float32, seed=0)
    with use_backend("cpu"):
        with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
            flash_attn_varlen_func(q, k, v, torch.tensor([0, 5, 3, 7], dtype=torch.int32), cu_k, 4, 4)
        with pytest.raises(TypeError, match="cu_seqlens_k has dtype int64"):
            flash_attn_varlen_func(q, k, v, cu_q, cu_k.long(), 4, 4)
        with pytest.raises(ValueError, match="cu_seqlens_q ends at 6"):
            flash_attn_varlen_func(q, k, v, torch.tensor([0, 3, 6], dtype=torch.int32), cu_k, 4, 4)
        with pytest.raises(ValueError, match="max_seqlen_q=2 must be an int >= the longest"):
            flash_attn_varlen_func(q, k, v, cu_q, cu_k, 2, 4)
        with pytest.raises(ValueError, match="cu_seqlens_q has 3 offsets but cu_seqlens_k has 2"):
            flash_attn_varlen_func(q, k, v, cu_q, torch.tensor([0, 7], dtype=torch.int32), 4, 7)
        with pytest.raises(ValueError, match="dropout_p"):
            flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 4, dropout_p=0.1)


# ---------------------------------------------------------------------------------------------
# flash-attn's full signatures

# flash-attn v2's optional arguments at their defaults, in its order (flash_attn_interface.py)
FA_DEFAULTS = dict(
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
)


def test_every_flash_attn_default_is_accepted_by_keyword_and_position():
    q, k, v, cu_q, cu_k = _varlen_case([3, 5], [4, 5], 4, 2, 16, torch.float32, seed=1)
    dq, dk, dv = (t.view(1, *t.shape) for t in (q, k, v))
    with use_backend("cpu"):
        plain = flash_attn_func(dq, dk, dv)
        assert torch.equal(flash_attn_func(dq, dk, dv, **FA_DEFAULTS), plain)
        assert torch.equal(flash_attn_func(dq, dk, dv, *FA_DEFAULTS.values()), plain)
        assert torch.equal(flash_attn_func(dq, dk, dv, deterministic=True), plain)
        plain = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 5)
        for got in (
            flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 5, **FA_DEFAULTS, block_table=None),
            flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 5, *FA_DEFAULTS.values(), None),
            flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 5, window_size=[-1, -1], deterministic=True),
        ):
            assert torch.equal(got, plain)


def test_return_attn_probs_is_out_lse_and_no_probabilities():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 6, 2, 16, generator=g) for _ in range(3))
    with use_backend("cpu"):
        out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
        got = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        # return_attn_probs wins: flash-attn's triple, S_dmask None as flash-attn gives without dropout
        both = flash_attn_func(q, k, v, causal=True, return_attn_probs=True, return_lse=True)
    for triple in (got, both):
        assert len(triple) == 3 and triple[2] is None
        assert torch.equal(triple[0], out) and torch.equal(triple[1], lse)
    qv, kv_, vv = (t.reshape(12, 2, 16) for t in (q, k, v))
    cu = torch.tensor([0, 6, 12], dtype=torch.int32)
    with use_backend("cpu"):
        vout, vlse, probs = flash_attn_varlen_func(qv, kv_, vv, cu, cu, 6, 6, causal=True, return_attn_probs=True)
    assert probs is None and vlse.shape == (2, 12)
    torch.testing.assert_close(vout.view(2, 6, 2, 16), out)
    torch.testing.assert_close(vlse.view(2, 2, 6).transpose(0, 1), lse)


@pytest.mark.parametrize(
    "kw, value",
    [
        ("dropout_p", 0.1),
        ("window_size", (4, 0)),
        ("window_size", (-1, 0)),
        ("softcap", 30.0),
        ("alibi_slopes", torch.ones(4)),
    ],
)
@pytest.mark.parametrize("impl", ["cpu", "ref"])
def test_unsupported_flash_attn_features_name_the_argument(impl, kw, value):
    q, k, v, cu_q, cu_k = _varlen_case([3, 5], [3, 5], 4, 2, 16, torch.float32, seed=3)
    qkv = torch.stack((q, q, q), dim=1)
    with use_backend(impl):
        for call in (
            lambda: flash_attn_func(q[None], k[None], v[None], **{kw: value}),
            lambda: flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 5, **{kw: value}),
            lambda: flash_attn_qkvpacked_func(qkv.view(1, 8, 3, 4, 16), **{kw: value}),
            lambda: flash_attn_varlen_qkvpacked_func(qkv, cu_q, 5, **{kw: value}),
        ):
            with pytest.raises(ValueError, match=f"^{kw}="):
                call()
        with pytest.raises(ValueError, match="^block_table=a tensor of shape \\(2, 1\\): a paged KV cache"):
            flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 5, block_table=torch.zeros(2, 1, dtype=torch.int32))
        with pytest.raises(TypeError, match="window_size must be a pair"):
            flash_attn_func(q[None], k[None], v[None], window_size=-1)


# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim)
PACKED = [(2, 9, 9, 4, 4, 16), (1, 5, 12, 6, 2, 32)]


@pytest.mark.parametrize("shape", PACKED, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_packed_variants_equal_the_unpacked_calls(shape, causal):
    """Same out, lse and gradients as flash_attn_func / flash_attn_varlen_func on the unbound views,
    the gradients landing in the packed tensors."""
    b, sq, sk, hq, hk, d = shape
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(b, sq, hq, d, generator=g)
    kv = torch.randn(b, sk, 2, hk, d, generator=g)
    dout = torch.randn(b, sq, hq, d, generator=g)
    cu_q = torch.arange(0, b * sq + 1, sq, dtype=torch.int32)
    cu_k = torch.arange(0, b * sk + 1, sk, dtype=torch.int32)

    def run(fn, *packed):
        leaves = [t.detach().clone().requires_grad_() for t in packed]
        out, lse = fn(*leaves)
        out.backward(dout.view(out.shape))
        return out.detach(), lse, [t.grad for t in leaves]

    def dense(q, k, v):
        return flash_attn_func(q, k, v, causal=causal, return_lse=True)

    def varlen(q, k, v):
        flat = (t.reshape(-1, *t.shape[2:]) for t in (q, k, v))
        return flash_attn_varlen_func(*flat, cu_q, cu_k, sq, sk, causal=causal, return_lse=True)

    def unpacked(fn, q, k, v):
        out, lse, (gq, gk, gv) = run(fn, q, k, v)
        return out, lse, gq, torch.stack((gk, gv), dim=2)

    cases = [
        (
            lambda q, kv: flash_attn_kvpacked_func(q, kv, causal=causal, return_lse=True),
            lambda q, kv: unpacked(dense, q, *kv.unbind(2)),
        ),
        (
            lambda q, kv: flash_attn_varlen_kvpacked_func(
                q.flatten(0, 1), kv.flatten(0, 1), cu_q, cu_k, sq, sk, causal=causal, return_lse=True
            ),
            lambda q, kv: unpacked(varlen, q, *kv.unbind(2)),
        ),
    ]
    with use_backend("cpu"):
        for packed_fn, unpacked_fn in cases:
            out, lse, (gq, gkv) = run(packed_fn, q, kv)
            want = unpacked_fn(q, kv)
            for a, e in zip((out.view(want[0].shape), lse, gq, gkv), want):
                torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-6)
        if hq == hk and sq == sk:
            qkv = torch.stack((q, *kv.unbind(2)), dim=2)
            out, lse, (gqkv,) = run(lambda qkv: flash_attn_qkvpacked_func(qkv, causal=causal, return_lse=True), qkv)
            want = run(dense, *qkv.unbind(2))
            torch.testing.assert_close(out, want[0], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(gqkv, torch.stack(want[2], dim=2), atol=1e-6, rtol=1e-6)
            out, lse, (gqkv,) = run(
                lambda qkv: flash_attn_varlen_qkvpacked_func(
                    qkv.flatten(0, 1), cu_q, sq, causal=causal, return_lse=True
                ),
                qkv,
            )
            torch.testing.assert_close(out.view(want[0].shape), want[0], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(gqkv, torch.stack(want[2], dim=2), atol=1e-6, rtol=1e-6)


def test_packed_variants_read_views_not_copies(monkeypatch):
    """The kernel receives q, k, v as strided views of the packed tensor's storage."""
    seen = []
    real = ops.flash_attn._attention

    def spy(q, k, v, *rest):
        seen.append((q, k, v))
        return real(q, k, v, *rest)

    monkeypatch.setattr(ops.flash_attn, "_attention", spy)
    qkv = torch.randn(2, 7, 3, 2, 16)
    vqkv = torch.randn(9, 3, 2, 16)
    with use_backend("cpu"):
        flash_attn_qkvpacked_func(qkv)
        flash_attn_varlen_qkvpacked_func(vqkv, torch.tensor([0, 4, 9], dtype=torch.int32), 5)
    for (q, k, v), packed in zip(seen, (qkv, vqkv)):
        for i, t in enumerate((q, k, v)):
            assert t.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
            assert t.data_ptr() == packed.select(-3, i).data_ptr()


def test_bad_packed_shapes_name_the_argument():
    with use_backend("cpu"):
        with pytest.raises(ValueError, match="qkv has shape \\(1, 4, 2, 2, 16\\); expected \\(batch, seqlen, 3"):
            flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 2, 16))
        with pytest.raises(ValueError, match="kv must have 5 dimensions"):
            flash_attn_kvpacked_func(torch.randn(1, 4, 2, 16), torch.randn(4, 2, 2, 16))
        with pytest.raises(ValueError, match="kv has shape \\(4, 3, 2, 16\\); expected \\(total_k, 2"):
            cu = torch.tensor([0, 4], dtype=torch.int32)
            flash_attn_varlen_kvpacked_func(torch.randn(4, 2, 16), torch.randn(4, 3, 2, 16), cu, cu, 4, 4)


# ---------------------------------------------------------------------------------------------
# fp64: the reference's precision, refused by the compiled kernels


def test_fp64_gradcheck_through_the_ref_backend_every_entry_point():
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(1, 5, 3, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    vq = torch.randn(7, 4, 8, dtype=torch.float64, generator=g, requires_grad=True)
    vkv = torch.randn(7, 2, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    with use_backend("ref"):
        assert torch.autograd.gradcheck(lambda t: flash_attn_qkvpacked_func(t, causal=True), (qkv,))
        assert torch.autograd.gradcheck(
            lambda q, kv: flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 4, 4, causal=True), (vq, vkv)
        )


@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_fp64_on_a_kernel_backend_says_to_use_ref(impl):
    if not ops.available(impl) or (impl == "triton" and not hasattr(ops.backend.kernels(impl), "flash_attn_fwd")):
        pytest.skip(f"backend {impl!r} has no flash_attn kernel here")
    q, k, v = (torch.randn(1, 4, 2, 8, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 4], dtype=torch.int32)
    match = f"q has dtype float64, which the '{impl}' backend.*use_backend\\(\"ref\"\\)"
    with use_backend(impl):
        with pytest.raises(TypeError, match=match):
            flash_attn_func(q, k, v, causal=True)
        with pytest.raises(TypeError, match=match):
            flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 4, 4)


def test_an_inference_call_does_not_load_torch_compile():
    """Eager calls without gradients skip the custom op, whose first call imports torch._dynamo
    (~150 MB resident): a forward-only process stays lean."""
    code = (
        "import sys, torch\n"
        "from internlm_fast.ops import flash_attn_func, flash_attn_varlen_func\n"
        "q = torch.randn(1, 16, 2, 32)\n"
        "flash_attn_func(q, q, q, causal=True)\n"
        "cu = torch.tensor([0, 16], dtype=torch.int32)\n"
        "flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 16, 16, causal=True)\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
        "flash_attn_func(q.requires_grad_(), q, q).sum().backward()\n"  # autograd still goes through the op
        "assert q.grad is not None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
