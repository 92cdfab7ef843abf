"""x W^T + b (F.linear) for the model's projections, with fp32 GEMMs through oneDNN where torch's BLAS
leaves the CPU's AVX-512 unused.

torch multiplies fp32 matrices on the CPU with MKL, which picks its code by CPU vendor: on AMD CPUs
with AVX-512 (Zen 4, Zen 5) it runs its AVX2 code, half the vector width there. oneDNN, inside torch
too (torch.ops.mkldnn._linear_pointwise), picks its code by the CPU's features and runs AVX-512: on 2
cores of a Zen 5, 2-2.5x MKL at the shapes of a training step (bench/bench_linear.py). So where the
native module sends fp32 GEMMs to oneDNN (`_C.cpu.fp32_gemm()`: a CPU with AVX-512 that is not
Intel's, kernels not capped below AVX-512 by IFAST_CPU_ISA; or IFAST_FP32_GEMM=onednn), an fp32
linear on CPU tensors runs its forward and both backward GEMMs there. Everything else is F.linear as
it is: Intel CPUs, where MKL runs AVX-512 itself; AVX2-only CPUs; bf16, whose GEMMs ATen already
sends to oneDNN; CUDA.

bf16 linears widen to fp32 where ATen has no fast bf16 GEMM (`_C.cpu.bf16_gemm()` is "widen": a CPU
without AVX-512, where oneDNN cannot take bf16 and ATen's fallback loop is 7-400x slower than its
fp32 GEMM): the operands are converted to fp32 (exact), multiplied as fp32 linears are, and the
results rounded to bf16 once; the backward keeps the bf16 input and weight and widens them again,
so the saved tensors stay bf16. IFAST_BF16_GEMM=widen|native overrides the choice.

Without autograd (a prefill), the rows go to oneDNN in buckets of ROW_BUCKET: oneDNN builds a GEMM
for each shape it meets (about 0.4 ms for each of a layer's projections on 2 cores) and keeps it
in its primitive cache, so a server whose prompts all differ in length would otherwise build them
anew at every prefill. The rows beyond x's are zeros, and the output is sliced back to x's rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend


def fp32_gemm() -> str:
    """The library fp32 GEMMs on CPU tensors run on: "onednn" or "aten" (torch's own choice, MKL)."""
    if not backend.available("cpu"):
        return "aten"
    cpu = backend.kernels("cpu")
    return cpu.fp32_gemm() if hasattr(cpu, "fp32_gemm") else "aten"


def bf16_gemm() -> str:
    """The route the library bf16 GEMMs on CPU tensors take: "widen" (fp32 GEMMs on widened operands)
    or "native" (ATen's bf16 GEMM)."""
    if not backend.available("cpu"):
        return "native"
    cpu = backend.kernels("cpu")
    return cpu.bf16_gemm() if hasattr(cpu, "bf16_gemm") else "native"


@contextlib.contextmanager
def use_fp32_gemm(name: str) -> Iterator[None]:
    """Runs the body with fp32 GEMMs on `name` ("onednn" or "aten"); the previous setting afterwards.
    ValueError for another name or where the choice cannot be made (no native module, no oneDNN)."""
    if name not in ("onednn", "aten"):
        raise ValueError(f"fp32 GEMM library must be 'onednn' or 'aten', got {name!r}")
    with _setting("fp32_gemm", name, "aten", "fp32 GEMMs can move to oneDNN only with the native cpu module built"):
        if fp32_gemm() != name:
            raise ValueError(f"fp32 GEMMs cannot run on {name} here: this torch build has no oneDNN")
        yield


@contextlib.contextmanager
def use_bf16_gemm(name: str) -> Iterator[None]:
    """Runs the body with bf16 GEMMs taking the route `name` ("widen" or "native"); the previous
    setting afterwards. ValueError for another name, or "widen" without the native cpu module."""
    if name not in ("widen", "native"):
        raise ValueError(f"bf16 GEMM route must be 'widen' or 'native', got {name!r}")
    with _setting("bf16_gemm", name, "native", "bf16 GEMMs widen only with the native cpu module built"):
        yield


@contextlib.contextmanager
def _setting(what: str, name: str, without_module: str, refusal: str) -> Iterator[None]:
    """The native module's setting `what` (fp32_gemm, bf16_gemm) at `name` for the body."""
    if not backend.available("cpu"):
        if name == without_module:
            yield
            return
        raise ValueError(refusal)
    cpu = backend.kernels("cpu")
    before = getattr(cpu, f"set_{what}")(name)
    try:
        yield
    finally:
        getattr(cpu, f"set_{what}")(before)


ROW_BUCKET = 32


def _mm_nt(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """a (M, K) @ b (N, K)^T + bias through oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


def _mm_nt_bucketed(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear of x (..., K) through oneDNN, its rows padded to a multiple of ROW_BUCKET (no autograd)."""
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    padded = -(-rows // ROW_BUCKET) * ROW_BUCKET
    if padded != rows:
        x2 = F.pad(x2, (0, 0, 0, padded - rows))  # zero rows below
    return _mm_nt(x2, weight, bias)[:rows].view(*x.shape[:-1], weight.shape[0])


def _transposed(t: Tensor) -> Tensor:
    """t (R, C) fp32 as a contiguous (C, R): the native module's blocked transpose, 3-5x torch's copy
    of a transposed view at a training step's (2048, 256..1376) operands."""
    return backend.kernels("cpu").transpose_fp32(t)


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return _mm_nt(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x2, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _mm_nt(dy2, weight.t()).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            out_features, in_features = weight.shape
            # dW = dY^T X: oneDNN takes it fastest with the longer side as its N, so a wide weight
            # is summed transposed (X^T dY) and turned once
            if out_features >= in_features:
                dw = _transposed(_mm_nt(_transposed(x2), dy2.t()))
            else:
                dw = _mm_nt(_transposed(dy2), x2.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


def _widened_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The linear on fp32 copies of its operands, rounded back to x's dtype once."""
    return linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


class _WidenedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _widened_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).float()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ weight.float()).to(x.dtype).view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = (dy2.t() @ x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = dy2.sum(0).to(ctx.bias_dtype)
        return dx, dw, db


def _library_gemm(x: Tensor) -> bool:
    """Whether a linear of x may leave F.linear for this module's routes: a CPU tensor outside
    use_backend("ref") (plain torch) and outside any torch dispatch mode (FlopCounterMode, fake
    tensors), which knows aten's matmuls and not oneDNN's op."""
    return (
        x.device.type == "cpu"
        and backend.forced_backend() != "ref"
        and torch._C._len_torch_dispatch_stack() == 0
        and x.numel() > 0
    )


def _on_onednn(x: Tensor, weight_dtype: torch.dtype) -> bool:
    """Whether an F.linear of x by a weight of this dtype runs its GEMMs on oneDNN now."""
    return x.dtype == torch.float32 and weight_dtype == torch.float32 and _library_gemm(x) and fp32_gemm() == "onednn"


def _widened(x: Tensor, weight_dtype: torch.dtype) -> bool:
    """Whether an F.linear of bf16 x by a bf16 weight widens to fp32 now."""
    return x.dtype == torch.bfloat16 and weight_dtype == torch.bfloat16 and _library_gemm(x) and bf16_gemm() == "widen"


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), its fp32 GEMMs on oneDNN where fp32_gemm() says so and its bf16 GEMMs
    widened to fp32 where bf16_gemm() says so. Never under use_backend("ref"), which runs plain
    torch, nor under a torch dispatch mode."""
    if x.shape[-1] == weight.shape[-1] and (bias is None or bias.dtype == x.dtype):
        tracked = (x, weight) if bias is None else (x, weight, bias)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in tracked)
        if _on_onednn(x, weight.dtype):
            return _OneDnnLinear.apply(x, weight, bias) if grad else _mm_nt_bucketed(x, weight, bias)
        if _widened(x, weight.dtype):
            return _WidenedLinear.apply(x, weight, bias) if grad else _widened_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def prepack(weight: Tensor) -> Tensor | None:
    """An fp32 (out, in) CPU weight in oneDNN's own blocked layout, for linear_prepacked; None where
    fp32 GEMMs do not run on oneDNN. oneDNN reorders a plain weight into that layout inside every
    GEMM; a weight that does not change (inference) is reordered once: 4-17% of a prefill's GEMM
    time on 2 cores at the tiny model's shapes (912 to 96 rows)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or fp32_gemm() != "onednn":
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def linear_prepacked(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor | None:
    """x W^T + b against prepack(W), without autograd; None where x's GEMM does not run on oneDNN now
    (the caller multiplies by W itself then)."""
    if not _on_onednn(x, torch.float32) or x.shape[-1] != packed.shape[-1]:
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    return _mm_nt_bucketed(x, packed, bias)
