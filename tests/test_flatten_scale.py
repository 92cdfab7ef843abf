"""flatten_scale_: every backend against the pure-torch reference, bit for bit (one rounding of one
product per element), plus the bad-input errors."""

from __future__ import annotations

import pytest
import torch

from internlm_fast.ops import flatten_scale_, flatten_scale_ref, use_backend

OP = "flatten_scale"

# odd sizes, an empty tensor, a 0-d tensor, one large tensor split over threads
SHAPES = [[(3, 5), (7,), (0,), (), (2, 3, 4)], [(100003,)], [(64, 64), (64,), (1,), (40001,), (96, 64)], []]
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]


def _tensors(shapes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(s, generator=g)).to(device=device, dtype=dtype) for s in shapes]


@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: f"{len(s)}tensors")
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda p: f"{p[0]}->{p[1]}".replace("torch.", ""))
@pytest.mark.parametrize("scale", [1.0, 0.5, 1 / 3])
def test_matches_reference_exactly(impl_device, shapes, dtypes, scale):
    impl, device = impl_device
    src, dst = dtypes
    tensors = _tensors(shapes, src, device)
    total = sum(t.numel() for t in tensors)
    pad = 37  # padding after the tensors must be left as it is
    out = torch.full((total + pad,), 7.0, dtype=dst, device=device)
    expected = flatten_scale_ref(out.clone(), tensors, scale)
    with use_backend(impl):
        got = flatten_scale_(out, tensors, scale)
    assert got is out
    assert torch.equal(out, expected)
    assert torch.all(out[total:] == 7.0)
    if tensors and total:
        full = torch.cat([t.reshape(-1).double() for t in tensors]) * scale
        assert torch.allclose(out[:total].double(), full, rtol=1e-2 if dst != torch.float64 else 1e-12)


def test_non_contiguous_inputs_and_non_finite_values(impl_device):
    impl, device = impl_device
    a = torch.arange(12.0, device=device).view(3, 4).t()  # transposed: not contiguous
    b = torch.tensor([float("nan"), float("inf"), -float("inf")], device=device)
    out = torch.zeros(15, device=device)
    with use_backend(impl):
        flatten_scale_(out, [a, b], 2.0)
    assert torch.equal(out[:12], 2 * a.reshape(-1))
    assert out[12].isnan() and out[13] == float("inf") and out[14] == -float("inf")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.zeros(3), [torch.ones(4)], 1.0), "out holds 3 elements"),
        (lambda: (torch.zeros(2, 4), [torch.ones(4)], 1.0), "out must have 1 dimensions"),
        (lambda: (torch.zeros(8)[::2], [torch.ones(4)], 1.0), "out must be contiguous"),
        (
            lambda: (torch.zeros(8), [torch.ones(2), torch.ones(2, dtype=torch.float64)], 1.0),
            "tensors\\[1\\] has dtype",
        ),
        (lambda: (torch.zeros(8, dtype=torch.bfloat16), [torch.ones(2)], 1.0), "out has dtype"),
        (lambda: (torch.zeros(8), torch.ones(2), 1.0), "tensors must be a list"),
        (lambda: (torch.zeros(8), [torch.ones(2, dtype=torch.int64)], 1.0), "tensors\\[0\\] has dtype int64"),
        (lambda: (torch.zeros(8), [torch.ones(2)], float("nan")), "scale must be finite"),
        (lambda: (torch.zeros(8, requires_grad=True), [torch.ones(2)], 1.0), "out must not require grad"),
    ],
)
def test_bad_input_names_the_argument(make, match):
    out, tensors, scale = make()
    with pytest.raises((TypeError, ValueError), match=match):
        flatten_scale_(out, tensors, scale)


def test_native_kernel_is_faster_than_a_python_loop():
    """The reason the op exists: one call per bucket instead of a copy per parameter."""
    import time

    tensors = _tensors([(64,)] * 2000, torch.float32, "cpu")
    out = torch.empty(64 * 2000)

    def best(fn, reps=5):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    native = best(lambda: flatten_scale_(out, tensors, 0.5))
    loop = best(lambda: flatten_scale_ref(out, tensors, 0.5))
    assert native < loop, (native, loop)
