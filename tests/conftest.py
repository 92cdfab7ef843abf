"""Shared test helpers: which (backend, device) pairs to run, and the flash-attn accuracy rule."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# Triton runs on CPU tensors only in its interpreter, which must be on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from internlm_fast.ops import available, registry  # noqa: E402

from .isa_helpers import distinct_levels, forced_isa  # noqa: E402


def backend_devices(op: str | None = None) -> list[tuple[str, str]]:
    """Every (backend, device) pair this machine can run for `op`, from the op registry: each backend
    its entry lists for the device (the library's "aten" aside), and the GPU backend triton on CPU
    tensors too when Triton's interpreter is on. A listed backend that lacks the kernel then fails
    its tests: it is not skipped."""
    entry = registry.OPS[op] if op is not None else None
    cpu_order = entry.cpu if entry else ("cpu",)
    cuda_order = entry.cuda if entry else registry.GPU_ORDER
    pairs = [(b, "cpu") for b in cpu_order if b != "aten"]
    if "triton" in cuda_order and available("triton") and os.environ.get("TRITON_INTERPRET") == "1":
        pairs.append(("triton", "cpu"))
    if torch.cuda.is_available():
        pairs += [(b, "cuda") for b in cuda_order if b != "aten"]
    return pairs


def pytest_generate_tests(metafunc):
    """`impl_device` runs a test on every (backend, device) pair of the module's OP (all the GPU
    backends when the module names none), the cpu backend once per instruction set this CPU runs
    that changes the op's code (its kernels carry a scalar, an AVX2 and an AVX-512 path, chosen at run
    time; attention on bf16 and the int8 decode GEMM also an AVX512-BF16 + VNNI one)."""
    if "impl_device" in metafunc.fixturenames:
        params, ids = [], []
        op = getattr(metafunc.module, "OP", None)
        for b, d in backend_devices(op):
            levels = distinct_levels(op)[::-1] if b == "cpu" else (None,)
            for i, level in enumerate(levels):
                params.append((b, d, None if i == 0 else level))  # the best level is the default
                ids.append(f"{b}-{d}" if i == 0 else f"{b}-{d}-{level}")
        metafunc.parametrize("impl_device", params, ids=ids, indirect=True)


@pytest.fixture
def impl_device(request) -> Iterator[tuple[str, str]]:
    """(backend, device), with the cpu kernels capped at a lower instruction set where asked."""
    backend_name, device, level = request.param
    if level is None:
        yield backend_name, device
    else:
        with forced_isa(level):
            yield backend_name, device


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_matches_oracle(
    name: str, out: torch.Tensor, ref_lowp: torch.Tensor, ref_fp64: torch.Tensor, atol: float = 1e-6
) -> None:
    """The flash-attn rule: the backend's error against the fp64 oracle is at most twice the error
    of the reference run in the same low precision, plus a small atol."""
    assert out.shape == ref_fp64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_fp64.shape)}"
    assert out.dtype == ref_lowp.dtype, f"{name}: dtype {out.dtype} != {ref_lowp.dtype}"
    err = max_err(out, ref_fp64)
    base = max_err(ref_lowp, ref_fp64)
    assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 x reference error {base:.3g} + {atol:g}"


# atol per dtype for the rule above: covers outputs whose reference error happens to be ~0
ATOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 1e-3}
