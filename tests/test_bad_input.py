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


CASES = {"rms_norm": rms_norm_cases}


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
