"""fp32 linear layers, forward + backward, at the tiny model's training shapes (2048 tokens: q/k/v
packed, o, gate/up packed, down, lm_head): ops.linear against torch's F.linear (2 threads).

Bar, side by side in one run, where ops.linear sends fp32 GEMMs to oneDNN (a CPU with AVX-512 that
is not Intel's, where torch's MKL runs its AVX2 code): >= 1.3x F.linear over the layer's GEMMs
where the CPU executes a 512-bit FMA at full width (Zen 5: 2-2.5x measured), and >= 1.15x on a
Zen 4 (AMD family 0x19), whose AVX-512 runs on 256-bit units in two passes: there oneDNN's AVX-512
and MKL's AVX2 code reach the same multiply-adds per cycle, and what is left to win is oneDNN's
blocking and the backward's transposed operands (2 Zen 4 cores: 1.21-1.31x over four runs with
the blocked transpose, 1.10-1.20x with torch's copy of a transposed view; per pass, min times
before the transpose: forward 1.33x, input gradient 1.07x, weight gradient 0.99x).
Elsewhere ops.linear is F.linear, and the ratio (about 1x) is only reported.
"""

import torch
import torch.nn.functional as F

from internlm_fast.ops import fp32_gemm, linear

from .conftest import report

TOKENS = 2048
# (in, out) of the tiny preset's projections (hidden 256, intermediate 688, vocab 8192)
SHAPES = [(256, 768), (256, 256), (256, 1376), (688, 256), (256, 8192)]


def _step(fn, xs, ws, dys):
    def run():
        for x, w, dy in zip(xs, ws, dys):
            fn(x, w).backward(dy)
            x.grad = w.grad = None

    return run


def test_linear_fwd_bwd_fp32(side_by_side):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(TOKENS, k, generator=g).requires_grad_() for k, _ in SHAPES]
    ws = [(torch.randn(n, k, generator=g) / k**0.5).requires_grad_() for k, n in SHAPES]
    dys = [torch.randn(TOKENS, n, generator=g) for _, n in SHAPES]
    gflop = sum(3 * 2 * TOKENS * k * n for k, n in SHAPES) / 1e9
    ratios, med = side_by_side(
        f"linear fwd+bwd fp32, {TOKENS} tokens, tiny model's 5 projection shapes, ops.linear on {fp32_gemm()}",
        _step(linear, xs, ws, dys),
        {"F.linear": _step(F.linear, xs, ws, dys)},
    )
    report(f"linear fp32: ours {gflop / med['ours']:.0f} GFLOP/s, F.linear {gflop / med['F.linear']:.0f} GFLOP/s")
    if fp32_gemm() == "onednn":
        bar = 1.15 if _double_pumped_avx512() else 1.3
        assert ratios["F.linear"] >= bar, f"fp32 linear only {ratios['F.linear']:.2f}x F.linear (bar {bar}x)"


def _double_pumped_avx512() -> bool:
    """Whether this is a Zen 4 (AuthenticAMD family 25 with AVX-512), whose 512-bit FMAs take two passes
    through 256-bit units."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read(1 << 16)
    except OSError:
        return False
    fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "25"
