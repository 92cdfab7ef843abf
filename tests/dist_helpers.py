"""Helpers of the distributed tests: a tiny corpus, the tiny-model overrides, and ranks launched as
torchrun would launch them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import internlm_fast

from .train_helpers import run_overrides

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"


# every rank one thread; several buckets even for this tiny model, so the overlap is exercised
DIST_RUN = {
    "data.total_steps": 20,
    "ckpt.checkpoint_every": 10,
    "threads": 1,
    "dist.bucket_mb": 0.05,
    "dist.timeout_s": 20,
}


def overrides(corpus, run_dir: Path, **extra) -> list[str]:
    return run_overrides(corpus, run_dir, **{**DIST_RUN, **extra})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int | None, args: list[str], log: Path, env: dict | None = None) -> list[subprocess.Popen]:
    """world ranks of `python args...` as torchrun would start them; world None: one plain process."""
    # the package under test, whether installed (CI) or run from python/ with PYTHONPATH
    src = str(Path(internlm_fast.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", **(env or {})}
    if world is None:
        return [subprocess.Popen([sys.executable, *args], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)]
    port = str(_free_port())
    procs = []
    for rank in range(world):
        rank_env = {
            **env,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        out = open(f"{log}.rank{rank}", "w")
        procs.append(subprocess.Popen([sys.executable, *args], env=rank_env, stdout=out, stderr=subprocess.STDOUT))
    return procs


def wait_ok(procs: list[subprocess.Popen], log: Path, timeout: float = 120) -> None:
    for i, p in enumerate(procs):
        rc = p.wait(timeout=timeout)
        if rc != 0:
            f = Path(f"{log}.rank{i}") if Path(f"{log}.rank{i}").exists() else log
            raise AssertionError(f"process {i} exited with {rc}:\n{f.read_text()[-3000:]}")


def worker(world: int | None, corpus, tmp: Path, name: str, env: dict | None = None, **extra) -> list[subprocess.Popen]:
    """A tests/dist_worker.py run named `name` in tmp: its logs, run folder and result files."""
    args = [str(WORKER), str(tmp / name), *overrides(corpus, tmp / name, **extra)]
    return launch(world, args, tmp / f"{name}.log", env)


def result(tmp: Path, name: str, rank: int = 0) -> dict:
    return json.loads((tmp / f"{name}-rank{rank}.json").read_text())
