"""Side-by-side benchmarks: our op and the alternative a user would otherwise call, timed in one
run with interleaved rounds, reported as ratios (absolute times on shared machines are noise).

`pytest bench/ --benchmark-only` runs them; each bar from the issues is asserted on the ratio.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch

THREADS = 2
_rows: list[str] = []


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def interleaved_medians(fns: dict[str, Callable[[], object]], min_time: float = 1.0, min_rounds: int = 5):
    """Median seconds per call of each fn, alternating between them round by round so drift in the
    machine's speed hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up: first-touch allocation, lazy init
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    while min(len(v) for v in times.values()) < min_rounds or time.perf_counter() - start < min_time:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def copy_seconds(nbytes: int) -> float:
    """Median seconds of a plain copy of `nbytes` into a preallocated buffer: the memory-bandwidth
    limit an elementwise op that reads and writes the same bytes can approach."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    return interleaved_medians({"copy": lambda: dst.copy_(src)})["copy"]


def report(line: str) -> None:
    _rows.append(line)
    print(line)


@pytest.fixture
def side_by_side(benchmark):
    """run(ours, {"eager": fn, ...}) -> {name: ratio of that baseline's time to ours}.
    The benchmark row itself times `ours`; ratios and extras go to extra_info and the summary."""

    def run(name: str, ours: Callable[[], object], baselines: dict[str, Callable[[], object]], **extra):
        med = interleaved_medians({"ours": ours, **baselines})
        ratios = {k: med[k] / med["ours"] for k in baselines}
        benchmark.extra_info.update({f"speedup_vs_{k}": round(r, 3) for k, r in ratios.items()})
        benchmark.extra_info.update(extra)
        benchmark.pedantic(ours, rounds=3, iterations=1, warmup_rounds=0)
        parts = [f"{k} {r:.2f}x" for k, r in ratios.items()]
        parts += [f"{k} {v}" for k, v in extra.items()]
        report(f"{name}: ours {med['ours'] * 1e3:.2f} ms; speedup vs " + ", ".join(parts))
        return ratios, med

    return run


def pytest_terminal_summary(terminalreporter):
    if _rows:
        terminalreporter.section("internlm_fast side-by-side ratios")
        for row in _rows:
            terminalreporter.write_line(row)
