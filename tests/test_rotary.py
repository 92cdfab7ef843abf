import math

import pytest
import torch

from internlm_fast.ops import apply_rotary, apply_rotary_ref, use_backend

from .conftest import ATOL, assert_matches_oracle

OP = "rotary"


def tables(seqlen_ro, rotary_dim, dtype=torch.float32, base=10000.0):
    """cos/sin as a model builds them: (seqlen_ro, rotary_dim / 2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    freqs = torch.outer(torch.arange(seqlen_ro, dtype=torch.float64), inv_freq)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def run(fn, x, cos, sin, dy, **kw):
    x = x.detach().requires_grad_()
    out = fn(x, cos, sin, **kw)
    (out * dy).sum().backward()
    return out.detach(), x.grad


def check_against_oracle(impl, device, x, cos, sin, dtype, **kw):
    g = torch.Generator().manual_seed(7)
    x = x.to(device=device, dtype=dtype)
    cos, sin = cos.to(device), sin.to(device)
    dy = torch.randn(x.shape, generator=g).to(device=device, dtype=dtype)
    with use_backend(impl):
        out, dx = run(apply_rotary, x, cos, sin, dy, **kw)
    ref_out, ref_dx = run(apply_rotary_ref, x, cos, sin, dy, **kw)
    o64, dx64 = run(apply_rotary_ref, x.double(), cos.double(), sin.double(), dy.double(), **kw)
    assert_matches_oracle("out", out, ref_out, o64, atol=ATOL[dtype])
    assert_matches_oracle("dx", dx, ref_dx, dx64, atol=ATOL[dtype])
    assert out.is_contiguous()


# (batch, seqlen, heads, headdim), rotary_dim, seqlen_ro, seqlen_offsets
CASES = [
    ((2, 97, 3, 128), 128, 97, 0),  # full rotary, InternLM head_dim
    ((3, 33, 2, 128), 64, 40, 7),  # partial rotary: 64 of 128, int offset
    ((2, 17, 5, 80), 80, 30, "tensor"),  # head_dim 80 fully rotated, per-sequence offsets
    ((1, 1, 4, 64), 64, 1, 0),  # one token
    ((2, 5, 1, 10), 6, 9, "tensor"),  # tiny odd sizes, rotary_dim / 2 odd
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-rd{c[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_forward_backward_match_oracle(impl_device, case, dtype, interleaved):
    impl, device = impl_device
    shape, rd, seqlen_ro, offsets = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    cos, sin = tables(seqlen_ro, rd, dtype)
    if offsets == "tensor":
        offsets = torch.randint(0, seqlen_ro - shape[1] + 1, (shape[0],), generator=g).to(device)
    check_against_oracle(impl, device, x, cos, sin, dtype, interleaved=interleaved, seqlen_offsets=offsets)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_fp32_tables_with_other_x_dtypes(impl_device, x_dtype):
    impl, device = impl_device
    x = torch.randn(2, 19, 3, 64, generator=torch.Generator().manual_seed(3))
    cos, sin = tables(25, 48, torch.float32)
    check_against_oracle(impl, device, x, cos, sin, x_dtype, seqlen_offsets=torch.tensor([0, 6]))


def test_reference_matches_the_textbook_formulas():
    """The oracle itself, against Hugging Face's rotate_half (half) and complex multiplication
    (interleaved), so a wrong reference cannot pass the oracle tests."""
    x = torch.randn(2, 11, 3, 16, dtype=torch.float64)
    cos, sin = tables(11, 16, torch.float64)
    c = torch.cat((cos, cos), -1)[None, :, None, :]
    s = torch.cat((sin, sin), -1)[None, :, None, :]
    rotate_half = torch.cat((-x[..., 8:], x[..., :8]), -1)
    torch.testing.assert_close(apply_rotary_ref(x, cos, sin), x * c + rotate_half * s)
    z = torch.view_as_complex(x.reshape(2, 11, 3, 8, 2).contiguous())
    rot = torch.view_as_real(z * torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[None, :, None]).flatten(-2)
    torch.testing.assert_close(apply_rotary_ref(x, cos, sin, interleaved=True), rot)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("tensor_offsets", [False, True], ids=["int-offset", "tensor-offsets"])
def test_varlen_restarts_positions_per_sequence(impl_device, interleaved, tensor_offsets):
    impl, device = impl_device
    lens = [5, 1, 0, 9, 3]  # a 1-token and an empty sequence
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    x = torch.randn(sum(lens), 4, 80, generator=torch.Generator().manual_seed(1)).to(device)
    cos, sin = tables(16, 64)
    cos, sin = cos.to(device), sin.to(device)
    offsets = torch.tensor([2, 0, 100, 7, 13], device=device) if tensor_offsets else 3
    kw = dict(interleaved=interleaved, seqlen_offsets=offsets, cu_seqlens=cu, max_seqlen=max(lens))
    with use_backend(impl):
        out = apply_rotary(x, cos, sin, **kw)
        for b, n in enumerate(lens):  # each sequence alone, as a batch of one
            off = int(offsets[b]) if tensor_offsets else offsets
            if n == 0:
                continue
            seq = x[cu[b] : cu[b + 1]][None]
            alone = apply_rotary(seq, cos, sin, interleaved=interleaved, seqlen_offsets=off)[0]
            torch.testing.assert_close(out[cu[b] : cu[b + 1]], alone, rtol=0, atol=0)
    check_against_oracle(impl, device, x, cos, sin, torch.float32, **kw)


def test_varlen_many_sequences_across_thread_chunks(impl_device):
    """Enough tokens that the work is split into chunks whose boundaries fall inside sequences."""
    impl, device = impl_device
    g = torch.Generator().manual_seed(5)
    lens = torch.randint(0, 200, (40,), generator=g)
    lens[::7] = 0
    cu = torch.cat((torch.zeros(1, dtype=torch.long), lens.cumsum(0))).to(torch.int32).to(device)
    x = torch.randn(int(lens.sum()), 2, 64, generator=g).to(device)
    cos, sin = tables(256, 64)
    offsets = torch.randint(0, 56, (40,), generator=g, dtype=torch.int32).to(device)
    check_against_oracle(impl, device, x, cos, sin, torch.float32, seqlen_offsets=offsets, cu_seqlens=cu)


@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_strided_q_from_packed_qkv(impl_device, varlen):
    impl, device = impl_device
    shape = (7, 3, 4, 64) if varlen else (2, 7, 3, 4, 64)
    qkv = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device)
    q = qkv.select(-3, 0)  # (..., heads, d), strided in every dim but the last
    assert not q.is_contiguous()
    cos, sin = tables(7, 64)
    kw = dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32, device=device)) if varlen else {}
    expected = apply_rotary_ref(q.contiguous(), cos, sin, **kw)
    with use_backend(impl):
        out = apply_rotary(q, cos, sin, **kw)
        assert out.is_contiguous()
        torch.testing.assert_close(out, expected)
        before = qkv.clone()
        ret = apply_rotary(q, cos, sin, inplace=True, **kw)
    assert ret is q
    torch.testing.assert_close(qkv.select(-3, 0), expected)
    torch.testing.assert_close(qkv.select(-3, 1), before.select(-3, 1), rtol=0, atol=0)
    torch.testing.assert_close(qkv.select(-3, 2), before.select(-3, 2), rtol=0, atol=0)


def test_cos_sin_views_are_accepted(impl_device):
    impl, device = impl_device
    x = torch.randn(1, 9, 2, 64).to(device)
    cos, sin = tables(12, 128)  # a wider table; the first 32 frequencies are rotary_dim 64's
    cos64, sin64 = tables(12, 64)
    cos_v, sin_v = cos[:, ::2], sin[:, ::2]
    torch.testing.assert_close(cos_v, cos64)
    with use_backend(impl):
        torch.testing.assert_close(apply_rotary(x, cos_v, sin_v), apply_rotary_ref(x, cos64, sin64))


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_inplace_result_and_gradient(impl_device, interleaved):
    impl, device = impl_device
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 13, 3, 128, generator=g).to(device)
    dy = torch.randn(2, 13, 3, 128, generator=g).to(device)
    cos, sin = tables(20, 96)
    offsets = torch.tensor([1, 4], device=device)
    kw = dict(interleaved=interleaved, seqlen_offsets=offsets)
    expected = apply_rotary_ref(x0, cos, sin, **kw)
    with use_backend(impl):
        # no autograd: the kernel writes into x
        x = x0.clone()
        version = x._version
        assert apply_rotary(x, cos, sin, inplace=True, **kw) is x
        assert x._version > version  # autograd's saved-tensor check sees the mutation
        torch.testing.assert_close(x, expected)
        # with autograd: x is a non-leaf, gradients flow to the leaf it came from
        leaf = x0.clone().requires_grad_()
        y = leaf * 2
        out = apply_rotary(y, cos, sin, inplace=True, **kw)
        assert out is y
        (out * dy).sum().backward()
    leaf_ref = x0.clone().requires_grad_()
    (apply_rotary_ref(leaf_ref * 2, cos, sin, **kw) * dy).sum().backward()
    torch.testing.assert_close(out.detach(), 2 * expected)
    torch.testing.assert_close(leaf.grad, leaf_ref.grad)


def test_inplace_on_leaf_requiring_grad_is_refused_like_any_inplace_op():
    x = torch.randn(1, 3, 2, 8, requires_grad=True)
    cos, sin = tables(3, 8)
    with use_backend("cpu"), pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        apply_rotary(x, cos, sin, inplace=True)


def test_inplace_and_out_of_place_under_no_grad_agree_for_every_dtype():
    cos, sin = tables(6, 32)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x = torch.randn(2, 6, 3, 48).to(dtype)
        with use_backend("cpu"), torch.no_grad():
            out = apply_rotary(x, cos.to(dtype), sin.to(dtype), interleaved=True)
            apply_rotary(x, cos.to(dtype), sin.to(dtype), interleaved=True, inplace=True)
        torch.testing.assert_close(x, out, rtol=0, atol=0)


def test_empty_inputs():
    cos, sin = tables(4, 8)
    with use_backend("cpu"):
        assert apply_rotary(torch.randn(2, 0, 3, 8), cos, sin).shape == (2, 0, 3, 8)
        cu = torch.tensor([0, 0], dtype=torch.int32)
        assert apply_rotary(torch.randn(0, 3, 8), cos, sin, cu_seqlens=cu).shape == (0, 3, 8)


def test_nan_propagates_and_stays_in_its_pair():
    x = torch.randn(1, 2, 1, 8)
    x[0, 1, 0, 1] = float("nan")
    cos, sin = tables(2, 8)
    with use_backend("cpu"):
        y = apply_rotary(x, cos, sin)
    assert torch.isnan(y[0, 1, 0, [1, 5]]).all()
    assert torch.isfinite(y[0, 0]).all() and torch.isfinite(y[0, 1, 0, [0, 2, 3, 4, 6, 7]]).all()


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_gradcheck_fp64(interleaved):
    g = torch.Generator().manual_seed(6)
    cos, sin = tables(9, 6, torch.float64)
    x = torch.randn(2, 4, 3, 10, dtype=torch.float64, generator=g, requires_grad=True)
    xv = torch.randn(6, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    cu = torch.tensor([0, 1, 1, 6], dtype=torch.int32)
    offsets = torch.tensor([3, 8, 4])
    with use_backend("cpu"):
        fn = lambda x: apply_rotary(x, cos, sin, interleaved, seqlen_offsets=torch.tensor([0, 5]))  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))
        fn_v = lambda x: apply_rotary(x, cos, sin, interleaved, seqlen_offsets=offsets, cu_seqlens=cu)  # noqa: E731
        assert torch.autograd.gradcheck(fn_v, (xv,))


def test_rotation_preserves_norm_and_backward_inverts_forward():
    """Orthogonality: |rotate(x)| = |x| per pair, and rotating by -angle undoes it."""
    x = torch.randn(2, 50, 4, 128, dtype=torch.float64)
    cos, sin = tables(64, 128, torch.float64)
    with use_backend("cpu"):
        y = apply_rotary(x, cos, sin, seqlen_offsets=torch.tensor([3, 14]))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    from internlm_fast import _C

    back = _C.cpu.rotary_bwd(y, cos, sin, torch.tensor([3, 14]), None, False, False, None)
    torch.testing.assert_close(back, x)
    again = _C.cpu.rotary_fwd(
        x=y, cos=cos, sin=sin, seqlen_offsets=torch.tensor([3, 14]), cu_seqlens=None,
        interleaved=False, conjugate=True, out=None,
    )  # fmt: skip
    torch.testing.assert_close(again, x)


X4 = torch.randn(2, 5, 3, 16)
X3 = torch.randn(9, 3, 16)
COS, SIN = tables(8, 16)
CU = torch.tensor([0, 4, 9], dtype=torch.int32)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(x=X3), ValueError, r"x must be \(batch, seqlen, nheads, headdim\)"),
        (dict(x=X4, cu_seqlens=CU), ValueError, r"x must be \(total_tokens, nheads, headdim\)"),
        (dict(x=X4.int()), TypeError, "x has dtype int32"),
        (dict(x=X4.numpy()), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.randn(2, 5, 3, 32)[..., ::2]), ValueError, "x must be contiguous in its last dimension"),
        # rotary_dim is 2 * cos.shape[1]: an odd head_dim cannot be fully rotated
        (dict(x=torch.randn(2, 5, 3, 15), cos=COS, sin=SIN), ValueError, r"rotary_dim = 2 \* 8 = 16 exceeds"),
        # cos/sin in Hugging Face's (seqlen, headdim) layout
        (dict(cos=tables(8, 32)[0], sin=tables(8, 32)[1]), ValueError, r"rotary_dim = 2 \* 16 = 32 exceeds x's head"),
        (dict(cos=COS[:, :0], sin=SIN[:, :0]), ValueError, "rotary_dim >= 2"),
        (dict(sin=SIN[:, :4]), ValueError, r"sin has shape \(8, 4\) but cos has shape \(8, 8\)"),
        (dict(cos=COS[0], sin=SIN[0]), ValueError, "cos must have 2 dimensions"),
        (dict(cos=COS.double(), sin=SIN.double()), TypeError, "cos has dtype torch.float64"),
        (dict(sin=SIN.half()), TypeError, "sin has dtype"),
        (dict(cos=COS.to("meta"), sin=SIN.to("meta")), ValueError, "cos is on meta but x is on cpu"),
        (dict(seqlen_offsets=4), ValueError, r"reaches position 8 \(seqlen_offsets 4 \+ 5 tokens\).*seqlen_ro = 8"),
        (dict(seqlen_offsets=torch.tensor([0, 4])), ValueError, "sequence 1 reaches position 8.*seqlen_ro = 8"),
        (dict(cos=COS[:4], sin=SIN[:4]), ValueError, "seqlen_offsets 0 \\+ 5 tokens.*seqlen_ro = 4"),
        (dict(seqlen_offsets=-1), ValueError, "seqlen_offsets must be >= 0"),
        (dict(seqlen_offsets=torch.tensor([0, -1])), ValueError, "seqlen_offsets must be >= 0"),
        (dict(seqlen_offsets=torch.tensor([0, 1, 2])), ValueError, r"seqlen_offsets has shape \(3,\); expected"),
        (dict(seqlen_offsets=torch.tensor([[0, 1]])), ValueError, "seqlen_offsets has shape"),
        (dict(seqlen_offsets=torch.tensor([0.0, 1.0])), TypeError, "seqlen_offsets has dtype float32"),
        (dict(seqlen_offsets=1.0), TypeError, "seqlen_offsets must be an int or a tensor"),
        (dict(seqlen_offsets=torch.tensor([0, 1], device="meta")), ValueError, "seqlen_offsets is on meta"),
        (dict(x=X3, cu_seqlens=CU.long()), TypeError, "cu_seqlens has dtype int64"),
        (dict(x=X3, cu_seqlens=CU.tolist()), TypeError, "cu_seqlens must be a torch.Tensor"),
        (dict(x=X3, cu_seqlens=CU[None]), ValueError, "cu_seqlens must have 1 dimensions"),
        (dict(x=X3, cu_seqlens=torch.tensor([0, 6, 4, 9], dtype=torch.int32)), ValueError, "non-decreasing"),
        (dict(x=X3, cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32)), ValueError, "end at x's total_tokens 9"),
        (dict(x=X3, cu_seqlens=torch.tensor([1, 4, 9], dtype=torch.int32)), ValueError, "cu_seqlens must start at 0"),
        (dict(x=X3, cu_seqlens=CU.to("meta")), ValueError, "cu_seqlens is on meta"),
        (dict(x=X3, cu_seqlens=CU, seqlen_offsets=torch.tensor([1])), ValueError, "seqlen_offsets has shape"),
        (dict(x=X3, cu_seqlens=CU, seqlen_offsets=4), ValueError, r"sequence 1 reaches position 8"),
        (dict(max_seqlen=5), ValueError, "max_seqlen is only used with cu_seqlens"),
        (dict(x=X3, cu_seqlens=CU, max_seqlen=-1), ValueError, "max_seqlen must be a non-negative int"),
        (dict(interleaved=1), TypeError, "interleaved must be a bool"),
        (dict(inplace=None), TypeError, "inplace must be a bool"),
    ],
)
@pytest.mark.parametrize("impl", ["cpu", "ref"])
def test_bad_arguments_name_the_argument(kwargs, exc, match, impl):
    args = dict(x=X4, cos=COS, sin=SIN) | kwargs
    with use_backend(impl), pytest.raises(exc, match=match):
        apply_rotary(**args)


def test_torch_compile_fullgraph_forward_backward_and_inplace():
    g = torch.Generator().manual_seed(8)
    qkv = torch.randn(2, 9, 3, 4, 64, generator=g, requires_grad=True)
    cos, sin = tables(16, 64)
    offsets = torch.tensor([0, 7])

    def attn_inputs(qkv, rotary):
        q, k = qkv[:, :, 0] * 1.5, qkv[:, :, 1]
        q = rotary(q, cos, sin, inplace=True, seqlen_offsets=offsets)  # q is a non-leaf: autograd copy_
        k = rotary(k, cos, sin, seqlen_offsets=offsets)
        return (q * k).sum() + math.pi

    def decode(x):
        return apply_rotary(x, cos, sin, inplace=True, seqlen_offsets=offsets)

    with use_backend("cpu"):
        compiled = torch.compile(attn_inputs, fullgraph=True, backend="aot_eager")
        compiled(qkv, apply_rotary).backward()
        x = torch.randn(2, 3, 4, 64, generator=g)
        expected = apply_rotary_ref(x, cos, sin, seqlen_offsets=offsets)
        with torch.no_grad():
            torch.compile(decode, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(x, expected)
    grad = qkv.grad.clone()
    qkv.grad = None
    attn_inputs(qkv, apply_rotary_ref).backward()
    torch.testing.assert_close(grad, qkv.grad, rtol=1e-5, atol=1e-5)
