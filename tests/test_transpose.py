"""transpose_fp32, the blocked transpose the oneDNN route's backward GEMMs (ops.linear, the fused
lm-head cross-entropy) take their operands through: x.t().contiguous() to the bit on every
instruction-set path, for shapes that fill no 8 x 8 block, shapes with ragged edges, row-strided
views, and the errors that name what was wrong."""

from __future__ import annotations

import pytest
import torch

from internlm_fast.ops import available, backend

from .isa_helpers import distinct_levels, forced_isa

pytestmark = pytest.mark.skipif(not available("cpu"), reason="needs the native cpu module")

SHAPES = [(1, 1), (1, 37), (37, 1), (8, 8), (7, 9), (33, 65), (64, 256), (97, 45), (2048, 256), (300, 1030)]


@pytest.mark.parametrize("level", distinct_levels())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_equals_torch_transpose(level, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0] * 1000 + shape[1]))
    with forced_isa(level):
        got = backend.kernels("cpu").transpose_fp32(x)
    assert got.is_contiguous() and torch.equal(got, x.t().contiguous())


@pytest.mark.parametrize("level", distinct_levels())
def test_strided_views_and_the_out_variant(level):
    cpu = backend.kernels("cpu")
    base = torch.randn(70, 90)
    with forced_isa(level):
        for view in (base[3:60, 5:82], base.t()[10:50], base[::2, ::3]):  # row stride > width; transposed; both strided
            assert torch.equal(cpu.transpose_fp32(view), view.t().contiguous())
        out = torch.full((82 - 5, 60 - 3), float("nan"))
        cpu.transpose_fp32_into(base[3:60, 5:82], out)
        assert torch.equal(out, base[3:60, 5:82].t())
    assert cpu.transpose_fp32(torch.empty(0, 5)).shape == (5, 0)


def test_bad_input_is_named():
    cpu = backend.kernels("cpu")
    with pytest.raises(ValueError, match="2-D fp32"):
        cpu.transpose_fp32(torch.randn(4, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="must be 2-D"):
        cpu.transpose_fp32(torch.randn(4))
    with pytest.raises(ValueError, match=r"out must be .*\(3, 4\)"):
        cpu.transpose_fp32_into(torch.randn(4, 3), torch.empty(4, 3))
    with pytest.raises(ValueError, match="out must be"):
        cpu.transpose_fp32_into(torch.randn(4, 3), torch.empty(4, 3).t())  # (3, 4) but not contiguous
