"""The Triton flash-attention kernels called directly (internlm_fast.triton_kernels.flash_attn_fwd /
flash_attn_bwd), for what test_flash_attn.py does not reach through the public op: strided views of
a packed qkv projection with GQA, empty inputs, sequences without keys, fp16, head_dim 8 (padded
tile), block shapes in both orders, the split GQA dk/dv path, batches past the grid limit, and
deterministic gradients.

Without a GPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) on small shapes;
with one, the same tests run compiled on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch

from internlm_fast.ops import available, backend
from internlm_fast.ops.flash_attn import attention_varlen_ref

from .conftest import ATOL, assert_matches_oracle

pytestmark = pytest.mark.skipif(not available("triton"), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def tk():
    return backend.kernels("triton")


@pytest.fixture
def fa():
    import internlm_fast.triton_kernels.flash_attn as mod

    return mod


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)


def _randn(*shape, dtype, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)


def _ref_grads(q, k, v, dout, cu_q, cu_k, causal, scale):
    """Reference (out, lse, dq, dk, dv) computed in q's dtype."""
    q, k, v = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    out, lse = attention_varlen_ref(q, k, v, cu_q.cpu(), cu_k.cpu(), causal, scale)
    out.backward(dout.cpu().to(out.dtype))
    return out, lse, q.grad, k.grad, v.grad


def _check(tk, q, k, v, dout, lens_q, lens_k, causal, scale=0.37):
    cu_q, cu_k = _cu(lens_q).to(DEVICE), _cu(lens_k).to(DEVICE)
    out, lse = tk.flash_attn_fwd(q, k, v, cu_q, cu_k, scale, causal)
    assert out.is_contiguous() and out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[1], q.shape[0])
    dq, dk, dv = tk.flash_attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, scale, causal)
    lowp = _ref_grads(q, k, v, dout, cu_q, cu_k, causal, scale)
    fp64 = _ref_grads(q.double(), k.double(), v.double(), dout.double(), cu_q, cu_k, causal, scale)
    atol = ATOL[q.dtype]
    for name, a, lo, hi in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), lowp[:1] + lowp[2:], fp64[:1] + fp64[2:]):
        assert_matches_oracle(name, a.cpu(), lo, hi, atol=atol)
    ref_lse = fp64[1]
    no_key = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse.cpu()), no_key) and bool((lse.cpu()[no_key] > 0).all())
    torch.testing.assert_close(lse.cpu()[~no_key].double(), ref_lse[~no_key], atol=1e-4, rtol=1e-5)
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("causal", [False, True])
def test_strided_views_of_packed_qkv_with_gqa(tk, causal):
    """q/k/v as head slices of one (total, Hq + 2 Hk, D) projection: row stride (Hq + 2 Hk) * D."""
    g = torch.Generator().manual_seed(1)
    lens = [19, 0, 36, 1]
    hq, hk, d = 4, 2, 32
    qkv = _randn(sum(lens), hq + 2 * hk, d, dtype=torch.float32, g=g)
    q, k, v = qkv[:, :hq], qkv[:, hq : hq + hk], qkv[:, hq + hk :]
    assert not q.is_contiguous() and q.stride(0) == (hq + 2 * hk) * d
    dout = _randn(sum(lens), hq, d, dtype=torch.float32, g=g)
    _check(tk, q, k, v, dout, lens, lens, causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32)])
def test_block_orders_fp16_bf16_and_padded_head_dim(tk, fa, monkeypatch, dtype, blocks):
    """head_dim 8 (a 16-wide tile, half masked) and 24; query/key blocks equal and unequal both
    ways, with seqlen_q < seqlen_k and seqlen_q > seqlen_k (causal, aligned bottom-right)."""
    monkeypatch.setattr(fa, "INTERPRET_BLOCKS", {"fwd": blocks, "dq": blocks, "dkdv": blocks})
    g = torch.Generator().manual_seed(2)
    lens_q, lens_k = [37, 5, 20], [21, 40, 20]
    for d in (8, 24):
        q = _randn(sum(lens_q), 3, d, dtype=dtype, g=g)
        k = _randn(sum(lens_k), 1, d, dtype=dtype, g=g)
        v = _randn(sum(lens_k), 1, d, dtype=dtype, g=g)
        dout = _randn(sum(lens_q), 3, d, dtype=dtype, g=g)
        _check(tk, q, k, v, dout, lens_q, lens_k, causal=True)


def test_causal_offsets_cover_every_block_residue(tk):
    """len_k - len_q from -16 to 16: the causal diagonal starts at every residue modulo the
    interpreter's block sizes, in full query blocks and in partial ones, so an off-by-one in the
    masked/unmasked block ranges shows."""
    g = torch.Generator().manual_seed(7)
    offs = range(-16, 17)
    lens_q = [33 + off % 5 for off in offs]
    lens_k = [lq + off for lq, off in zip(lens_q, offs)]
    q = _randn(sum(lens_q), 1, 16, dtype=torch.float32, g=g)
    k = _randn(sum(lens_k), 1, 16, dtype=torch.float32, g=g)
    v = _randn(sum(lens_k), 1, 16, dtype=torch.float32, g=g)
    dout = _randn(sum(lens_q), 1, 16, dtype=torch.float32, g=g)
    _check(tk, q, k, v, dout, lens_q, lens_k, causal=True)


