"""Attention on bf16 inputs at the avx512_bf16 level (bf16 operands, P and dS rounded to bf16, fp32
accumulation) against the fp64 oracle by the flash-attn rule, and against the same kernels capped at
avx512 (every product on widened fp32 copies), over the shapes the bf16 products treat specially:
several query and key blocks (128), lengths that are not a multiple of the 32-key panel or even,
head dims of 8 mod 16, GQA, causal with seqlen_q != seqlen_k, varlen batches, views at an odd
element offset, and prefill into a KV cache. Every test runs twice: on our AVX512-BF16 tiles, and
on oneDNN's brgemm (the AMX route; without AMX oneDNN runs its AVX512-BF16 kernel, same operands)."""

from __future__ import annotations

import platform
import shutil
import subprocess

import pytest
import torch

from internlm_fast.ops import backend, use_backend
from internlm_fast.ops.flash_attn import attention_ref, attention_varlen_ref, flash_attn_func, flash_attn_varlen_func
from internlm_fast.ops.flash_attn_kvcache import flash_attn_with_kvcache

from .conftest import ATOL, assert_matches_oracle, max_err
from .isa_helpers import forced_isa, runnable_levels

pytestmark = pytest.mark.skipif("avx512_bf16" not in runnable_levels(), reason="the CPU lacks AVX-512 with AVX512-BF16")


@pytest.fixture(params=["tiles", "brgemm"], autouse=True)
def bf16_gemm(request):
    """The products of bf16 attention on our tiles or on oneDNN's brgemm, for the test's duration."""
    cpu = backend.kernels("cpu")
    before = cpu.set_attn_bf16_gemm(request.param)
    assert cpu.attn_bf16_gemm() == request.param
    yield request.param
    cpu.set_attn_bf16_gemm(before)


def _grads(fn, q, k, v, dout):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [out, q.grad, k.grad, v.grad]


def _both_levels(fn, q, k, v, dout):
    """fn's output and grads with the bf16 dot product, and capped at avx512 (widened fp32)."""
    with use_backend("cpu"):
        with forced_isa("avx512_bf16"):
            dot = _grads(fn, q, k, v, dout)
        with forced_isa("avx512"):
            widened = _grads(fn, q, k, v, dout)
    return dot, widened


def _check(name, dot, widened, lowp, fp64):
    for label, a, w, b, c in zip(("out", "dq", "dk", "dv"), dot, widened, lowp, fp64):
        assert_matches_oracle(f"{name} {label}", a, b, c, atol=ATOL[torch.bfloat16])
        # the two paths differ only in rounding P and dS to bf16: a few bf16 ulps of the largest value
        scale = c.abs().max().item()
        assert max_err(a, w) <= 4 * 2**-8 * scale + 1e-3, f"{name} {label}: far from the widened path"


# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim)
SHAPES = [
    (1, 300, 300, 4, 2, 128),  # 3 query and key blocks, a partial last panel
    (1, 257, 257, 2, 2, 72),  # odd length, head_dim 8 mod 16
    (2, 45, 301, 4, 1, 40),  # seqlen_q < seqlen_k, MQA, head_dim 8 mod 16 and < 48
    (1, 200, 75, 2, 2, 64),  # seqlen_q > seqlen_k: the early rows see no key
    (1, 129, 129, 2, 2, 256),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_dense_matches_oracle_and_the_widened_path(shape, causal):
    b, sq, sk, hq, hk, d = shape
    g = torch.Generator().manual_seed(sum(shape) + causal)
    q = torch.randn(b, sq, hq, d, generator=g).bfloat16()
    k = torch.randn(b, sk, hk, d, generator=g).bfloat16()
    v = torch.randn(b, sk, hk, d, generator=g).bfloat16()
    dout = torch.randn(b, sq, hq, d, generator=g).bfloat16()
    dot, widened = _both_levels(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), q, k, v, dout)
    ref = lambda q, k, v: attention_ref(q, k, v, causal)[0]  # noqa: E731
    lowp = _grads(ref, q, k, v, dout)
    fp64 = _grads(ref, q.double(), k.double(), v.double(), dout.double())
    _check("dense", dot, widened, lowp, fp64)


