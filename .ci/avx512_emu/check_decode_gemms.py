"""Runs the AVX-512 tiles of the bf16 and int8 decode GEMMs on any x86-64 CPU through SIMDe
(decode_gemms.cpp says how) against the fp64 oracle with the flash-attn rule (error at most twice the
reference's, plus atol), over the shapes of tests/test_decode_gemm_int8.py. Exits non-zero on a
mismatch. Run from the repository root with the project's venv:

    .venv/bin/python .ci/avx512_emu/check_decode_gemms.py
"""

from __future__ import annotations

import itertools
import re
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KERNELS = [ROOT / "cpp/cpu/kernels/few_rows_linear_int8.h", ROOT / "cpp/cpu/kernels/few_rows_linear_bf16.h"]
sys.path.insert(0, str(ROOT / "python"))

from internlm_fast.ops.inference import (  # noqa: E402
    dequantize_int8,
    few_rows_linear_bf16_panels,
    few_rows_linear_bf16_ref,
    few_rows_linear_int8_ref,
    quantize_int8,
)

ROWS = [1, 2, 3, 4, 5, 8, 13, 16]
SHAPES = [(256, 768), (37, 80), (64, 16), (130, 144), (1000, 48), (4100, 32)]  # (in, out)
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def build(work: Path):
    names = sorted({n for k in KERNELS for n in re.findall(r"\b(_mm512_\w+)\b", k.read_text())})
    (work / "simde_names.h").write_text("".join(f"#undef {n}\n#define {n}(...) simde{n}(__VA_ARGS__)\n" for n in names))
    return load(
        "ifast_avx512_emu",
        [str(HERE / "decode_gemms.cpp")],
        extra_include_paths=[str(work), str(ROOT / "cpp/cpu"), str(ROOT / "cpp")],
        extra_cflags=["-O1", "-mavx2", "-mfma", "-mf16c", "-std=c++20", "-w"],
        build_directory=str(work),
    )


def worse_than_reference(got: torch.Tensor, want: torch.Tensor, oracle: torch.Tensor, atol: float) -> str | None:
    err, base = (got.double() - oracle).abs().max().item(), (want.double() - oracle).abs().max().item()
    return None if err <= 2 * base + atol else f"error {err:.3g} > 2 x {base:.3g} + {atol:g}"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        emu = build(Path(tmp))
        failures = []
        for rows, (k, n), with_bias, dtype in itertools.product(ROWS, SHAPES, [True, False], list(ATOL)):
            g = torch.Generator().manual_seed(rows * 1000 + k + n)
            x = torch.randn(rows, k, generator=g).to(dtype)
            w = torch.randn(n, k, generator=g)
            bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
            plus = bias.double() if with_bias else 0
            panels, scales = quantize_int8(w)
            oracle = x.double() @ dequantize_int8(panels, scales, k).double().t() + plus
            want = few_rows_linear_int8_ref(x, panels, scales, bias)
            emu.set_vnni(False)
            got = emu.few_rows_linear_int8(x, panels, scales, bias)
            if msg := worse_than_reference(got, want, oracle, ATOL[dtype]):
                failures.append(f"int8 {rows}x{k}x{n} bias={with_bias} {dtype}: {msg}")
            emu.set_vnni(True)  # vpdpwssd: the same int32 sums, so the same outputs exactly
            if not torch.equal(emu.few_rows_linear_int8(x, panels, scales, bias), got):
                failures.append(f"int8 VNNI {rows}x{k}x{n} bias={with_bias} {dtype}: differs from vpmaddwd + vpaddd")
            wb = w.to(torch.bfloat16)
            oracle = x.double() @ wb.double().t() + plus
            want = few_rows_linear_bf16_ref(x, wb, bias)
            got = emu.few_rows_linear_bf16(x, few_rows_linear_bf16_panels(wb), bias)
            if msg := worse_than_reference(got, want, oracle, ATOL[dtype]):
                failures.append(f"bf16 {rows}x{k}x{n} bias={with_bias} {dtype}: {msg}")
        x = torch.randn(2, 200)
        x[1, 70] = float("nan")
        y = emu.few_rows_linear_int8(x, *quantize_int8(torch.randn(32, 200)), None)
        if not (y[0].isfinite().all() and y[1].isnan().all()):
            failures.append("int8: a NaN in x did not turn exactly its row's outputs to NaN")
    cases = 3 * len(ROWS) * len(SHAPES) * 2 * len(ATOL) + 1
    for f in failures:
        print(f"avx512_emu: FAIL {f}", file=sys.stderr)
    print(f"avx512_emu: decode GEMM AVX-512 tiles under SIMDe: {cases - len(failures)} of {cases} cases pass")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