def test_rows_without_keys_give_zeros_and_infinite_lse(tk):
    """Causal with seqlen_q > seqlen_k leaves the first rows keyless; a sequence with no keys at all
    leaves all of its rows keyless. Their outputs and dq are 0, their lse +inf."""
    g = torch.Generator().manual_seed(3)
    lens_q, lens_k = [9, 4, 6], [3, 0, 6]
    q = _randn(19, 2, 16, dtype=torch.float32, g=g)
    k = _randn(9, 2, 16, dtype=torch.float32, g=g)
    v = _randn(9, 2, 16, dtype=torch.float32, g=g)
    dout = _randn(19, 2, 16, dtype=torch.float32, g=g)
    out, lse, dq, _, _ = _check(tk, q, k, v, dout, lens_q, lens_k, causal=True)
    keyless = torch.cat([torch.arange(0, 6), torch.arange(9, 13)])
    assert torch.equal(out[keyless], torch.zeros_like(out[keyless]))
    assert torch.equal(dq[keyless], torch.zeros_like(dq[keyless]))
    assert bool(torch.isposinf(lse[:, keyless]).all())
    assert bool(torch.isfinite(lse[:, 6:9]).all())


def test_empty_inputs(tk):
    d = 16
    e = torch.empty(0, 2, d, device=DEVICE)
    cu0 = torch.zeros(1, dtype=torch.int32, device=DEVICE)  # batch 0
    for cu in (cu0, torch.zeros(3, dtype=torch.int32, device=DEVICE)):  # and 2 empty sequences
        out, lse = tk.flash_attn_fwd(e, e, e, cu, cu, 0.25, True)
        assert out.shape == (0, 2, d) and lse.shape == (2, 0)
        dq, dk, dv = tk.flash_attn_bwd(e, e, e, e, out, lse, cu, cu, 0.25, True)
        assert dq.shape == dk.shape == dv.shape == (0, 2, d)
    # queries but no keys anywhere
    g = torch.Generator().manual_seed(4)
    q = _randn(5, 2, d, dtype=torch.float32, g=g)
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE)
    cu_k = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    out, lse = tk.flash_attn_fwd(q, e, e, cu_q, cu_k, 0.25, False)
    assert torch.equal(out, torch.zeros_like(q)) and bool(torch.isposinf(lse).all())
    dq, dk, dv = tk.flash_attn_bwd(q, q, e, e, out, lse, cu_q, cu_k, 0.25, False)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == dv.shape == (0, 2, d)


def test_split_gqa_dkdv_and_chunked_batch(tk, fa, monkeypatch):
    """A GQA group's query heads split over 2 programs (fp32 partials summed), and a batch launched
    in chunks of 2 sequences (the grid-limit path)."""
    monkeypatch.setattr(fa, "DKDV_SPLIT", 2)
    monkeypatch.setattr(fa, "MAX_GRID_Z", 2)
    g = torch.Generator().manual_seed(5)
    lens = [7, 30, 0, 12, 3]
    q = _randn(sum(lens), 4, 16, dtype=torch.bfloat16, g=g)
    k = _randn(sum(lens), 1, 16, dtype=torch.bfloat16, g=g)
    v = _randn(sum(lens), 1, 16, dtype=torch.bfloat16, g=g)
    dout = _randn(sum(lens), 4, 16, dtype=torch.bfloat16, g=g)
    _check(tk, q, k, v, dout, lens, lens, causal=True)


def test_backward_is_deterministic(tk):
    g = torch.Generator().manual_seed(6)
    lens = [40, 9]
    q = _randn(49, 4, 16, dtype=torch.bfloat16, g=g)
    k = _randn(49, 2, 16, dtype=torch.bfloat16, g=g)
    v = _randn(49, 2, 16, dtype=torch.bfloat16, g=g)
    dout = _randn(49, 4, 16, dtype=torch.bfloat16, g=g)
    cu = _cu(lens).to(DEVICE)
    out, lse = tk.flash_attn_fwd(q, k, v, cu, cu, 0.25, True)
    first = tk.flash_attn_bwd(dout, q, k, v, out, lse, cu, cu, 0.25, True)
    second = tk.flash_attn_bwd(dout, q, k, v, out, lse, cu, cu, 0.25, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_rejects_bad_layouts(tk):
    q = torch.randn(4, 2, 16, device=DEVICE)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous in their last dimension"):
        tk.flash_attn_fwd(torch.randn(4, 2, 32, device=DEVICE)[..., ::2], q, q, cu, cu, 0.25, False)
    with pytest.raises(TypeError, match="fp16, bf16, fp32"):
        tk.flash_attn_fwd(q.double(), q.double(), q.double(), cu, cu, 0.25, False)
    with pytest.raises(ValueError, match="int32"):
        tk.flash_attn_fwd(q, q, q, cu.long(), cu, 0.25, False)
