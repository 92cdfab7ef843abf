"""ops.linear: F.linear with fp32 GEMMs on oneDNN where torch's BLAS leaves AVX-512 unused, and bf16
GEMMs widened to fp32 where ATen's bf16 GEMM is a slow loop. Forward and both gradients match
F.linear under either GEMM library and either bf16 route, the choices follow the CPU and the
environment, and everything else is F.linear itself."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from internlm_fast.ops import available, backend
from internlm_fast.ops.linear import bf16_gemm, fp32_gemm, linear, use_bf16_gemm, use_fp32_gemm

from .conftest import ATOL, assert_matches_oracle

needs_onednn = pytest.mark.skipif(
    not (available("cpu") and hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()),
    reason="needs the native cpu module and a torch build with oneDNN",
)

# (leading dims of x, in_features, out_features, bias)
SHAPES = [
    ((2, 50), 64, 192, True),  # wide weight: dW summed transposed
    ((130,), 96, 40, False),  # narrow weight
    ((1, 7, 3), 8, 8, True),
    ((300,), 256, 256, False),
]


def _grads(fn, x, w, b, dy):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    y = fn(x, w, b)
    y.backward(dy)
    return [y, x.grad, w.grad] + ([b.grad] if b is not None else [])


def _fresh_choice(fn: str, env_var: str, value: str | None, isa: str | None) -> str:
    """ops.linear.<fn>() in a fresh process, with env_var and IFAST_CPU_ISA set or unset."""
    env = {k: v for k, v in os.environ.items() if k not in (env_var, "IFAST_CPU_ISA")}
    env.update({k: v for k, v in ((env_var, value), ("IFAST_CPU_ISA", isa)) if v is not None})
    code = f"import torch; from internlm_fast.ops.linear import {fn}; print({fn}())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _cpu_flags() -> str:
    return open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""


@needs_onednn
@pytest.mark.parametrize("gemm", ["onednn", "aten"])
@pytest.mark.parametrize("lead, fin, fout, bias", SHAPES)
def test_forward_and_grads_match_f_linear(gemm, lead, fin, fout, bias):
    g = torch.Generator().manual_seed(fin + fout)
    x = torch.randn(*lead, fin, generator=g)
    w = torch.randn(fout, fin, generator=g) / fin**0.5
    b = torch.randn(fout, generator=g) if bias else None
    dy = torch.randn(*lead, fout, generator=g)
    with use_fp32_gemm(gemm):
        ours = _grads(linear, x, w, b, dy)
    want = _grads(F.linear, x.double(), w.double(), None if b is None else b.double(), dy.double())
    for name, a, ref in zip(("y", "dx", "dw", "db"), ours, want):
        assert a.dtype == torch.float32 and a.shape == ref.shape, name
        # fp32 GEMM rounding: a few ulps of the summed magnitudes
        tol = 1e-5 * max(1.0, ref.abs().max().item()) * max(fin, x.numel() // fin) ** 0.5
        assert (a.double() - ref).abs().max().item() <= tol, f"{gemm} {name}"


@needs_onednn
def test_non_contiguous_input_and_partial_grads():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(40, 2, 64, generator=g)
    x = base[:, 1]  # rows 128 floats apart
    w = torch.randn(32, 64, generator=g, requires_grad=True)
    with use_fp32_gemm("onednn"):
        y = linear(x, w)  # x needs no grad: only dW is computed
        y.square().sum().backward()
    w2 = w.detach().clone().requires_grad_()
    F.linear(x, w2).square().sum().backward()
    torch.testing.assert_close(y, F.linear(x, w.detach()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_the_onednn_path_is_taken_and_other_dtypes_are_f_linear(monkeypatch):
    module = sys.modules["internlm_fast.ops.linear"]  # ops.linear is the function
    calls = []
    real = module._mm_nt

    def spy(a, b, bias=None):
        calls.append(a.dtype)
        return real(a, b, bias)

    monkeypatch.setattr(module, "_mm_nt", spy)
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    with use_fp32_gemm("onednn"), use_bf16_gemm("native"):
        linear(x, w)
        linear(x.bfloat16(), w.bfloat16())
        linear(x.double(), w.double())
    with use_fp32_gemm("aten"):
        linear(x, w)
    assert calls == [torch.float32]


def test_bad_shapes_fail_as_f_linear_does():
    with pytest.raises(RuntimeError):
        linear(torch.randn(3, 5), torch.randn(4, 6))


def test_use_fp32_gemm_names_the_choices():
    with pytest.raises(ValueError, match="'onednn' or 'aten'"):
        with use_fp32_gemm("mkl"):
            pass


@pytest.mark.skipif(not available("cpu"), reason="the cpu backend is not built")
def test_the_choice_follows_the_cpu_and_the_environment():
    def choice(value: str | None, isa: str | None = None) -> str:
        return _fresh_choice("fp32_gemm", "IFAST_FP32_GEMM", value, isa)

    flags = _cpu_flags()
    has_onednn = hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()
    avx512 = all(f" {f}" in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))
    intel = "GenuineIntel" in flags
    assert choice(None) == ("onednn" if has_onednn and avx512 and not intel else "aten")
    assert choice(None, isa="avx2") == "aten"  # capped below AVX-512: as on a CPU without it
    assert choice("aten") == "aten"
    assert choice("onednn") == ("onednn" if has_onednn else "aten")
    assert choice("onednn", isa="avx2") == choice("onednn")  # an explicit choice holds under the cap
    assert fp32_gemm() == backend.kernels("cpu").fp32_gemm()
    with pytest.raises(ValueError, match="onednn, aten or auto"):
        backend.kernels("cpu").set_fp32_gemm("mkl")


@pytest.mark.skipif(not available("cpu"), reason="the cpu backend is not built")
@pytest.mark.parametrize("route", ["widen", "native"])
@pytest.mark.parametrize("lead, fin, fout, bias", SHAPES)
def test_bf16_forward_and_grads_follow_the_oracle(route, lead, fin, fout, bias):
    """Either route is at least about as close to the fp64 product of the bf16 values as ATen's bf16
    F.linear (the flash-attn rule); widened, the tensors autograd saves stay bf16."""
    g = torch.Generator().manual_seed(fin + fout)
    x = torch.randn(*lead, fin, generator=g).bfloat16()
    w = (torch.randn(fout, fin, generator=g) / fin**0.5).bfloat16()
    b = torch.randn(fout, generator=g).bfloat16() if bias else None
    dy = torch.randn(*lead, fout, generator=g).bfloat16()
    saved = []
    with (
        use_bf16_gemm(route),
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t),
    ):
        ours = _grads(linear, x, w, b, dy)
    assert saved and all(dtype == torch.bfloat16 for dtype in saved)
    ref = _grads(F.linear, x, w, b, dy)
    want = _grads(F.linear, x.double(), w.double(), None if b is None else b.double(), dy.double())
    for name, a, lo, hi in zip(("y", "dx", "dw", "db"), ours, ref, want):
        assert a.dtype == torch.bfloat16, name
        assert_matches_oracle(f"{route} {name}", a, lo, hi, ATOL[torch.bfloat16])


@pytest.mark.skipif(not available("cpu"), reason="the cpu backend is not built")
def test_the_bf16_route_follows_the_cpu_and_the_environment():
    def route(value: str | None, isa: str | None = None) -> str:
        return _fresh_choice("bf16_gemm", "IFAST_BF16_GEMM", value, isa)

    flags = _cpu_flags()
    avx512 = all(f" {f}" in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))
    assert route(None) == ("native" if avx512 else "widen")
    assert route(None, isa="avx2") == route(None)  # torch's bf16 GEMMs ignore the kernels' cap
    assert route("widen") == "widen" and route("native") == "native"
    assert bf16_gemm() == backend.kernels("cpu").bf16_gemm()
    with pytest.raises(ValueError, match="widen, native or auto"):
        backend.kernels("cpu").set_bf16_gemm("fp32")
    with pytest.raises(ValueError, match="'widen' or 'native'"):
        with use_bf16_gemm("fp32"):
            pass


@needs_onednn
def test_flop_counter_and_the_ref_backend_see_plain_torch():
    from torch.utils.flop_counter import FlopCounterMode

    from internlm_fast.ops import use_backend

    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(32, 16, requires_grad=True)
    with use_fp32_gemm("onednn"):
        with FlopCounterMode(display=False) as counter:
            linear(x, w).sum().backward()
        assert counter.get_total_flops() == 3 * 2 * 8 * 16 * 32
        with use_backend("ref"):
            y = linear(x, w)
    assert y.grad_fn.name() == F.linear(x, w).grad_fn.name()


@needs_onednn
@pytest.mark.parametrize("rows", [1, 17, 32, 33, 100])
@pytest.mark.parametrize("bias", [True, False])
def test_inference_rows_go_in_buckets_and_match_f_linear(monkeypatch, rows, bias):
    module = sys.modules["internlm_fast.ops.linear"]
    seen = []
    real = module._mm_nt

    def spy(a, b, bias=None):
        seen.append(a.shape[0])
        return real(a, b, bias)

    monkeypatch.setattr(module, "_mm_nt", spy)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 48, generator=g)
    w = torch.randn(40, 48, generator=g, requires_grad=True)  # a parameter, but no autograd here
    b = torch.randn(40, generator=g) if bias else None
    with use_fp32_gemm("onednn"), torch.no_grad():
        y = linear(x, w, b)
    assert seen == [-(-rows // module.ROW_BUCKET) * module.ROW_BUCKET]
    want = F.linear(x.double(), w.detach().double(), None if b is None else b.double())
    assert y.shape == (rows, 40) and y.is_contiguous()
    assert (y.double() - want).abs().max().item() <= 1e-4
    seen.clear()
    with use_fp32_gemm("onednn"):
        linear(x, w, b).sum().backward()  # with autograd: the rows as they are
    assert seen[0] == rows


@needs_onednn
@pytest.mark.parametrize("rows", [1, 33, 100])
def test_a_prepacked_weight_gives_f_linear(rows):
    from internlm_fast.ops import use_backend
    from internlm_fast.ops.linear import linear_prepacked, prepack

    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, rows, 64, generator=g)
    w = torch.randn(96, 64, generator=g) / 8
    b = torch.randn(96, generator=g)
    with use_fp32_gemm("onednn"):
        packed = prepack(w)
        assert packed is not None
        with torch.inference_mode():
            y = linear_prepacked(x, packed, b)
        assert linear_prepacked(torch.randn(3, 65), packed, b) is None  # not its shape
        with use_backend("ref"):
            assert linear_prepacked(x, packed, b) is None  # the caller multiplies by W itself
    want = F.linear(x.double(), w.double(), b.double())
    assert y.shape == (2, rows, 96) and (y.double() - want).abs().max().item() <= 1e-4
    with use_fp32_gemm("aten"):
        assert prepack(w) is None
        assert linear_prepacked(x, packed, b) is None
    assert prepack(w.double()) is None and prepack(w.bfloat16()) is None


@needs_onednn
@pytest.mark.parametrize("gemm", ["onednn", "aten"])
def test_a_prefill_multiplies_by_the_prepacked_copy_where_gemms_run_on_onednn(gemm):
    from types import SimpleNamespace

    from torch import nn

    from internlm_fast.model.projection import Projection
    from internlm_fast.ops.inference import InferenceKernels

    torch.manual_seed(0)
    linears = [nn.Linear(48, n, bias=True) for n in (64, 32)]
    proj = Projection(*linears)
    kern = InferenceKernels(linears[0].weight)
    ctx = SimpleNamespace(cache=object(), cu_seqlens=torch.tensor([0, 40], dtype=torch.int32), kernels=kern)
    ctx.copy_weights = True
    x = torch.randn(40, 48)
    weight = torch.cat([lin.weight for lin in linears]).detach()
    bias = torch.cat([lin.bias for lin in linears]).detach()
    with use_fp32_gemm(gemm), torch.inference_mode():
        y = proj(x, ctx)
        wt, _, _, _, packed = proj._copies
    if gemm == "onednn":
        assert packed is not None and packed.is_mkldnn and wt is None  # the blocked copy replaces (in, out)
    else:
        assert packed is None and wt is not None
    want = F.linear(x.double(), weight.double(), bias.double())
    assert (y.double() - want).abs().max().item() <= 1e-4
