"""apply_rotary against the Hugging Face formula at InternLM-7B's attention shape (CPU, 2 threads,
fp32): q and k of (1, 2048, 32, 128), full rotary over head_dim 128.

Bar: forward (q and k together) >= 4x Hugging Face's `x * cos + rotate_half(x) * sin`.
Reported without a bar: forward+backward ratio, GB/s against copy bandwidth.
"""

import torch

from internlm_fast.ops import apply_rotary, use_backend

SHAPE = (1, 2048, 32, 128)


def tables():
    seqlen, dim = SHAPE[1], SHAPE[3]
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    freqs = torch.outer(torch.arange(seqlen, dtype=torch.float32), inv_freq)  # (seqlen, dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)  # Hugging Face's layout: (seqlen, dim)
    hf = (emb.cos()[None, :, None, :], emb.sin()[None, :, None, :])  # broadcast over batch and heads
    return (freqs.cos(), freqs.sin()), hf


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def hf_rotary(q, k, cos, sin):
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def ours(q, k, cos, sin):
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def test_rotary_forward(side_by_side):
    q, k = torch.randn(SHAPE), torch.randn(SHAPE)
    (cos, sin), (cos_hf, sin_hf) = tables()
    nbytes = 2 * 2 * q.numel() * 4  # read and write q and k
    with use_backend("cpu"), torch.no_grad():
        torch.testing.assert_close(ours(q, k, cos, sin), hf_rotary(q, k, cos_hf, sin_hf), rtol=1e-5, atol=1e-5)
        ratios, _ = side_by_side(
            "rotary fwd q+k 1x2048x32x128 fp32",
            lambda: ours(q, k, cos, sin),
            {"hf": lambda: hf_rotary(q, k, cos_hf, sin_hf)},
            moved_bytes=nbytes,
        )
    assert ratios["hf"] >= 4.0, f"rotary forward only {ratios['hf']:.2f}x Hugging Face (bar 4x)"


def test_rotary_forward_backward(side_by_side):
    q = torch.randn(SHAPE, requires_grad=True)
    k = torch.randn(SHAPE, requires_grad=True)
    dq, dk = torch.randn(SHAPE), torch.randn(SHAPE)
    (cos, sin), (cos_hf, sin_hf) = tables()

    def step(fn, c, s):
        q.grad = k.grad = None
        torch.autograd.backward(fn(q, k, c, s), (dq, dk))

    with use_backend("cpu"):
        side_by_side(
            "rotary fwd+bwd q+k 1x2048x32x128 fp32",
            lambda: step(ours, cos, sin),
            {"hf": lambda: step(hf_rotary, cos_hf, sin_hf)},
        )
