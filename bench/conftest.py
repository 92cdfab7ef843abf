"""Side-by-side benchmarks: our op and the alternative a user would otherwise call, timed in one
run with interleaved rounds, reported as ratios (absolute times on shared machines are noise).

`pytest bench/ --benchmark-only` runs them; each module's bars (its docstring) are asserted on the ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
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


_MEASURE_PRELUDE = """
import json
THREADS = {threads}

def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

def peak_kb():
    # VmHWM, this address space's peak resident set: unlike ru_maxrss it does not inherit the
    # parent's peak across fork + exec, so a child smaller than pytest still measures itself
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

result = None
"""


def measure_in_subprocess(script: str, *args: str) -> dict:
    """Runs `script` in a fresh interpreter (the peak resident set is per process and never goes
    down, so each memory measurement needs its own) and returns the dict it leaves in `result`. The script gets
    rss_kb(), peak_kb(), THREADS and sys.argv[1:] = args."""
    import internlm_fast

    env = dict(os.environ)
    # the child imports the same internlm_fast as this process, wherever it lives
    src = os.path.dirname(os.path.dirname(os.path.abspath(internlm_fast.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    code = _MEASURE_PRELUDE.format(threads=THREADS) + script + "\nprint(json.dumps(result))\n"
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(line: str) -> None:
    _rows.append(line)
    print(line)


@pytest.fixture
def side_by_side(benchmark):
    """run(name, ours, {"eager": fn, ...}, moved_bytes=None) -> (ratios, medians).

    ratios[k] = time of baseline k / time of ours. With moved_bytes (what ours reads plus writes),
    a plain copy of the same bytes into a preallocated buffer (the memory-bandwidth limit) is timed
    in the same interleaved rounds; medians["copy"] / medians["ours"] is then the fraction of copy
    bandwidth ours achieves. The benchmark row itself times `ours`."""

    def run(
        name: str,
        ours: Callable[[], object],
        baselines: dict[str, Callable[[], object]],
        moved_bytes: int | None = None,
        **extra,
    ):
        fns = {"ours": ours, **baselines}
        if moved_bytes is not None:
            src = torch.empty(moved_bytes // 8, dtype=torch.float32).fill_(1.0)  # copying n bytes moves 2n
            dst = torch.empty_like(src).fill_(0.0)
            fns["copy"] = lambda: dst.copy_(src)
        med = interleaved_medians(fns)
        ratios = {k: med[k] / med["ours"] for k in baselines}
        benchmark.extra_info.update({f"speedup_vs_{k}": round(r, 3) for k, r in ratios.items()})
        parts = [f"{k} {r:.2f}x" for k, r in ratios.items()]
        if moved_bytes is not None:
            frac = med["copy"] / med["ours"]
            gbps = moved_bytes / med["ours"] / 1e9
            benchmark.extra_info.update(gb_per_s=round(gbps, 2), copy_fraction=round(frac, 3))
            parts.append(f"{gbps:.1f} GB/s = {frac:.0%} of copy bandwidth")
        benchmark.extra_info.update(extra)
        benchmark.pedantic(ours, rounds=3, iterations=1, warmup_rounds=0)
        parts += [f"{k} {v}" for k, v in extra.items()]
        report(f"{name}: ours {med['ours'] * 1e3:.2f} ms; speedup vs " + ", ".join(parts))
        return ratios, med

    return run


def pytest_terminal_summary(terminalreporter):
    if _rows:
        terminalreporter.section("internlm_fast side-by-side ratios")
        for row in _rows:
            terminalreporter.write_line(row)
