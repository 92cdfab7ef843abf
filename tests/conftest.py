"""Shared test helpers: which (backend, device) pairs to run, and the flash-attn accuracy rule."""

from __future__ import annotations

import os

import pytest
import torch

# Triton runs on CPU tensors only in its interpreter, which must be on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from internlm_fast.ops import available  # noqa: E402
from internlm_fast.ops.backend import kernels  # noqa: E402


def backend_devices() -> list[tuple[str, str]]:
    """Every (backend, device) pair this machine can run."""
    pairs = [("cpu", "cpu")]
    if available("triton") and os.environ.get("TRITON_INTERPRET") == "1":
        pairs.append(("triton", "cpu"))
    if torch.cuda.is_available():
        if available("cuda"):
            pairs.append(("cuda", "cuda"))
        if available("triton"):
            pairs.append(("triton", "cuda"))
    return pairs


@pytest.fixture(params=backend_devices(), ids=lambda p: f"{p[0]}-{p[1]}")
def impl_device(request) -> tuple[str, str]:
    """A (backend, device) pair; a test module that sets OP = "<op>" skips, saying so, the backends
    that have no kernel for that op yet."""
    impl, _ = request.param
    op = getattr(request.module, "OP", None)
    if op is not None and not hasattr(kernels(impl), f"{op}_fwd"):
        pytest.skip(f"backend {impl!r} has no {op} kernel")
    return request.param


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
