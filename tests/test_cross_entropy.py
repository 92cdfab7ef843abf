import pytest
import torch

from internlm_fast.ops import (
    backend,
    cross_entropy,
    cross_entropy_ref,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
    use_backend,
)
from internlm_fast.ops.cross_entropy import CHUNK_ENV_VAR
from internlm_fast.ops.linear import use_bf16_gemm

from .conftest import ATOL, assert_matches_oracle

OP = "cross_entropy"

IGNORE = -100


def make_labels(shape, vocab, g, ignore_every=5):
    labels = torch.randint(0, vocab, shape, generator=g)
    flat = labels.view(-1)
    flat[::ignore_every] = IGNORE  # the first token is always ignored: covers row 0 of every shape
    return labels


def loss_atol(dtype, labels, reduction):
    # a sum adds one rounding error per token, so its absolute tolerance grows with the tokens
    n = int((labels != IGNORE).sum()) if reduction == "sum" else 1
    return ATOL[dtype] * max(n, 1)


# ---------------------------------------------------------------- cross_entropy

CE_SHAPES = [(1, 1), (1023, 1), (1, 97), (1023, 97), (3, 7, 97), (1, 32000), (33, 32000)]


@pytest.mark.parametrize("shape", CE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_matches_oracle(impl_device, shape, dtype, reduction):
    impl, device = impl_device
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)
    labels = make_labels(shape[:-1], shape[-1], g, ignore_every=5 if shape[0] > 1 else 10**9).to(device)

    def run(x, fn):
        x = x.detach().requires_grad_()
        loss = fn(x, labels, IGNORE, reduction)
        (loss * 1.5).backward()  # an incoming gradient other than 1
        return loss, x.grad

    with use_backend(impl):
        loss, grad = run(logits, cross_entropy)
    ref_loss, ref_grad = run(logits, cross_entropy_ref)
    loss64, grad64 = run(logits.double(), cross_entropy_ref)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_matches_oracle("loss", loss, ref_loss, loss64, atol=loss_atol(dtype, labels, reduction))
    assert_matches_oracle("dlogits", grad, ref_grad, grad64, atol=ATOL[dtype])


def test_cross_entropy_fp64_and_gradcheck(impl_device):
    impl, device = impl_device
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 11, dtype=torch.float64, generator=g).to(device).requires_grad_()
    labels = torch.tensor([3, IGNORE, 0, 10, 5, 5], device=device)
    with use_backend(impl):
        loss = cross_entropy(x, labels)
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, cross_entropy_ref(x, labels), rtol=1e-12, atol=1e-12)
        for reduction in ("mean", "sum"):
            fn = lambda x, r=reduction: cross_entropy(x, labels, reduction=r)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (x,), fast_mode=impl == "triton")


def test_cross_entropy_row_that_starts_masked_and_ignore_index_choice(impl_device, monkeypatch):
    impl, device = impl_device
    x = torch.randn(4, 50)
    x[0, :20] = float("-inf")  # masked logits, as from a vocabulary restriction (a whole first block)
    x[1, 16:] = float("-inf")  # a whole masked vocabulary block once Triton's block is shrunk below
    x, labels = x.to(device), torch.tensor([20, 7, 0, 49], device=device)
    if impl == "triton":
        import internlm_fast.triton_kernels.cross_entropy as mod

        monkeypatch.setattr(mod, "MAX_BLOCK_V", 16)  # 4 blocks per row: the online max across blocks
    with use_backend(impl):
        torch.testing.assert_close(cross_entropy(x, labels), cross_entropy_ref(x, labels))
        # ignore_index is a real vocabulary id here: rows labelled 7 are skipped
        torch.testing.assert_close(
            cross_entropy(x, labels, ignore_index=7), cross_entropy_ref(x, labels, ignore_index=7)
        )
        assert cross_entropy(x, labels, ignore_index=7) != cross_entropy(x, labels)


# ---------------------------------------------------------------- fused_linear_cross_entropy

# (token shape, hidden, vocab)
FLCE_SHAPES = [((1,), 16, 1), ((1023,), 64, 97), ((2, 37), 48, 1001), ((40,), 32, 32000)]


