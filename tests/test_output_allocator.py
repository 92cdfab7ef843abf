"""The caching allocator behind the CPU kernels' large outputs: freed blocks are reused by size,
at most INTERNLM_FAST_OUTPUT_CACHE_MB are kept, the least recently freed evicted first."""

import os
import subprocess
import sys

import torch

import internlm_fast
from internlm_fast import _C
from internlm_fast.ops import rms_norm, use_backend

SCRIPT = r"""
import torch
from internlm_fast import _C
from internlm_fast.ops import rms_norm, use_backend
small, large = torch.randn(1024, 1024), torch.randn(1024, 1536)  # outputs of 4 MB and 6 MB
with use_backend("cpu"):
    for x in (small, small, large, large, small):
        rms_norm(x, torch.ones(x.shape[1]))
print(*_C.cpu.output_cache_stats())
"""


def _run(cap_mb: str) -> list[int]:
    env = dict(os.environ, INTERNLM_FAST_OUTPUT_CACHE_MB=cap_mb)
    src = os.path.dirname(os.path.dirname(os.path.abspath(internlm_fast.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return [int(v) for v in out.stdout.split()]


def test_reuse_and_least_recently_freed_eviction():
    # 8 MB cap: the 6 MB block's arrival evicts the 4 MB one, so the last small call misses again
    cached, live, hits, misses = _run("8")
    assert (hits, misses) == (2, 3)
    assert live == 0 and cached <= 8 << 20


def test_cache_off():
    cached, live, hits, misses = _run("0")
    assert (cached, live, hits, misses) == (0, 0, 0, 5)


def test_reused_block_is_fully_overwritten():
    x = torch.randn(512, 1024)
    w = torch.randn(1024)
    with use_backend("cpu"):
        first = rms_norm(x, w).clone()
        garbage = rms_norm(torch.full_like(x, 7.0), w)  # same size: lands in the block freed next
        del garbage
        again = rms_norm(x, w)
    assert torch.equal(first, again)
    assert _C.cpu.output_cache_stats()[2] > 0  # served from the cache at least once