def test_varlen_batch():
    lens = [1, 130, 33, 2]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    g = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(sum(lens), 4, 64, generator=g).bfloat16() for _ in range(4))
    m = max(lens)
    dot, widened = _both_levels(
        lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=True), q, k, v, dout
    )
    ref = lambda q, k, v: attention_varlen_ref(q, k, v, cu, cu, True)[0]  # noqa: E731
    lowp = _grads(ref, q, k, v, dout)
    fp64 = _grads(ref, q.double(), k.double(), v.double(), dout.double())
    _check("varlen", dot, widened, lowp, fp64)


def test_views_at_an_odd_element_offset():
    """q, k, v that start 2 bytes past a 4-byte boundary: the pair words are read without assuming
    alignment."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(1, 150, 3, 2, 64 * 2 + 1, generator=g).bfloat16()
    q, k, v = (base[:, :, i, :, 1:65] for i in range(3))
    assert all(t.data_ptr() % 4 == 2 for t in (q, k, v))
    dout = torch.randn(1, 150, 2, 64, generator=g).bfloat16()
    dot, widened = _both_levels(lambda q, k, v: flash_attn_func(q, k, v, causal=True), q, k, v, dout)
    ref = lambda q, k, v: attention_ref(q, k, v, True)[0]  # noqa: E731
    lowp = _grads(ref, q, k, v, dout)
    fp64 = _grads(ref, q.double(), k.double(), v.double(), dout.double())
    _check("odd offset", dot, widened, lowp, fp64)


def test_prefill_into_a_kv_cache():
    """More than 16 new tokens against a cache run the blocked forward: the bf16 tiles there too."""
    g = torch.Generator().manual_seed(3)
    b, cache_len, new, hq, hk, d = 2, 256, 40, 4, 2, 64
    k_cache, v_cache = (torch.randn(b, cache_len, hk, d, generator=g).bfloat16() for _ in range(2))
    q = torch.randn(b, new, hq, d, generator=g).bfloat16()
    lens = torch.tensor([150, 211], dtype=torch.int32)
    outs = {}
    with use_backend("cpu"):
        for level in ("avx512_bf16", "avx512"):
            with forced_isa(level):
                outs[level] = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True)
    for i, n in enumerate(lens.tolist()):
        kv = (k_cache[i : i + 1, :n], v_cache[i : i + 1, :n])
        lowp = attention_ref(q[i : i + 1], *kv, True)[0]
        fp64 = attention_ref(q[i : i + 1].double(), kv[0].double(), kv[1].double(), True)[0]
        got = outs["avx512_bf16"][i : i + 1]
        assert_matches_oracle(f"kvcache seq {i}", got, lowp, fp64, atol=ATOL[torch.bfloat16])
        assert max_err(got, outs["avx512"][i : i + 1]) <= 4 * 2**-8 * fp64.abs().max().item() + 1e-3


def test_fp32_inputs_run_the_same_code_at_both_levels():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 140, 2, 64, generator=g) for _ in range(3))
    with use_backend("cpu"):
        with forced_isa("avx512_bf16"):
            a = flash_attn_func(q, k, v, causal=True)
        with forced_isa("avx512"):
            b = flash_attn_func(q, k, v, causal=True)
    assert torch.equal(a, b)


def test_bad_gemm_name():
    with pytest.raises(ValueError, match="brgemm, tiles or auto"):
        backend.kernels("cpu").set_attn_bf16_gemm("amx")


def test_the_module_holds_the_bf16_dot_product():
    from internlm_fast import _C

    if platform.machine() != "x86_64" or shutil.which("objdump") is None:
        pytest.skip("x86-64 with objdump only")
    dump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True)
    assert "vdpbf16ps" in dump.stdout and "vcvtne2ps2bf16" in dump.stdout
