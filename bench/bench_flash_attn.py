"""Flash attention on the CPU against torch's SDPA (2 threads), side by side in one run. The report
names the kernels' instruction-set path (IFAST_CPU_ISA caps it, to measure a lower one).

Bars:
- causal forward at (batch 1, 16 heads, 2048 tokens, head_dim 128) >= 1.2x SDPA, fp32 and bf16 (SDPA
  in bf16 too); forward+backward >= 1.1x SDPA, fp32 and bf16; the fp32 forward's GFLOP/s is reported
  against torch.mm at 1024 x 1024;
- varlen causal forward, 8 packed sequences of different lengths totalling 4096 tokens (16 heads,
  head_dim 128) >= 1.1x a loop calling SDPA on each sequence;
- decode at batch 1, 32 heads, head_dim 128, cache 4096, one query token >= 1.5x SDPA over the
  valid cache slice, fp32 and bf16 (cache and SDPA in that dtype); the cache's read GB/s reported;
- causal forward at 8192 tokens: peak memory <= 1.5x the bytes of q + k + v + out.
At the avx512_bf16 level the bf16 cases also time bf16 attention's other product route (our tiles or
oneDNN's brgemm, which runs AMX where the CPU has it), reported, not asserted.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from internlm_fast.ops import backend, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, use_backend

from .conftest import interleaved_medians, measure_in_subprocess, report


def _sdpa(q, k, v, causal):
    """SDPA on flash-attn's (batch, seqlen, heads, dim) layout, as a user would call it."""
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
    ).transpose(1, 2)


def _mm_gflops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    t = interleaved_medians({"mm": lambda: a @ b})["mm"]
    return 2 * 1024**3 / t / 1e9


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _path(dtype: str) -> str:
    """The cpu path attention takes on `dtype` inputs (fp32 runs the AVX-512 body at avx512_bf16)."""
    isa = backend.kernels("cpu").isa()
    return "avx512" if isa == "avx512_bf16" and dtype != "bf16" else isa


def _other_bf16_route(dtype: str, fn) -> dict:
    """At the avx512_bf16 level, bf16 attention's other product route (our tiles or oneDNN's brgemm,
    AMX where the CPU has it) as an extra baseline, so one run on a new machine shows both; else none."""
    cpu = backend.kernels("cpu")
    if dtype != "bf16" or cpu.isa() != "avx512_bf16" or not hasattr(cpu, "attn_bf16_gemm"):
        return {}
    other = "tiles" if cpu.attn_bf16_gemm() == "brgemm" else "brgemm"

    def run():
        before = cpu.set_attn_bf16_gemm(other)
        try:
            return fn()
        finally:
            cpu.set_attn_bf16_gemm(before)

    return {f"bf16_{other}": run}


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_forward_2048(side_by_side, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2048, 16, 128, generator=g).to(DTYPES[dtype]) for _ in range(3))
    with use_backend("cpu"), torch.no_grad():
        ours = lambda: flash_attn_func(q, k, v, causal=True)  # noqa: E731
        ratios, med = side_by_side(
            f"flash_attn fwd causal (1, 2048, 16, 128) {dtype}, cpu path {_path(dtype)}",
            ours,
            {"sdpa": lambda: _sdpa(q, k, v, True), **_other_bf16_route(dtype, ours)},
        )
    if dtype == "fp32":
        flops = 4 * 2048 * 2048 * 128 * 16 / 2
        mm = _mm_gflops()
        ours = flops / med["ours"] / 1e9
        report(
            f"flash_attn fwd: {ours:.0f} GFLOP/s = {ours / mm:.0%} of torch.mm 1024^2 ({mm:.0f} GFLOP/s); "
            f"SDPA {flops / med['sdpa'] / 1e9:.0f} GFLOP/s"
        )
    assert ratios["sdpa"] >= 1.2, f"causal forward {dtype} only {ratios['sdpa']:.2f}x SDPA (bar 1.2x)"


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_forward_backward_2048(side_by_side, dtype):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2048, 16, 128, generator=g).to(DTYPES[dtype]).requires_grad_() for _ in range(3))
    dout = torch.randn(1, 2048, 16, 128, generator=g).to(DTYPES[dtype])

    def step(fn):
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(dout)

    with use_backend("cpu"):
        ours = lambda: step(lambda q, k, v: flash_attn_func(q, k, v, causal=True))  # noqa: E731
        ratios, _ = side_by_side(
            f"flash_attn fwd+bwd causal (1, 2048, 16, 128) {dtype}, cpu path {_path(dtype)}",
            ours,
            {"sdpa": lambda: step(lambda q, k, v: _sdpa(q, k, v, True)), **_other_bf16_route(dtype, ours)},
        )
    assert ratios["sdpa"] >= 1.1, f"causal forward+backward {dtype} only {ratios['sdpa']:.2f}x SDPA (bar 1.1x)"


