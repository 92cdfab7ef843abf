"""swiglu against eager `F.silu(g) * u` at InternLM-7B's MLP shape (CPU, 2 threads, fp32).

Bars: at gate/up 4096 x 11008, forward+backward >= 1.5x eager (autograd) and forward
>= 70% of copy bandwidth. The packed [..., 2F] variant is reported against its eager form.
"""

import torch
import torch.nn.functional as F

from internlm_fast.ops import swiglu, swiglu_packed, use_backend

ROWS, FF = 4096, 11008


def eager(g, u):
    return F.silu(g) * u


def eager_packed(x):
    return F.silu(x[..., :FF]) * x[..., FF:]


def test_swiglu_forward(side_by_side):
    g, u = torch.randn(ROWS, FF), torch.randn(ROWS, FF)
    nbytes = 3 * g.numel() * 4  # read gate and up, write out
    with use_backend("cpu"), torch.no_grad():
        ratios, med = side_by_side(
            "swiglu fwd 4096x11008 fp32", lambda: swiglu(g, u), {"eager": lambda: eager(g, u)}, moved_bytes=nbytes
        )
    frac = med["copy"] / med["ours"]
    assert frac >= 0.70, f"swiglu forward at {frac:.0%} of copy bandwidth (bar 70%)"


def test_swiglu_forward_backward(side_by_side):
    g = torch.randn(ROWS, FF, requires_grad=True)
    u = torch.randn(ROWS, FF, requires_grad=True)
    dout = torch.randn(ROWS, FF)

    def step(fn):
        g.grad = u.grad = None
        fn(g, u).backward(dout)

    with use_backend("cpu"):
        ratios, _ = side_by_side("swiglu fwd+bwd 4096x11008 fp32", lambda: step(swiglu), {"eager": lambda: step(eager)})
    assert ratios["eager"] >= 1.5, f"swiglu forward+backward only {ratios['eager']:.2f}x eager (bar 1.5x)"


def test_swiglu_packed_forward(side_by_side):
    x = torch.randn(ROWS, 2 * FF)
    with use_backend("cpu"), torch.no_grad():
        side_by_side(
            "swiglu_packed fwd 4096x(2x11008) fp32", lambda: swiglu_packed(x), {"eager": lambda: eager_packed(x)}
        )


def test_swiglu_packed_forward_backward(side_by_side):
    x = torch.randn(ROWS, 2 * FF, requires_grad=True)
    dout = torch.randn(ROWS, FF)

    def step(fn):
        x.grad = None
        fn(x).backward(dout)

    with use_backend("cpu"):
        side_by_side(
            "swiglu_packed fwd+bwd 4096x(2x11008) fp32",
            lambda: step(swiglu_packed),
            {"eager": lambda: step(eager_packed)},
        )
