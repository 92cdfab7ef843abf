"""Random bad input thrown at every op: each call must raise an exception that says what is wrong
(TypeError, ValueError or BackendUnavailable), never crash the process or return garbage.

Each case starts from valid arguments of random size, breaks exactly one thing, and calls the op.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from internlm_fast import ops
from internlm_fast.ops import BackendUnavailable, use_backend

EXPECTED = (TypeError, ValueError, BackendUnavailable)
BAD_DTYPES = [torch.int64, torch.int32, torch.bool, torch.uint8, torch.complex64]


def _t(shape, dtype=torch.float32):
    if dtype.is_complex or dtype == torch.bool or not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    return torch.randn(shape, dtype=dtype)


def rms_norm_cases(draw) -> tuple[str, Callable[[], object]]:
    rows, h = draw(st.integers(1, 5)), draw(st.integers(2, 70))
    x, w, r = _t((rows, h)), _t(h), _t((rows, h))
    bad = draw(
        st.sampled_from(
            ["w_len", "w_dim", "x_dtype", "x_type", "res_shape", "res_dtype", "eps", "eps_nan", "device", "stride"]
        )
    )
    if bad == "w_len":
        w = _t(h + draw(st.integers(1, 3)))
    elif bad == "w_dim":
        w = _t((h, 1))
    elif bad == "x_dtype":
        x = _t((rows, h), draw(st.sampled_from(BAD_DTYPES)))
    elif bad == "x_type":
        x = x.tolist()
    elif bad == "res_shape":
        r = _t((rows, h + 1))
    elif bad == "res_dtype":
        r = _t((rows, h), torch.float64)
    elif bad == "device":
        w = w.to("meta")
    elif bad == "stride":
        x = _t((rows, 2 * h))[:, ::2]
    eps = {"eps": -draw(st.floats(0, 1)), "eps_nan": float("nan")}.get(bad, 1e-6)
    return bad, lambda: ops.rms_norm(x, w, eps, residual=r if bad.startswith("res") else None)


def swiglu_cases(draw) -> tuple[str, Callable[[], object]]:
    rows, f = draw(st.integers(1, 5)), draw(st.integers(1, 40))
    gate, up = _t((rows, f)), _t((rows, f))
    bad = draw(
        st.sampled_from(["shape", "dtype_mismatch", "int_dtype", "not_tensor", "device", "stride", "packed_odd"])
    )
    if bad == "packed_odd":
        return bad, lambda: ops.swiglu_packed(_t((rows, 2 * f + 1)))
    if bad == "shape":
        up = _t((rows, f + draw(st.integers(1, 3))))
    elif bad == "dtype_mismatch":
        up = up.to(torch.bfloat16)
    elif bad == "int_dtype":
        gate = _t((rows, f), draw(st.sampled_from(BAD_DTYPES)))
    elif bad == "not_tensor":
        gate = gate.numpy()
    elif bad == "device":
        up = up.to("meta")
    elif bad == "stride":
        gate, up = _t((rows, 2 * f + 2))[:, ::2], _t((rows, f + 1))  # f + 1 >= 2 columns, stride 2
    return bad, lambda: ops.swiglu(gate, up)


def rotary_cases(draw) -> tuple[str, Callable[[], object]]:
    b, s, h, half = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 3)), draw(st.integers(1, 8))
    d = 2 * half + 2 * draw(st.integers(0, 4))
    x, cos, sin = _t((b, s, h, d)), _t((s + 4, half)), _t((s + 4, half))
    kw: dict = {}
    bad = draw(
        st.sampled_from(
            [
                "ndim",
                "rotary_too_wide",
                "cos_sin_mismatch",
                "beyond_table",
                "offsets_shape",
                "cu_decreasing",
                "cu_dtype",
                "cu_total",
                "dtype",
                "device",
            ]
        )
    )
    if bad == "ndim":
        x = _t((b * s, h, d))
    elif bad == "rotary_too_wide":
        cos, sin = _t((s + 4, d)), _t((s + 4, d))
    elif bad == "cos_sin_mismatch":
        sin = _t((s + 4, half + 1))
    elif bad == "beyond_table":
        kw["seqlen_offsets"] = 5 + draw(st.integers(0, 5))
    elif bad == "offsets_shape":
        kw["seqlen_offsets"] = torch.zeros(b + 1, dtype=torch.int32)
    elif bad.startswith("cu_"):
        x = _t((b * s, h, d))
        cu = torch.arange(0, b * s + 1, s, dtype=torch.int32)
        if bad == "cu_decreasing":
            cu = torch.tensor([0, b * s, 0, b * s], dtype=torch.int32)
        elif bad == "cu_dtype":
            cu = cu.float()
        else:
            cu = cu.clone()
            cu[-1] += 1
        kw.update(cu_seqlens=cu, max_seqlen=s)
    elif bad == "dtype":
        x = _t((b, s, h, d), draw(st.sampled_from(BAD_DTYPES)))
    elif bad == "device":
        cos = cos.to("meta")
    return bad, lambda: ops.apply_rotary(x, cos, sin, **kw)


def cross_entropy_cases(draw) -> tuple[str, Callable[[], object]]:
    n, v, h = draw(st.integers(1, 6)), draw(st.integers(1, 30)), draw(st.integers(1, 16))
    logits, labels = _t((n, v)), torch.randint(0, v, (n,))
    hidden, weight = _t((n, h)), _t((v, h))
    bad = draw(
        st.sampled_from(
            [
                "label_high",
                "label_negative",
                "label_dtype",
                "label_shape",
                "logits_dtype",
                "reduction",
                "fused_weight",
                "fused_label_high",
                "fused_device",
            ]
        )
    )
    if bad == "label_high":
        labels[draw(st.integers(0, n - 1))] = v + draw(st.integers(0, 5))
    elif bad == "label_negative":
        labels[0] = -draw(st.integers(1, 99))
    elif bad == "label_dtype":
        labels = labels.float()
    elif bad == "label_shape":
        labels = torch.randint(0, v, (n + 1,))
    elif bad == "logits_dtype":
        logits = _t((n, v), draw(st.sampled_from(BAD_DTYPES)))
    if bad == "reduction":
        return bad, lambda: ops.cross_entropy(logits, labels, reduction="avg")
    if bad.startswith("fused"):
        if bad == "fused_weight":
            weight = _t((v, h + 1))
        elif bad == "fused_label_high":
            labels[0] = v
        else:
            weight = weight.to("meta")
        return bad, lambda: ops.fused_linear_cross_entropy(hidden, weight, labels)
    return bad, lambda: ops.cross_entropy(logits, labels)


def attention_cases(draw) -> tuple[str, Callable[[], object]]:
    b, sq, hk, group = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 9)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 3)),
    )
    d = 8 * draw(st.integers(1, 4))
    q, k, v = _t((b, sq, hk * group, d)), _t((b, sq, hk, d)), _t((b, sq, hk, d))
    bad = draw(
        st.sampled_from(
            [
                "head_dim",
                "heads",
                "kv_shape",
                "dtype",
                "ndim",
                "device",
                "dropout",
                "cu_decreasing",
                "cu_total",
                "cu_dtype",
                "max_seqlen",
                "cache_overflow",
                "cache_lens_negative",
                "cache_kv_pair",
                "window_size",
                "softcap",
                "alibi_slopes",
                "cu_block_table",
                "cache_batch_idx",
                "cache_leftpad",
                "cache_block_table",
                "cache_window_size",
                "cache_num_splits",
                "cache_append_whole",
                "qkvpacked_shape",
                "kvpacked_shape",
            ]
        )
    )
    if bad == "head_dim":
        q, k, v = (_t((*t.shape[:-1], d + 4)) for t in (q, k, v))
    elif bad == "heads":  # 3 query heads cannot share 2 kv heads
        q, k, v = _t((b, sq, 3, d)), _t((b, sq, 2, d)), _t((b, sq, 2, d))
    elif bad == "kv_shape":
        v = _t((b, sq + 1, hk, d))
    elif bad == "dtype":
        k = _t(k.shape, draw(st.sampled_from(BAD_DTYPES)))
    elif bad == "ndim":
        q = _t((sq, hk * group, d))
    elif bad == "device":
        v = v.to("meta")
    if bad == "dropout":
        return bad, lambda: ops.flash_attn_func(q, k, v, dropout_p=0.5)
    if bad in ("window_size", "softcap", "alibi_slopes"):  # flash-attn features not implemented
        value = {
            "window_size": lambda: (draw(st.integers(0, 8)), draw(st.sampled_from([-1, 0, 3]))),
            "softcap": lambda: draw(st.floats(0.5, 50.0)),
            "alibi_slopes": lambda: _t((hk * group,)),
        }[bad]()
        return bad, lambda: ops.flash_attn_func(q, k, v, causal=True, **{bad: value})
    if bad == "qkvpacked_shape":  # 2 slices where qkv needs 3
        return bad, lambda: ops.flash_attn_qkvpacked_func(torch.stack((q, q), dim=2))
    if bad == "kvpacked_shape":
        return bad, lambda: ops.flash_attn_kvpacked_func(q, torch.stack((k, v, v), dim=2))
    if bad.startswith("cu_") or bad == "max_seqlen":
        qv, kv_, vv = (t.reshape(-1, *t.shape[2:]) for t in (q, k, v))
        cu = torch.arange(0, b * sq + 1, sq, dtype=torch.int32)
        m = sq
        if bad == "cu_decreasing":
            cu = torch.tensor([0, b * sq, 0, b * sq], dtype=torch.int32)
        elif bad == "cu_total":
            cu = cu.clone()
            cu[-1] += 1
        elif bad == "cu_dtype":
            cu = cu.long()
        elif bad == "max_seqlen":
            m = sq - 1 if sq > 1 else -1
        table = torch.zeros(b, 1, dtype=torch.int32) if bad == "cu_block_table" else None
        return bad, lambda: ops.flash_attn_varlen_func(qv, kv_, vv, cu, cu, m, m, causal=True, block_table=table)
    if bad.startswith("cache"):
        kc, vc = _t((b, sq + 2, hk, d)), _t((b, sq + 2, hk, d))
        lens = {"cache_overflow": 3, "cache_lens_negative": -1, "cache_append_whole": None}.get(bad, 0)
        kn, vn = _t((b, sq, hk, d)), (None if bad == "cache_kv_pair" else _t((b, sq, hk, d)))
        index = torch.zeros(b, dtype=torch.int32)
        kw = {
            "cache_batch_idx": {"cache_batch_idx": index},
            "cache_leftpad": {"cache_leftpad": index},
            "cache_block_table": {"block_table": index[:, None] + b},  # past the pool's b blocks
            "cache_window_size": {"window_size": (2, 0)},
            "cache_num_splits": {"num_splits": -1},
        }.get(bad, {})
        return bad, lambda: ops.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, causal=True, **kw)
    return bad, lambda: ops.flash_attn_func(q, k, v, causal=True)


CASES = {
    "rms_norm": rms_norm_cases,
    "swiglu": swiglu_cases,
    "apply_rotary": rotary_cases,
    "cross_entropy": cross_entropy_cases,
    "attention": attention_cases,
}


@pytest.mark.parametrize("op", sorted(CASES))
@pytest.mark.parametrize("impl", ["cpu", "ref"])
def test_bad_input_raises(op, impl):
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def run(data):
        what, call = CASES[op](data.draw)
        with use_backend(impl), pytest.raises(EXPECTED):
            call()
            pytest.fail(f"{op}: bad input '{what}' was accepted")

    run()
