"""decode_rotary_append (rotary + KV-cache append of a decode step's new tokens, one C++ pass)
against the reference: apply_rotary_ref, then a copy into the cache rows."""

from __future__ import annotations

import pytest
import torch

from internlm_fast.ops import available, backend
from internlm_fast.ops.inference import InferenceKernels
from internlm_fast.ops.rotary import apply_rotary_ref

from .conftest import backend_devices
from .isa_helpers import each_isa  # noqa: F401  (the fixture, used by pytestmark)

# every test once per instruction set of the kernels
pytestmark = [
    pytest.mark.skipif(not available("cpu"), reason="the cpu backend is not built"),
    pytest.mark.usefixtures("each_isa"),
]


def _tables(positions: int, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).double() / rotary_dim)
    ang = torch.arange(positions).double()[:, None] * inv
    return ang.cos().float(), ang.sin().float()


def _reference(qkv, cos, sin, positions, kv_rows, slots, hq):
    n, heads, d = qkv.shape
    hk = (heads - hq) // 2
    qkv, kv_rows = qkv.clone(), kv_rows.clone()
    rot = apply_rotary_ref(qkv.view(n, 1, heads, d)[:, :, : hq + hk].float(), cos, sin, False, False, positions, None)
    qkv[:, : hq + hk] = rot[:, 0].to(qkv.dtype)
    kv_rows[slots] = qkv[:, hq:].reshape(n, 2, hk, d)
    return qkv, kv_rows


@pytest.mark.parametrize(("hq", "hk", "d", "rotary_dim"), [(8, 8, 32, 32), (8, 2, 64, 64), (4, 1, 16, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 5])
def test_matches_rotary_then_copy(hq, hk, d, rotary_dim, dtype, n):
    g = torch.Generator().manual_seed(hq * 100 + d + n)
    cos, sin = _tables(64, rotary_dim)
    qkv = torch.randn(n, hq + 2 * hk, d, generator=g).to(dtype)
    kv_rows = torch.randn(40, 2, hk, d, generator=g).to(dtype)
    positions = torch.randint(0, 64, (n,), generator=g)
    slots = torch.randperm(40, generator=g)[:n]
    want_qkv, want_rows = _reference(qkv, cos, sin, positions, kv_rows, slots, hq)
    InferenceKernels(qkv).rotary_append_(qkv, cos, sin, positions, kv_rows, slots, hq)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(qkv, want_qkv, **tol)
    torch.testing.assert_close(kv_rows, want_rows, **tol)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(kv_rows[untouched], want_rows[untouched])


@pytest.mark.parametrize("impl", [b for b, device in backend_devices("decode_rotary_append") if device == "cpu"])
def test_refuses_positions_and_slots_out_of_range(impl):
    """On CPU tensors every backend's kernel checks the values (on a GPU that would cost a sync)."""
    append = backend.kernels(impl).decode_rotary_append
    cos, sin = _tables(16, 8)
    qkv, rows = torch.zeros(2, 3, 8), torch.zeros(4, 2, 1, 8)
    with pytest.raises(RuntimeError, match="position 16 of token 1 is outside the rotary table"):
        append(qkv, cos, sin, torch.tensor([0, 16]), rows, torch.tensor([0, 1]), 1)
    with pytest.raises(RuntimeError, match="slot 4 of token 0 is outside the cache"):
        append(qkv, cos, sin, torch.tensor([0, 1]), rows, torch.tensor([4, 1]), 1)
    with pytest.raises(RuntimeError, match="q_heads \\+ 2 \\* kv_heads"):
        append(torch.zeros(2, 4, 8), cos, sin, torch.tensor([0, 1]), rows, torch.tensor([0, 1]), 1)