def test_varlen_forward_4096(side_by_side):
    lens = [1024, 700, 600, 500, 450, 400, 300, 122]  # 8 sequences, 4096 tokens
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(4096, 16, 128, generator=g) for _ in range(3))
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))

    def sdpa_loop():
        return torch.cat([_sdpa(q[None, s:e], k[None, s:e], v[None, s:e], True)[0] for s, e in bounds])

    with use_backend("cpu"), torch.no_grad():
        ratios, _ = side_by_side(
            "flash_attn_varlen fwd causal, 8 seqs / 4096 tokens, 16 heads, d 128",
            lambda: flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True),
            {"sdpa_loop": sdpa_loop},
        )
    assert ratios["sdpa_loop"] >= 1.1, f"varlen forward only {ratios['sdpa_loop']:.2f}x the SDPA loop (bar 1.1x)"


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_cache_4096(side_by_side, dtype):
    g = torch.Generator().manual_seed(3)
    cap, n = 4608, 4096
    kc, vc = (torch.randn(1, cap, 32, 128, generator=g).to(DTYPES[dtype]) for _ in range(2))
    q = torch.randn(1, 1, 32, 128, generator=g).to(DTYPES[dtype])
    with use_backend("cpu"), torch.no_grad():
        ratios, med = side_by_side(
            f"flash_attn_with_kvcache decode, batch 1, 32 heads, cache 4096, {dtype}",
            lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=n),
            {"sdpa": lambda: _sdpa(q, kc[:, :n], vc[:, :n], False)},
        )
    report(f"decode {dtype}: the cache read at {2 * n * 32 * 128 * kc.element_size() / med['ours'] / 1e9:.1f} GB/s")
    assert ratios["sdpa"] >= 1.5, f"decode {dtype} only {ratios['sdpa']:.2f}x SDPA (bar 1.5x)"


_MEMORY = r"""
import torch
from internlm_fast.ops import flash_attn_func, use_backend
torch.set_num_threads(THREADS)
with use_backend("cpu"):
    flash_attn_func(*(torch.randn(1, 8, 2, 64) for _ in range(3)), causal=True)  # load code first
    before = rss_kb()
    peak0 = peak_kb()
    q, k, v = (torch.randn(1, 8192, 16, 128) for _ in range(3))
    out = flash_attn_func(q, k, v, causal=True)
result = {"peak_mb": (peak_kb() - before) / 1024, "setup_excess_mb": (peak0 - before) / 1024,
          "tensors_mb": 4 * q.numel() * 4 / 2**20}
"""


def test_memory_8192(benchmark):
    m = measure_in_subprocess(_MEMORY)
    ratio = m["peak_mb"] / m["tensors_mb"]
    report(f"flash_attn fwd causal 8192 tokens: peak {m['peak_mb']:.0f} MB = {ratio:.2f}x the bytes of q+k+v+out")
    benchmark.extra_info.update(peak_over_qkvo=round(ratio, 3))
    benchmark.pedantic(lambda: None, rounds=1)
    assert m["setup_excess_mb"] < 16, m
    assert ratio <= 1.5, f"peak memory {ratio:.2f}x q+k+v+out (bar 1.5x)"
