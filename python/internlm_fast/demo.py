"""`python -m internlm_fast.demo`: each op at an LLM shape, checked against its fp64 reference and
timed against the torch eager code it replaces (the main job until the trainer lands)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from internlm_fast import ops


def _median_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _cases(scale: int) -> list[tuple[str, Callable, Callable, Callable]]:
    """(name, ours, eager, check) per op; check returns the max error of ours against fp64."""
    g = torch.Generator().manual_seed(0)
    rows = 1024 * scale
    x = torch.randn(rows, 4096, generator=g)
    w = torch.randn(4096, generator=g)
    gate, up = torch.randn(rows, 11008, generator=g), torch.randn(rows, 11008, generator=g)
    q = torch.randn(1, 512 * scale, 32, 128, generator=g)
    inv = 1.0 / 10000 ** (torch.arange(0, 128, 2).double() / 128)
    ang = torch.arange(512 * scale).double()[:, None] * inv
    cos, sin = ang.cos().float(), ang.sin().float()
    cos_hf = torch.cat((cos, cos), -1)[None, :, None]
    sin_hf = torch.cat((sin, sin), -1)[None, :, None]
    qa, ka, va = (torch.randn(1, 512 * scale, 16, 128, generator=g) for _ in range(3))
    logits = torch.randn(rows, 32000, generator=g)
    labels = torch.randint(0, 32000, (rows,), generator=g)
    d = lambda t: t.double()  # noqa: E731

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.double() - b).abs().max().item()

    return [
        (
            f"rms_norm        ({rows} x 4096)",
            lambda: ops.rms_norm(x, w),
            lambda: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w,
            lambda: err(ops.rms_norm(x, w), ops.rms_norm_ref(d(x), d(w))),
        ),
        (
            f"swiglu          ({rows} x 11008)",
            lambda: ops.swiglu(gate, up),
            lambda: F.silu(gate) * up,
            lambda: err(ops.swiglu(gate, up), ops.swiglu_ref(d(gate), d(up))),
        ),
        (
            f"apply_rotary    {tuple(q.shape)}",
            lambda: ops.apply_rotary(q, cos, sin),
            lambda: q * cos_hf + _rotate_half(q) * sin_hf,
            lambda: err(ops.apply_rotary(q, cos, sin), ops.apply_rotary_ref(d(q), d(cos), d(sin))),
        ),
        (
            f"flash_attn      {tuple(qa.shape)} causal",
            lambda: ops.flash_attn_func(qa, ka, va, causal=True),
            lambda: F.scaled_dot_product_attention(
                qa.transpose(1, 2), ka.transpose(1, 2), va.transpose(1, 2), is_causal=True
            ),
            lambda: err(ops.flash_attn_func(qa, ka, va, causal=True), ops.attention_ref(d(qa), d(ka), d(va), True)[0]),
        ),
        (
            f"cross_entropy   ({rows} x 32000)",
            lambda: ops.cross_entropy(logits, labels),
            lambda: F.cross_entropy(logits, labels),
            lambda: err(ops.cross_entropy(logits, labels), ops.cross_entropy_ref(d(logits), labels)),
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=int, default=2, help="problem size multiplier (default 2)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per op (median reported)")
    args = parser.parse_args(argv)
    print(
        f"internlm_fast ops on {torch.get_num_threads()} CPU threads, fp32 "
        "(speedup = time of the torch code it replaces / ours; for attention that is SDPA)"
    )
    with torch.no_grad():
        for name, ours, eager, check in _cases(args.scale):
            error = check()
            t_ours = _median_seconds(ours, args.repeat)
            t_eager = _median_seconds(eager, args.repeat)
            print(f"  {name:<42} max |err| vs fp64 {error:.1e}   {t_eager / t_ours:5.1f}x")


if __name__ == "__main__":
    main()
