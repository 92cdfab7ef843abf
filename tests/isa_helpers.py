"""Forcing the run-time instruction set of the CPU kernels that dispatch (cpp/cpu/cpu_isa.h), so each
vector path is tested on a machine that would pick a higher one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from internlm_fast.info import AVX512_BF16_OPS
from internlm_fast.ops import available, backend

# lowest first, as cpu_isa.h orders them
LEVELS = ("scalar", "avx2", "avx512", "avx512_bf16")


def runnable_levels() -> tuple[str, ...]:
    """The levels this CPU runs (the cap set aside)."""
    if not available("cpu"):
        return ()
    cpu = backend.kernels("cpu")
    now = cpu.isa()
    best = cpu.set_isa_cap(LEVELS[-1])
    cpu.set_isa_cap(now)
    return LEVELS[: LEVELS.index(best) + 1]


def distinct_levels(op: str | None = None) -> tuple[str, ...]:
    """The levels this CPU runs that run different code for `op` (None: for kernels without a path of
    their own at avx512_bf16): avx512 is dropped where avx512_bf16 runs the same body."""
    levels = runnable_levels()
    if "avx512_bf16" in levels and op not in AVX512_BF16_OPS:
        levels = tuple(level for level in levels if level != "avx512")
    return levels


@contextlib.contextmanager
def forced_isa(level: str) -> Iterator[None]:
    """Runs the body with the kernels capped at `level`; the previous level afterwards."""
    cpu = backend.kernels("cpu")
    before = cpu.isa()
    assert cpu.set_isa_cap(level) == level
    try:
        yield
    finally:
        cpu.set_isa_cap(before)


@pytest.fixture(params=distinct_levels() or ("none",))
def each_isa(request) -> Iterator[str]:
    """Runs a test once per distinct instruction set this CPU runs, the kernels capped at it (a module opts in
    with `pytestmark = pytest.mark.usefixtures("each_isa")` after importing this fixture)."""
    if request.param == "none":  # no cpu backend: the module's own skip applies
        yield request.param
        return
    with forced_isa(request.param):
        yield request.param
