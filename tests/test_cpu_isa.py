"""The run-time instruction-set choice of the dispatching CPU kernels: IFAST_CPU_ISA caps it at
import, set_isa_cap later, never above what the CPU runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from internlm_fast.ops import available, backend

from .isa_helpers import LEVELS, forced_isa, runnable_levels

pytestmark = pytest.mark.skipif(not available("cpu"), reason="the cpu backend is not built")


def _isa_with_env(value: str) -> str:
    env = {**os.environ, "IFAST_CPU_ISA": value}
    code = "import torch; from internlm_fast import _C; print(_C.cpu.isa())"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_the_environment_caps_the_level():
    levels = runnable_levels()
    assert levels and levels[0] == "scalar"
    for cap in LEVELS:
        want = levels[min(LEVELS.index(cap), len(levels) - 1)]
        assert _isa_with_env(cap) == want
    assert _isa_with_env("no_such_isa") == levels[-1]  # ignored: the module still imports


def test_set_isa_cap():
    cpu = backend.kernels("cpu")
    for level in runnable_levels():
        with forced_isa(level):
            assert cpu.isa() == level
    with pytest.raises(ValueError, match="avx2"):
        cpu.set_isa_cap("sse9")
