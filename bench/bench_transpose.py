"""transpose_fp32 (the oneDNN route's transposed backward operands) against torch's copy of a
transposed view, x.t().contiguous(), at the tiny model's training shapes (2048 tokens x 256, 688,
1376 features), 2 threads, with the bytes it moves set against a plain copy of the same bytes.

Bar, side by side in one run: >= 1.5x torch's copy at every shape (medians on 2 Zen 4 cores: 2.2x at
256 features, 2.8-3.0x at 688 and 1376; 21-25 GB/s).
"""

import pytest
import torch

from internlm_fast.ops import available, backend

from .conftest import report

pytestmark = pytest.mark.skipif(not available("cpu"), reason="needs the native cpu module")

TOKENS = 2048


@pytest.mark.parametrize("features", [256, 688, 1376])
def test_transpose_vs_torch_copy(side_by_side, features):
    x = torch.randn(TOKENS, features, generator=torch.Generator().manual_seed(features))
    transpose = backend.kernels("cpu").transpose_fp32
    ratios, _ = side_by_side(
        f"transpose fp32 ({TOKENS}, {features})",
        lambda: transpose(x),
        {"torch": lambda: x.t().contiguous()},
        moved_bytes=2 * x.numel() * 4,
    )
    report(f"transpose ({TOKENS}, {features}): {ratios['torch']:.2f}x x.t().contiguous()")
    assert ratios["torch"] >= 1.5, f"transpose only {ratios['torch']:.2f}x torch's copy (bar 1.5x)"
