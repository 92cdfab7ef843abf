import math

import pytest
import torch

from internlm_fast.ops import swiglu, swiglu_packed, swiglu_packed_ref, swiglu_ref, use_backend
from internlm_fast.ops.swiglu import _rows

from .conftest import ATOL, assert_matches_oracle

OP = "swiglu"

# one row, F = 1, odd F, InternLM-7B's 11008, 3-D, empty; few long rows (split over threads)
SHAPES = [(1, 64), (1, 11008), (3, 97), (2, 5, 4095), (5, 11008), (1, 1), (4, 1), (1, 1, 1), (0, 8), (3, 0), (2, 40001)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _run(fn, inputs, dout):
    """Forward and backward of fn; returns (out, grads of inputs)."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    (out * dout).sum().backward()
    return out, [t.grad for t in inputs]


def _check_against_oracle(impl, fn, ref, inputs, dout, dtype):
    with use_backend(impl):
        out, grads = _run(fn, inputs, dout)
    ref_out, ref_grads = _run(ref, inputs, dout)
    out64, grads64 = _run(ref, [t.double() for t in inputs], dout.double())
    assert_matches_oracle("out", out, ref_out, out64, atol=ATOL[dtype])
    for i, (gr, lo, hi) in enumerate(zip(grads, ref_grads, grads64)):
        assert gr is not None, f"grad{i} is missing"
        assert_matches_oracle(f"grad{i}", gr, lo, hi, atol=ATOL[dtype])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_match_oracle(impl_device, shape, dtype):
    impl, device = impl_device
    g = torch.Generator().manual_seed(0)
    # 3 sigma gates: both tails of the sigmoid, not only its middle
    gate = (3 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)
    up = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    dout = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    _check_against_oracle(impl, swiglu, swiglu_ref, [gate, up], dout, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_forward_backward_match_oracle(impl_device, shape, dtype):
    impl, device = impl_device
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(*shape[:-1], 2 * shape[-1], generator=g)).to(device=device, dtype=dtype)
    dout = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    _check_against_oracle(impl, swiglu_packed, swiglu_packed_ref, [x], dout, dtype)
    with use_backend(impl):
        assert swiglu_packed(x).shape == shape


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(2)
    gate = (3 * torch.randn(3, 17, dtype=torch.float64, generator=g)).requires_grad_()
    up = torch.randn(3, 17, dtype=torch.float64, generator=g, requires_grad=True)
    x = (3 * torch.randn(2, 3, 22, dtype=torch.float64, generator=g)).requires_grad_()
    with use_backend("cpu"):
        assert torch.autograd.gradcheck(swiglu, (gate, up))
        assert torch.autograd.gradcheck(swiglu_packed, (x,))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_packed_with_row_strided_input_reads_in_place(dtype):
    """x[..., :2F] of a wider tensor (and the halves of a packed tensor passed to swiglu) reach the
    kernel as row-strided views, not copies; results and gradients still match."""
    g = torch.Generator().manual_seed(3)
    F = 37
    base = torch.randn(2, 3, 2 * F + 10, generator=g).to(dtype)
    x = base[..., 3 : 3 + 2 * F]
    assert not x.is_contiguous()
    x2 = _rows(x)
    assert x2.data_ptr() == x.data_ptr() and x2.stride() == (2 * F + 10, 1)
    dout = torch.randn(2, 3, F, generator=g).to(dtype)
    _check_against_oracle("cpu", swiglu_packed, swiglu_packed_ref, [x], dout, dtype)

    gate, up = base[..., : 2 * F].chunk(2, dim=-1)
    assert _rows(gate).data_ptr() == gate.data_ptr()
    _check_against_oracle("cpu", swiglu, swiglu_ref, [gate, up], dout, dtype)

    # leading dims that do not collapse into rows are copied, still correct
    xt = base[..., : 2 * F].transpose(0, 1)
    _check_against_oracle("cpu", swiglu_packed, swiglu_packed_ref, [xt], dout.transpose(0, 1), dtype)


def test_gradient_reaches_the_base_of_a_view():
    base = torch.randn(4, 50, requires_grad=True)
    with use_backend("cpu"):
        swiglu_packed(base[:, 5:45]).sum().backward()
    expected = torch.zeros(4, 50)
    x = base.detach()[:, 5:45].requires_grad_()
    swiglu_packed_ref(x).sum().backward()
    expected[:, 5:45] = x.grad
    torch.testing.assert_close(base.grad, expected)


def test_forward_saves_only_gate_and_up():
    gate = torch.randn(4, 64, requires_grad=True)
    up = torch.randn(4, 64, requires_grad=True)
    x = torch.randn(4, 128, requires_grad=True)
    saved = []
    with use_backend("cpu"), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu(gate, up)
        assert [t.data_ptr() for t in saved] == [gate.data_ptr(), up.data_ptr()]
        saved.clear()
        swiglu_packed(x)
        assert [(t.data_ptr(), t.shape) for t in saved] == [(x.data_ptr(), x.shape)]


SPECIAL = [-math.inf, math.inf, math.nan, -1e30, 1e30, -100.0, 100.0, -88.5, 88.5, -20.0, 20.0, 0.0, -0.0, 1.0]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_special_values(dtype):
    """silu(-inf) = 0 (not NaN), silu(+inf) = inf, NaN stays NaN; gradients tend to their limits
    (0 at -inf, 1 at +inf); huge finite gates are not thrown off by a clamped exp. 3 rows of 41
    values so both the vector body and the tail of the inner loop see every value."""
    vals = torch.tensor(SPECIAL, dtype=torch.float64)
    gate = vals.repeat(3, 3)[:, :41].to(dtype)
    up = torch.linspace(0.5, 2.0, gate.numel(), dtype=torch.float64).view_as(gate).to(dtype)
    dout = torch.linspace(-2.0, 1.0, gate.numel(), dtype=torch.float64).view_as(gate).to(dtype)
    with use_backend("cpu"):
        out, (dgate, dup) = _run(swiglu, [gate, up], dout)
    g64, u64, d64 = gate.double(), up.double(), dout.double()
    ninf, pinf, nan = g64 == -math.inf, g64 == math.inf, g64.isnan()
    assert (out[ninf] == 0).all() and (dup[ninf] == 0).all() and (dgate[ninf] == 0).all()
    assert (out[pinf] == math.inf).all()
    torch.testing.assert_close(dgate[pinf].double(), (d64 * u64)[pinf], rtol=1e-2, atol=0)
    assert out[nan].isnan().all() and dgate[nan].isnan().all() and dup[nan].isnan().all()
    assert not out[~nan].isnan().any() and not dgate[~nan].isnan().any() and not dup[~nan].isnan().any()
    # everything else, including +-1e30, against the reference (whose gradients are finite too)
    ref_out, (ref_dgate, ref_dup) = _run(swiglu_ref, [gate, up], dout)
    for name, a, b in [("out", out, ref_out), ("dgate", dgate, ref_dgate), ("dup", dup, ref_dup)]:
        torch.testing.assert_close(a, b, equal_nan=True, rtol=2e-2, atol=1e-6, msg=name)
    with use_backend("cpu"):
        packed = swiglu_packed(torch.cat([gate, up], dim=-1))
    torch.testing.assert_close(packed, out, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize(
    "fn, kwargs, exc, match",
    [
        (swiglu, dict(gate=torch.randn(4, 8), up=torch.randn(4, 9)), ValueError, "up has shape"),
        (swiglu, dict(gate=torch.randn(4, 8), up=torch.randn(8)), ValueError, "up has shape"),
        (swiglu, dict(gate=torch.randn(4, 8), up=torch.randn(4, 8).double()), TypeError, "up has dtype"),
        (swiglu, dict(gate=torch.randint(0, 3, (4, 8)), up=torch.randn(4, 8)), TypeError, "gate has dtype int64"),
        (swiglu, dict(gate=torch.randn(4, 8), up=torch.ones(4, 8, dtype=torch.int32)), TypeError, "up has dtype"),
        (swiglu, dict(gate=[1.0], up=torch.randn(1)), TypeError, "gate must be a torch.Tensor"),
        (swiglu, dict(gate=torch.randn(4, 8), up=torch.randn(4, 8, device="meta")), ValueError, "up is on meta"),
        (swiglu, dict(gate=torch.randn(()), up=torch.randn(())), ValueError, "gate must have at least 1"),
        (
            swiglu,
            dict(gate=torch.randn(4, 16)[:, ::2], up=torch.randn(4, 8)),
            ValueError,
            "gate must be contiguous in its last dimension",
        ),
        (
            swiglu,
            dict(gate=torch.randn(4, 8), up=torch.randn(8, 4).t()),
            ValueError,
            "up must be contiguous in its last dimension",
        ),
        (swiglu_packed, dict(x=torch.randn(4, 9)), ValueError, "x's last dimension must be even"),
        (swiglu_packed, dict(x=torch.ones(4, 8, dtype=torch.int32)), TypeError, "x has dtype int32"),
        (swiglu_packed, dict(x="x"), TypeError, "x must be a torch.Tensor"),
        (swiglu_packed, dict(x=torch.randn(4, 32)[:, ::2]), ValueError, "x must be contiguous in its last dimension"),
    ],
)
def test_bad_arguments_name_the_argument(fn, kwargs, exc, match):
    with use_backend("cpu"), pytest.raises(exc, match=match):
        fn(**kwargs)


def test_kernels_check_their_arguments_too():
    """Python checks first; the kernels' own checks are a second line of defence, never a crash."""
    from internlm_fast import _C

    a = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="up must match gate"):
        _C.cpu.swiglu_fwd(a, torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="gate must have unit column stride"):
        _C.cpu.swiglu_fwd(torch.randn(4, 16)[:, ::2], a)
    with pytest.raises(RuntimeError, match="dout must be contiguous"):
        _C.cpu.swiglu_bwd(torch.randn(4, 16)[:, :8], a, a, False)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        _C.cpu.swiglu_fwd(torch.randn(2, 4, 8), torch.randn(2, 4, 8))


