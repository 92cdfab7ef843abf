"""few_rows_linear (the decode GEMM on column panels) against its reference, few_rows_linear_ref (addmm)."""

from __future__ import annotations

import pytest
import torch

from internlm_fast.ops import available
from internlm_fast.ops.inference import InferenceKernels, few_rows_linear_ref

from .isa_helpers import each_isa  # noqa: F401  (the fixture, used by pytestmark)

# every test once per instruction set of the kernels
pytestmark = [
    pytest.mark.skipif(not available("cpu"), reason="the cpu backend is not built"),
    pytest.mark.usefixtures("each_isa"),
]


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 16])
@pytest.mark.parametrize(("k", "n"), [(256, 768), (688, 256), (64, 16), (3, 48), (37, 80)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_addmm(rows, k, n, with_bias):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x, wt = torch.randn(rows, k, generator=g), torch.randn(k, n, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    kern = InferenceKernels(x)
    assert kern.has_few_rows_linear(wt)
    got = kern.few_rows_linear(x, kern.column_panels(wt), bias)
    want = few_rows_linear_ref(x, wt, bias)
    # fp32 sums of k products in another order: a few ulps of the largest partial sum
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * k**0.5)


def test_refuses_what_it_cannot_serve():
    kern = InferenceKernels(torch.zeros(1))
    assert not kern.has_few_rows_linear(torch.zeros(8, 24))  # 24 columns: not whole panels of 16
    assert not kern.has_few_rows_linear(torch.zeros(8, 32, dtype=torch.bfloat16))
    panels = kern.column_panels(torch.zeros(8, 32))
    with pytest.raises(RuntimeError, match="agree on K"):
        kern.few_rows_linear(torch.zeros(2, 7), panels, None)
    with pytest.raises(RuntimeError, match="bias"):
        kern.few_rows_linear(torch.zeros(2, 8), panels, torch.zeros(31))
