"""few_rows_linear_int8 (the decode GEMM on int8 weight panels, a scale per 64 inputs) against the
fp64 oracle of the same quantized weights and unrounded x, on every vector path this CPU runs;
quantize_int8's error against the float weights, int8_activations' against x."""

from __future__ import annotations

import pytest
import torch

from internlm_fast.ops import available
from internlm_fast.ops.inference import (
    INT8_GROUP,
    InferenceKernels,
    dequantize_int8,
    few_rows_linear_int8_ref,
    int8_activations,
    quantize_int8,
)

from .conftest import ATOL, assert_matches_oracle
from .isa_helpers import distinct_levels, forced_isa

OP = "few_rows_linear_int8"
pytestmark = pytest.mark.skipif(not available("cpu"), reason="the cpu backend is not built")


def _expanded_scales(scales: torch.Tensor, k: int) -> torch.Tensor:
    blocks, _, cols = scales.shape
    return scales.transpose(1, 2).reshape(blocks * cols, -1).repeat_interleave(INT8_GROUP, dim=1)[:, :k]


@pytest.mark.parametrize("level", distinct_levels("few_rows_linear_int8"))
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 16])
@pytest.mark.parametrize(("k", "n"), [(256, 768), (37, 80), (64, 16), (130, 144), (1000, 48), (4100, 32)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["x_fp32", "x_bf16"])
def test_matches_the_oracle(level, rows, k, n, with_bias, dtype):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k, generator=g).to(dtype)
    panels, scales = quantize_int8(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    kern = InferenceKernels(x)
    assert kern.has_few_rows_linear_int8()
    with forced_isa(level):
        got = kern.few_rows_linear_int8(x, panels, scales, bias)
    oracle = x.double() @ dequantize_int8(panels, scales, k).double().t()
    if bias is not None:
        oracle = oracle + bias.double()
    want = few_rows_linear_int8_ref(x, panels, scales, bias)
    assert_matches_oracle(f"{level} {rows}x{k}x{n}", got, want, oracle, ATOL[dtype])


@pytest.mark.parametrize(("n", "k"), [(32, 64), (48, 37), (16, 200)])
def test_quantization_error_is_half_a_step(n, k):
    weight = torch.randn(n, k) * torch.logspace(-3, 1, k)  # groups of very different sizes
    weight[3, : min(k, INT8_GROUP)] = 0  # an all-zero group
    panels, scales = quantize_int8(weight)
    assert panels.dtype == torch.int8 and panels.shape == (n // 16, (k + 1) // 2, 32)
    assert scales.dtype == torch.float32 and scales.shape == (n // 16, -(-k // INT8_GROUP), 16)
    assert panels.abs().max() <= 127
    step = _expanded_scales(scales, k)
    err = (dequantize_int8(panels, scales, k) - weight).abs()
    assert (err <= step * (0.5 + 1e-5)).all()
    assert (dequantize_int8(panels, scales, k)[3, : min(k, INT8_GROUP)] == 0).all()
    # each group's largest weight is exact: scale = absmax / 127 and q = +-127
    groups = -(-k // INT8_GROUP)
    w = torch.nn.functional.pad(weight, (0, groups * INT8_GROUP - k)).view(n, groups, INT8_GROUP)
    torch.testing.assert_close(_expanded_scales(scales, k)[:, ::INT8_GROUP], w.abs().amax(-1) / 127)


def test_refuses_what_it_cannot_serve():
    kern = InferenceKernels(torch.zeros(1))
    with pytest.raises(ValueError, match="whole panels"):
        quantize_int8(torch.zeros(24, 8))
    panels, scales = quantize_int8(torch.randn(32, 80))
    with pytest.raises(RuntimeError, match="agree on K"):
        kern.few_rows_linear_int8(torch.zeros(2, 78), panels, scales, None)
    with pytest.raises(RuntimeError, match="scales"):
        kern.few_rows_linear_int8(torch.zeros(2, 80), panels, scales[:, :1].contiguous(), None)
    with pytest.raises(RuntimeError, match="int8"):
        kern.few_rows_linear_int8(torch.zeros(2, 80), panels.float(), scales, None)
    with pytest.raises(RuntimeError, match="bias"):
        kern.few_rows_linear_int8(torch.zeros(2, 80), panels, scales, torch.zeros(31))


def test_activations_are_rounded_to_half_a_16_bit_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 200, generator=g) * torch.logspace(-4, 2, 200)  # groups of very different sizes
    x[1, :INT8_GROUP] = 0  # an all-zero group
    got = int8_activations(x)
    groups = -(-200 // INT8_GROUP)
    xg = torch.nn.functional.pad(x, (0, groups * INT8_GROUP - 200)).view(3, groups, INT8_GROUP)
    step = (xg.abs().amax(-1, keepdim=True) / 32767).expand_as(xg).reshape(3, -1)[:, :200]
    assert ((got - x).abs() <= step / 2 + x.abs() * 2**-23).all()  # half a step, and fp32's rounding of q * step
    assert (got[1, :INT8_GROUP] == 0).all()
    assert int8_activations(x.to(torch.bfloat16)).dtype == torch.float32


@pytest.mark.parametrize("level", distinct_levels("few_rows_linear_int8"))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_input_reaches_the_outputs(level, bad):
    """A group of x holding inf or NaN makes every output it touches NaN, never a finite number."""
    panels, scales = quantize_int8(torch.randn(32, 200))
    x = torch.randn(2, 200)
    x[1, 70] = bad
    with forced_isa(level):
        got = InferenceKernels(x).few_rows_linear_int8(x, panels, scales, None)
    assert got[0].isfinite().all() and got[1].isnan().all()
    assert few_rows_linear_int8_ref(x, panels, scales, None)[1].isnan().all()