@pytest.mark.parametrize("shape", FLCE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [None, 29])
def test_fused_matches_oracle(impl_device, shape, dtype, reduction, chunk_size):
    _check_fused(*impl_device, shape, dtype, reduction, chunk_size)


@pytest.mark.skipif(not backend.available("cpu"), reason="the cpu backend is not built")
@pytest.mark.parametrize("shape", FLCE_SHAPES, ids=str)
@pytest.mark.parametrize("route", ["widen", "native"])
def test_fused_bf16_on_either_gemm_route(shape, route):
    """bf16 GEMMs widened to fp32 (the default where the CPU lacks AVX-512) or ATen's own."""
    with use_bf16_gemm(route):
        _check_fused("cpu", "cpu", shape, torch.bfloat16, "mean", 29)


def _check_fused(impl, device, shape, dtype, reduction, chunk_size):
    tokens, H, V = shape
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(*tokens, H, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(device=device, dtype=dtype)
    labels = make_labels(tokens, V, g, ignore_every=4 if tokens[-1] > 1 else 10**9).to(device)

    def run(h, w, fn, **kw):
        h = h.detach().requires_grad_()
        w = w.detach().requires_grad_()
        loss = fn(h, w, labels, IGNORE, reduction, **kw)
        (loss * 0.75).backward()
        return loss, h.grad, w.grad

    with use_backend(impl):
        out = run(hidden, weight, fused_linear_cross_entropy, chunk_size=chunk_size)
    ref = run(hidden, weight, fused_linear_cross_entropy_ref)
    ref64 = run(hidden.double(), weight.double(), fused_linear_cross_entropy_ref)
    assert out[0].dtype == torch.float32 and out[1].dtype == dtype and out[2].dtype == dtype
    rows = labels.numel()
    atols = [loss_atol(dtype, labels, reduction), ATOL[dtype], ATOL[dtype] * rows]  # dweight sums rows
    for name, o, lo, hi, atol in zip(("loss", "dhidden", "dweight"), out, ref, ref64, atols):
        assert_matches_oracle(name, o, lo, hi, atol=atol)


def test_fused_chunking_does_not_change_the_result(impl_device, monkeypatch):
    impl, device = impl_device
    g = torch.Generator().manual_seed(3)
    h = torch.randn(50, 24, dtype=torch.float64, generator=g).to(device)
    w = torch.randn(33, 24, dtype=torch.float64, generator=g).to(device)
    labels = make_labels((50,), 33, g, ignore_every=3).to(device)

    def run(**kw):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fused_linear_cross_entropy(hh, ww, labels, **kw)
        loss.backward()
        return loss, hh.grad, ww.grad

    with use_backend(impl):
        whole = run(chunk_size=1000)
        for chunk in (1, 4, 7, 32):
            for a, b in zip(whole, run(chunk_size=chunk)):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
        monkeypatch.setenv(CHUNK_ENV_VAR, "5")
        for a, b in zip(whole, run()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_fused_gradcheck_fp64_several_chunks(impl_device):
    impl, device = impl_device
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 5, 6, dtype=torch.float64, generator=g).to(device).requires_grad_()
    w = torch.randn(9, 6, dtype=torch.float64, generator=g).to(device).requires_grad_()
    labels = torch.tensor([[1, IGNORE, 8, 0, 3], [3, 3, IGNORE, 7, 2]], device=device)
    with use_backend(impl):
        for reduction in ("mean", "sum"):
            fn = lambda h, w, r=reduction: fused_linear_cross_entropy(h, w, labels, reduction=r, chunk_size=3)  # noqa: E731
            # the interpreter runs ~4 launches per evaluation: one random direction, not every input
            assert torch.autograd.gradcheck(fn, (h, w), fast_mode=impl == "triton")


def test_fused_gradient_only_where_asked_and_no_grad_forward(impl_device):
    impl, device = impl_device
    g = torch.Generator().manual_seed(5)
    h = torch.randn(20, 16, generator=g).to(device).requires_grad_()
    w = torch.randn(30, 16, generator=g).to(device)  # frozen lm_head
    labels = make_labels((20,), 30, g).to(device)
    with use_backend(impl):
        fused_linear_cross_entropy(h, w, labels, chunk_size=6).backward()
        with torch.no_grad():
            loss = fused_linear_cross_entropy(h, w, labels)
    h2 = h.detach().requires_grad_()
    ref = fused_linear_cross_entropy_ref(h2, w, labels)
    ref.backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert w.grad is None and not loss.requires_grad


@pytest.mark.parametrize("dloss", [1.0, 3.0])  # 1.0 returns the saved gradients unscaled
def test_fused_backward_twice_with_retain_graph_does_not_rescale_saved_gradients(impl_device, dloss):
    impl, device = impl_device
    g = torch.Generator().manual_seed(6)
    h = torch.randn(10, 8, generator=g).to(device).requires_grad_()
    w = torch.randn(12, 8, generator=g).to(device).requires_grad_()
    labels = make_labels((10,), 12, g).to(device)
    with use_backend(impl):
        loss = fused_linear_cross_entropy(h, w, labels)
        loss.backward(torch.tensor(dloss, device=device), retain_graph=True)
        loss.backward(torch.tensor(dloss, device=device), retain_graph=True)
    h2, w2 = h.detach().requires_grad_(), w.detach().requires_grad_()
    (2 * dloss * fused_linear_cross_entropy_ref(h2, w2, labels)).backward()
    if dloss == 1.0 and device == "cpu":  # a unit dloss is recognised only on the CPU (no sync)
        # .grad is then the very buffer the graph saved: an in-place change to it before another
        # backward through the retained graph is refused by autograd, never silently wrong
        h.grad.mul_(0.5)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
        h.grad.mul_(2.0)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- both ops: edge cases


def both_ops(x, labels, **kw):
    """(cross_entropy(x), fused(x, I)): the identity lm_head makes the fused op see x as logits."""
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return cross_entropy(x, labels, **kw), fused_linear_cross_entropy(x, eye, labels, **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored_gives_zero_loss_and_zero_gradient(impl_device, reduction):
    impl, device = impl_device
    x = torch.randn(6, 13, device=device, requires_grad=True)
    labels = torch.full((6,), IGNORE, device=device)
    with use_backend(impl):
        for loss in both_ops(x, labels, reduction=reduction):
            assert loss.item() == 0.0
            x.grad = None
            loss.backward()
            assert torch.equal(x.grad, torch.zeros_like(x))
    assert cross_entropy_ref(x, labels, reduction=reduction).item() == 0.0


def test_nan_logits_give_nan_loss(impl_device):
    impl, device = impl_device
    x = torch.randn(5, 40, device=device)
    x[2, 17] = float("nan")
    labels = torch.tensor([1, 2, 3, 4, 5], device=device)
    with use_backend(impl):
        for loss in both_ops(x, labels):
            assert torch.isnan(loss)
        for loss in both_ops(x, labels, reduction="sum"):
            assert torch.isnan(loss)
        # a NaN in an ignored row is never read
        labels[2] = IGNORE
        for loss in both_ops(x, labels):
            assert torch.isfinite(loss)


@pytest.mark.parametrize("bad", [-1, 13, 10**6])
def test_labels_out_of_range_raise(impl_device, bad):
    impl, device = impl_device
    x = torch.randn(4, 13, device=device)
    labels = torch.tensor([0, bad, 12, IGNORE], device=device)
    for backend_name in (impl, "ref"):
        with use_backend(backend_name):
            with pytest.raises(ValueError, match="labels must lie in"):
                cross_entropy(x, labels)
            with pytest.raises(ValueError, match="labels must lie in"):
                fused_linear_cross_entropy(x, torch.eye(13, device=device), labels)


def test_kernels_refuse_bad_labels_themselves(impl_device):
    """Second line of defence: the kernels check too (they must never index out of a row)."""
    impl, device = impl_device
    k = backend.kernels(impl)
    x, labels = torch.randn(3, 5, device=device), torch.tensor([0, 5, 1], device=device)
    with pytest.raises(ValueError, match="labels"):
        k.cross_entropy_fwd(x, labels, IGNORE, "mean")
    with pytest.raises(ValueError, match="labels"):
        k.cross_entropy_bwd(torch.ones((), device=device), x, labels, torch.zeros(3, device=device), IGNORE, "mean")
    with pytest.raises(ValueError, match="labels"):
        k.fused_linear_cross_entropy_fwd(x, torch.eye(5, device=device), labels, IGNORE, "mean", 0, True, True)


X8, L4 = torch.randn(4, 8), torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(logits=X8, labels=L4.int()), TypeError, "labels has dtype int32"),
        (dict(logits=X8, labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels has shape"),
        (dict(logits=X8, labels=L4[:, None]), ValueError, "labels has shape"),
        (dict(logits=X8.long(), labels=L4), TypeError, "logits has dtype"),
        (dict(logits=[1.0], labels=L4[:1]), TypeError, "logits must be a torch.Tensor"),
        (dict(logits=X8, labels=L4.to("meta")), ValueError, "labels is on meta"),
        (dict(logits=torch.randn(4, 0), labels=L4), ValueError, "logits has an empty"),
        (dict(logits=X8, labels=L4, reduction="none"), ValueError, "reduction must be"),
        (dict(logits=X8, labels=L4, ignore_index=1.0), TypeError, "ignore_index must be an int"),
        (dict(logits=torch.randn(4, 16)[:, ::2], labels=L4), ValueError, "logits must be contiguous"),
    ],
)
def test_cross_entropy_bad_arguments_name_the_argument(kwargs, exc, match):
    with use_backend("cpu"), pytest.raises(exc, match=match):
        cross_entropy(**kwargs)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(hidden=X8, weight=torch.randn(10, 7), labels=L4), ValueError, "weight has shape"),
        (dict(hidden=X8, weight=torch.randn(8), labels=L4), ValueError, "weight must have 2 dimensions"),
        (dict(hidden=X8, weight=torch.randn(0, 8), labels=L4), ValueError, "weight has an empty"),
        (dict(hidden=X8, weight=torch.randn(10, 8, dtype=torch.float64), labels=L4), TypeError, "weight has dtype"),
        (dict(hidden=X8, weight=torch.randn(10, 8, device="meta"), labels=L4), ValueError, "weight is on meta"),
        (dict(hidden=X8, weight=torch.randn(10, 8), labels=L4.int()), TypeError, "labels has dtype int32"),
        (dict(hidden=X8, weight=torch.randn(10, 8), labels=L4[:3]), ValueError, "labels has shape"),
        (dict(hidden=X8.long(), weight=torch.randn(10, 8), labels=L4), TypeError, "hidden has dtype"),
        (dict(hidden=X8, weight=torch.randn(10, 8), labels=L4, chunk_size=0), ValueError, "chunk_size must be > 0"),
        (dict(hidden=X8, weight=torch.randn(10, 8), labels=L4, chunk_size=2.0), TypeError, "chunk_size must be an"),
        (dict(hidden=X8, weight=torch.randn(10, 8), labels=L4, reduction="mean "), ValueError, "reduction must be"),
    ],
)
def test_fused_bad_arguments_name_the_argument(kwargs, exc, match):
    with use_backend("cpu"), pytest.raises(exc, match=match):
        fused_linear_cross_entropy(**kwargs)


def test_torch_compile_fullgraph_forward_and_backward(impl_device):
    impl, device = impl_device
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 9, 50, generator=g).to(device).requires_grad_()
    h = torch.randn(2, 9, 16, generator=g).to(device).requires_grad_()
    w = torch.randn(50, 16, generator=g).to(device).requires_grad_()
    labels = make_labels((2, 9), 50, g).to(device)

    def step(ce, flce, logits, h, w):
        return ce(logits, labels) + 0.5 * flce(h, w, labels, reduction="sum")

    with use_backend(impl):
        compiled = torch.compile(
            lambda *a: step(cross_entropy, fused_linear_cross_entropy, *a), fullgraph=True, backend="aot_eager"
        )
        loss = compiled(logits, h, w)
        loss.backward()
    grads = [t.grad.clone() for t in (logits, h, w)]
    for t in (logits, h, w):
        t.grad = None
    ref = step(cross_entropy_ref, fused_linear_cross_entropy_ref, logits, h, w)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for got, t in zip(grads, (logits, h, w)):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-5)
