import pytest
import torch

from internlm_fast.ops import rms_norm, rms_norm_ref, use_backend

from .conftest import ATOL, assert_matches_oracle

OP = "rms_norm"

SHAPES = [(1, 64), (3, 97), (2, 5, 4095), (7, 11008), (1, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_forward_backward_match_oracle(impl_device, shape, dtype, with_residual):
    impl, device = impl_device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(device=device, dtype=dtype)
    res = torch.randn(shape, generator=g).to(device=device, dtype=dtype) if with_residual else None
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    dres = torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    def run(x, w, res, fn):
        x = x.detach().requires_grad_()
        w = w.detach().requires_grad_()
        r = res.detach().requires_grad_() if res is not None else None
        out = fn(x, w, 1e-6, r)
        loss = (out[0] * dy).sum() + (out[1] * dres).sum() if r is not None else (out * dy).sum()
        loss.backward()
        outs = out if r is not None else (out,)
        grads = (x.grad, w.grad) + ((r.grad,) if r is not None else ())
        return outs, grads

    with use_backend(impl):
        outs, grads = run(x, w, res, rms_norm)
    ref_outs, ref_grads = run(x, w, res, rms_norm_ref)
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    o64, g64 = run(d(x), d(w), d(res), rms_norm_ref)
    for i, (o, lo, hi) in enumerate(zip(outs, ref_outs, o64)):
        assert_matches_oracle(f"out{i}", o, lo, hi, atol=ATOL[dtype])
    for i, (gr, lo, hi) in enumerate(zip(grads, ref_grads, g64)):
        # dweight sums over every row: its reference error grows with rows, so scale atol with them
        atol = ATOL[dtype] * (x.numel() // shape[-1] if i == 1 else 1)
        assert_matches_oracle(f"grad{i}", gr, lo, hi, atol=atol)


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 17, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(17, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(3, 17, dtype=torch.float64, generator=g, requires_grad=True)
    with use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-5), (x, w))
        assert torch.autograd.gradcheck(lambda x, w, r: rms_norm(x, w, 1e-5, residual=r), (x, w, r))


def test_weight_dtype_may_differ_from_x():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.float32)
    with use_backend("cpu"):
        y = rms_norm(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, rms_norm_ref(x, w), atol=1e-2, rtol=1e-2)


def test_row_strided_input_is_accepted_element_strided_is_refused():
    base = torch.randn(8, 128)
    w = torch.ones(64)
    with use_backend("cpu"):
        torch.testing.assert_close(rms_norm(base[:, :64], w), rms_norm_ref(base[:, :64], w))
        with pytest.raises(ValueError, match="x must be contiguous in its last dimension"):
            rms_norm(base[:, ::2], w)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(x=torch.randn(4, 8), weight=torch.randn(7)), ValueError, "weight has 7 elements"),
        (dict(x=torch.randn(4, 8), weight=torch.randn(8, 1)), ValueError, "weight must have 1 dimensions"),
        (dict(x=torch.randint(0, 3, (4, 8)), weight=torch.randn(8)), TypeError, "x has dtype int64"),
        (dict(x=[1.0], weight=torch.randn(8)), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.randn(4, 8), weight=torch.randn(8), eps=0.0), ValueError, "eps must be > 0"),
        (dict(x=torch.randn(4, 8), weight=torch.randn(8), eps=float("nan")), ValueError, "eps must be finite"),
        (
            dict(x=torch.randn(4, 8), weight=torch.randn(8), residual=torch.randn(4, 9)),
            ValueError,
            "residual has shape",
        ),
        (
            dict(x=torch.randn(4, 8), weight=torch.randn(8), residual=torch.randn(4, 8, dtype=torch.float64)),
            TypeError,
            "residual has dtype",
        ),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, exc, match):
    with use_backend("cpu"), pytest.raises(exc, match=match):
        rms_norm(**kwargs)


def test_nan_propagates():
    x = torch.randn(2, 16)
    x[1, 3] = float("nan")
    with use_backend("cpu"):
        y = rms_norm(x, torch.ones(16))
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all()


def test_torch_compile_fullgraph_forward_and_backward():
    x = torch.randn(5, 96, requires_grad=True)
    w = torch.randn(96, requires_grad=True)
    r = torch.randn(5, 96)

    def block(x, w, r):
        y, s = rms_norm(x, w, 1e-6, residual=r)
        return (y * 2).sum() + s.sum()

    with use_backend("cpu"):
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        compiled(x, w, r).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    block_ref = lambda x, w, r: (lambda y, s: (y * 2).sum() + s.sum())(*rms_norm_ref(x, w, 1e-6, r))  # noqa: E731
    block_ref(x, w, r).backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-5)
