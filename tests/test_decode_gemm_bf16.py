"""few_rows_linear_bf16 (the decode GEMM on bf16 weight panels) against the fp64 oracle, on every
vector path this CPU runs, and the projections' use of it in a bf16 model's decode steps."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from internlm_fast.model.projection import Projection
from internlm_fast.ops import available
from internlm_fast.ops.inference import (
    InferenceKernels,
    few_rows_linear_bf16_panels,
    few_rows_linear_bf16_ref,
    unpair_panels,
)

from .conftest import ATOL, assert_matches_oracle
from .isa_helpers import distinct_levels, forced_isa

OP = "few_rows_linear_bf16"
pytestmark = pytest.mark.skipif(not available("cpu"), reason="the cpu backend is not built")


def _case(rows: int, k: int, n: int, with_bias: bool, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    weight = torch.randn(n, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    return x, weight, bias


def _oracle(x, weight, bias):
    y = x.double() @ weight.double().t()
    return y if bias is None else y + bias.double()


def _lowp(x, weight, bias):
    """The same product in x's precision: fp32 accumulation for fp32 x, torch's bf16 GEMM for bf16 x."""
    return few_rows_linear_bf16_ref(x, weight, bias) if x.dtype == torch.float32 else F.linear(x, weight, bias)


@pytest.mark.parametrize("level", distinct_levels())
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 16])
@pytest.mark.parametrize(("k", "n"), [(256, 768), (37, 80), (1, 16), (130, 144), (515, 48), (4099, 32)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["x_fp32", "x_bf16"])
def test_matches_the_oracle(level, rows, k, n, with_bias, dtype):
    x, weight, bias = _case(rows, k, n, with_bias, dtype, seed=rows * 1000 + k + n)
    kern = InferenceKernels(x)
    assert kern.has_few_rows_linear_bf16(weight)
    panels = few_rows_linear_bf16_panels(weight)
    with forced_isa(level):
        got = kern.few_rows_linear_bf16(x, panels, bias)
    assert_matches_oracle(f"{level} {rows}x{k}x{n}", got, _lowp(x, weight, bias), _oracle(x, weight, bias), ATOL[dtype])


def test_reference_matches_the_oracle():
    x, weight, bias = _case(3, 37, 80, True, torch.float32, seed=1)
    got = few_rows_linear_bf16_ref(x, weight, bias)
    torch.testing.assert_close(got.double(), _oracle(x, weight, bias), rtol=1e-5, atol=1e-4)


def test_layout():
    # 6 panels: a group of 4 and a last group of 2; 5 inputs: 3 pairs, the last padded
    weight = torch.randn(96, 5).to(torch.bfloat16)
    panels = few_rows_linear_bf16_panels(weight)
    assert panels.shape == (6, 3, 32) and panels.dtype == torch.bfloat16 and panels.is_contiguous()
    lines = panels.view(-1, 32)

    def line(p: int, j: int) -> torch.Tensor:
        first, size = (0, 4) if p < 4 else (4, 2)
        return lines[first * 3 + j * size + p - first]

    for p, j, c, t in [(0, 0, 0, 0), (0, 0, 0, 1), (1, 1, 7, 1), (3, 2, 15, 0), (4, 0, 3, 1), (5, 2, 9, 0)]:
        assert line(p, j)[2 * c + t] == weight[16 * p + c, 2 * j + t]
    assert all((line(p, 2)[1::2] == 0).all() for p in range(6))  # the pad past an odd in
    assert torch.equal(unpair_panels(panels, 5), weight)


def test_refuses_what_it_cannot_serve():
    kern = InferenceKernels(torch.zeros(1))
    assert not kern.has_few_rows_linear_bf16(torch.zeros(24, 8, dtype=torch.bfloat16))  # not whole panels
    assert not kern.has_few_rows_linear_bf16(torch.zeros(32, 8))  # fp32: few_rows_linear's
    with pytest.raises(ValueError, match="whole panels"):
        few_rows_linear_bf16_panels(torch.zeros(24, 8))
    panels = few_rows_linear_bf16_panels(torch.zeros(32, 8))
    with pytest.raises(RuntimeError, match="agree on K"):
        kern.few_rows_linear_bf16(torch.zeros(2, 5), panels, None)
    with pytest.raises(RuntimeError, match="bias"):
        kern.few_rows_linear_bf16(torch.zeros(2, 8), panels, torch.zeros(32, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        kern.few_rows_linear_bf16(torch.zeros(2, 8, dtype=torch.float64), panels, None)
    with pytest.raises(RuntimeError, match="bf16"):
        kern.few_rows_linear_bf16(torch.zeros(2, 8), panels.float(), None)


@pytest.mark.parametrize("copy", [True, False], ids=["small_model", "big_model"])
def test_projection_decodes_through_the_bf16_panels(copy):
    torch.manual_seed(0)
    linears = [nn.Linear(48, n, bias=True).to(torch.bfloat16) for n in (64, 32)]
    proj = Projection(*linears)
    kern = InferenceKernels(linears[0].weight)
    ctx = SimpleNamespace(cache=object(), cu_seqlens=None, kernels=kern, copy_weights=copy)
    weight = torch.cat([lin.weight for lin in linears]).detach()
    bias = torch.cat([lin.bias for lin in linears]).detach()
    with torch.inference_mode():
        prefill = torch.randn(20, 48).to(torch.bfloat16)
        ctx.cu_seqlens = torch.tensor([0, 20], dtype=torch.int32)
        proj(prefill, ctx)  # a prefill makes the copies
        ctx.cu_seqlens = None
        wt, _, panels, few_rows, _ = proj._copies
        assert (wt is not None) == copy  # past MAX_COPY_BYTES no (in, out) copy, the panels only
        assert panels.dtype == torch.bfloat16 and few_rows == kern.few_rows_linear_bf16
        x = torch.randn(3, 48).to(torch.bfloat16)
        got = proj(x, ctx)
    assert_matches_oracle("decode step", got, F.linear(x, weight, bias), _oracle(x, weight, bias), ATOL[torch.bfloat16])
