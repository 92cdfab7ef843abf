"""argmax_rows (greedy decoding's token choice) against its reference, argmax_rows_ref (torch.argmax)."""

from __future__ import annotations

import pytest
import torch

from internlm_fast.ops import available
from internlm_fast.ops.inference import InferenceKernels, argmax_rows_ref

from .isa_helpers import each_isa  # noqa: F401  (the fixture, used by pytestmark)

# every test once per instruction set of the kernels
pytestmark = [
    pytest.mark.skipif(not available("cpu"), reason="the cpu backend is not built"),
    pytest.mark.usefixtures("each_isa"),
]


@pytest.mark.parametrize("rows", [1, 3, 8, 40])
@pytest.mark.parametrize("vocab", [1, 7, 31, 32, 33, 1024, 8195])
def test_matches_torch_argmax(rows, vocab):
    g = torch.Generator().manual_seed(rows * 10_000 + vocab)
    x = torch.randn(rows, vocab, generator=g)
    kern = InferenceKernels(x)
    assert torch.equal(kern.argmax(x), argmax_rows_ref(x))


def test_ties_infinities_and_nans_as_torch():
    kern = InferenceKernels(torch.zeros(1))
    x = torch.zeros(7, 100)
    x[0, [5, 40, 99]] = 3.0  # ties: the first
    x[1] = float("-inf")  # all -inf: index 0
    x[2, [17, 60]] = float("inf")
    x[3, [9, 70]] = float("nan")  # a NaN wins, the first one
    x[4, 99] = float("nan")  # a NaN in the scalar tail
    x[5, 64:] = 1.0  # the maximum first seen in the vector tail of a block
    x[6] = torch.arange(100.0).flip(0)  # maximum at index 0
    got = kern.argmax(x)
    assert torch.equal(got, x.argmax(-1)), (got, x.argmax(-1))
    assert got.tolist() == [5, 0, 17, 9, 99, 64, 0]


def test_strided_rows_and_rejects():
    kern = InferenceKernels(torch.zeros(1))
    x = torch.randn(4, 300)[:, :256]  # rows 300 apart
    assert torch.equal(kern.argmax(x), x.argmax(-1))
    assert torch.equal(kern.argmax(x.t()), x.t().argmax(-1))  # a column view: copied first
    with pytest.raises(RuntimeError, match="V > 0"):
        kern._k["flash_attn_kvcache"].argmax_rows(torch.zeros(2, 0))
