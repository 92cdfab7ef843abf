"""The server's entry point: the environment it gives torch's OpenMP runtime, and the thread the model
is loaded on."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from internlm_fast.serve.cli import _on_passing_thread

ENTRY = (
    "import os, runpy, sys\n"
    "sys.argv = ['serve', '--help']\n"
    "try:\n"
    "    runpy.run_module('internlm_fast.serve', run_name='__main__')\n"
    "except SystemExit:\n"
    "    pass\n"
    "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)\n"
)


@pytest.mark.parametrize(
    "env, want",
    [({}, "10000"), ({"GOMP_SPINCOUNT": "5"}, "5"), ({"OMP_WAIT_POLICY": "active"}, "None")],
)
def test_the_entry_point_shortens_openmp_spinning_unless_told(env, want):
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run(
        [sys.executable, "-c", ENTRY], env={**base, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    # set before torch (and with it libgomp, which reads it once) is loaded: --help imports no torch
    assert out[-2:] == [want, "False"]


def test_on_passing_thread_returns_and_raises_on_the_caller():
    caller = threading.current_thread()
    assert _on_passing_thread(lambda: threading.current_thread() is not caller)

    def fail():
        raise FileNotFoundError("no such model")

    with pytest.raises(FileNotFoundError, match="no such model"):
        _on_passing_thread(fail)
