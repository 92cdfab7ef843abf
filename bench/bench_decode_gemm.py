"""The decode GEMMs on bf16 and int8 weights at batch 1, InternLM-7B's projection shapes (CPU, 2 threads).

A batch-1 decode step reads every weight once, so the measure is GB/s of weight bytes read per call,
set against the streaming-read bandwidth of a large buffer (torch.sum over 512 MiB of fp32) measured
in the same interleaved rounds, and the time against torch's bf16 F.linear on the (out, in) weight.
Each op cycles through enough copies of its weights (>= 256 MiB) that they come from DRAM, not L3.
No bars: the numbers are reported (the machine is shared, and its DRAM speed is not ours to set).
"""

import torch
import torch.nn.functional as F

from internlm_fast.ops.inference import few_rows_linear_bf16_panels, inference_kernels, quantize_int8

from .conftest import interleaved_medians, report

# (out, in) -> how many of a layer's projections have it: q/k/v/o, gate/up, down
SHAPES = {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}
COLD_BYTES = 256 << 20
READ_BYTES = 512 << 20


def _cycle(fns):
    """One call per round, each round on the next copy of the weights."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]]()

    return call


def _calls(n: int, k: int) -> dict:
    """The batch-1 calls at one shape, each over cold copies of its weights."""
    x = torch.randn(1, k).to(torch.bfloat16)
    kern = inference_kernels(x)
    weights = [(torch.randn(n, k) * 0.02).to(torch.bfloat16) for _ in range(max(2, -(-COLD_BYTES // (n * k * 2))))]
    panels = [few_rows_linear_bf16_panels(w) for w in weights]
    quant = [quantize_int8(w) for w in weights[: max(2, -(-COLD_BYTES // (n * k)))]]
    return {
        "bf16": _cycle([lambda p=p: kern.few_rows_linear_bf16(x, p, None) for p in panels]),
        "int8": _cycle([lambda q=q: kern.few_rows_linear_int8(x, q[0], q[1], None) for q in quant]),
        "F.linear bf16": _cycle([lambda w=w: F.linear(x, w) for w in weights]),
    }


def test_decode_gemm_batch1(benchmark):
    big = torch.ones(READ_BYTES // 4)
    totals = {}
    for (n, k), count in SHAPES.items():
        fns = {**_calls(n, k), "read": lambda: big.sum()}
        with torch.inference_mode():
            med = interleaved_medians(fns, min_time=2.0, min_rounds=20)
        del fns
        read_gbps = READ_BYTES / med["read"] / 1e9
        nbytes = {"bf16": n * k * 2, "int8": n * k + n * (-(-k // 64)) * 4, "F.linear bf16": n * k * 2}
        gbps = {name: b / med[name] / 1e9 for name, b in nbytes.items()}
        for name in nbytes:
            totals[name] = totals.get(name, 0.0) + count * med[name]
        cells = [
            f"{name} {med[name] * 1e3:.3f} ms = {gbps[name]:.1f} GB/s = {gbps[name] / read_gbps:.0%}" for name in nbytes
        ]
        speedups = f"bf16 {med['F.linear bf16'] / med['bf16']:.2f}x, int8 {med['F.linear bf16'] / med['int8']:.2f}x"
        report(f"decode GEMM {n}x{k} batch 1 (read {read_gbps:.1f} GB/s): {'; '.join(cells)}; vs F.linear: {speedups}")
        benchmark.extra_info[f"{n}x{k}"] = {name: round(gbps[name], 2) for name in nbytes} | {
            "read": round(read_gbps, 2)
        }
    report(
        "decode GEMM, one InternLM-7B layer's seven projections: "
        + ", ".join(f"{name} {t * 1e3:.2f} ms" for name, t in totals.items())
    )
    x = torch.randn(1, 4096).to(torch.bfloat16)
    p = few_rows_linear_bf16_panels(torch.randn(4096, 4096).to(torch.bfloat16))
    kern = inference_kernels(x)
    benchmark.pedantic(lambda: kern.few_rows_linear_bf16(x, p, None), rounds=3, iterations=1, warmup_rounds=0)
