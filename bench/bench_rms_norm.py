"""rms_norm against eager torch and F.rms_norm at LLM shapes (CPU, 2 threads, fp32).

Bars: forward at 4096 x 4096 >= 5x eager and >= 70% of copy bandwidth;
forward+backward >= 3x eager.
"""

import torch
import torch.nn.functional as F

from internlm_fast.ops import rms_norm, use_backend

EPS = 1e-6


def eager(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def test_rms_norm_forward(side_by_side):
    x = torch.randn(4096, 4096)
    w = torch.randn(4096)
    nbytes = 2 * x.numel() * 4  # read x, write y
    with use_backend("cpu"), torch.no_grad():
        ratios, med = side_by_side(
            "rms_norm fwd 4096x4096 fp32",
            lambda: rms_norm(x, w, EPS),
            {"eager": lambda: eager(x, w), "F.rms_norm": lambda: F.rms_norm(x, (4096,), w, EPS)},
            moved_bytes=nbytes,
        )
    frac = med["copy"] / med["ours"]
    assert ratios["eager"] >= 5.0, f"rms_norm forward only {ratios['eager']:.2f}x eager (bar 5x)"
    assert frac >= 0.70, f"rms_norm forward at {frac:.0%} of copy bandwidth (bar 70%)"


def test_rms_norm_forward_backward(side_by_side):
    x = torch.randn(4096, 4096, requires_grad=True)
    w = torch.randn(4096, requires_grad=True)
    dy = torch.randn(4096, 4096)

    def step(fn):
        x.grad = w.grad = None
        fn(x, w).backward(dy)

    with use_backend("cpu"):
        ratios, _ = side_by_side(
            "rms_norm fwd+bwd 4096x4096 fp32",
            lambda: step(lambda x, w: rms_norm(x, w, EPS)),
            {"eager": lambda: step(eager), "F.rms_norm": lambda: step(lambda x, w: F.rms_norm(x, (4096,), w, EPS))},
        )
    assert ratios["eager"] >= 3.0, f"rms_norm forward+backward only {ratios['eager']:.2f}x eager (bar 3x)"