def test_results_do_not_depend_on_thread_count():
    g = torch.Generator().manual_seed(4)
    # 3 rows of 40001: too few rows for 2 threads, so each row is split into pieces
    gate, up = torch.randn(1, 3, 40001, generator=g), torch.randn(1, 3, 40001, generator=g)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with use_backend("cpu"):
                outs.append(swiglu(gate, up))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[1], swiglu_ref(gate, up))


def test_torch_compile_fullgraph_forward_and_backward():
    g = torch.Generator().manual_seed(5)
    gate = torch.randn(2, 5, 96, generator=g, requires_grad=True)
    up = torch.randn(2, 5, 96, generator=g, requires_grad=True)
    x = torch.randn(2, 5, 64, generator=g, requires_grad=True)

    def block(gate, up, x):
        return (swiglu(gate, up) * 2).sum() + swiglu_packed(x).sum()

    with use_backend("cpu"):
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        compiled(gate, up, x).backward()
    got = [t.grad.clone() for t in (gate, up, x)]
    for t in (gate, up, x):
        t.grad = None
    ((swiglu_ref(gate, up) * 2).sum() + swiglu_packed_ref(x).sum()).backward()
    for a, t in zip(got, (gate, up, x)):
        torch.testing.assert_close(a, t.grad, rtol=1e-5, atol=1e-6)
