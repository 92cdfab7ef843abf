"""The server as a child process, for scripts, tests and benchmarks that talk to it over HTTP:

    with running_server("runs/nano-pycorpus/final", "--max-batch", "16") as base_url:
        httpx.get(base_url + "/health")                  # base_url: "http://127.0.0.1:PORT"

It starts `python -m internlm_fast.serve` on 127.0.0.1 with a free port, waits until GET /health
answers, yields the base URL and stops the server at the end. The child imports the same
internlm_fast as this process (a source tree on PYTHONPATH included); its output goes to a file (a
pipe nobody reads would fill and block it), shown in the error if it fails to start.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import internlm_fast

_URL_LINE = re.compile(r"OpenAI API: (http://\S+)/v1")


def server_env(threads: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for the child: our internlm_fast first on PYTHONPATH, `threads`
    OpenMP threads, unbuffered output, and no API key inherited from the environment."""
    src = str(Path(internlm_fast.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    env.pop("INTERNLM_FAST_API_KEY", None)
    return {**env, **(extra or {})}


@contextmanager
def running_server(model_dir: str | Path, *args: str, threads: int = 1, timeout: float = 120.0) -> Iterator[str]:
    """The server on `model_dir` with extra CLI `args` and `threads` torch threads; yields its base URL."""
    with tempfile.TemporaryDirectory(prefix="internlm-fast-serve-") as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log:
            cmd = [sys.executable, "-m", "internlm_fast.serve", "--model", str(model_dir), "--host", "127.0.0.1"]
            cmd += ["--port", "0", "--threads", str(threads), "--log-level", "warning", *args]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=server_env(threads))
            try:
                yield _wait_until_healthy(proc, log_path, timeout)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _wait_until_healthy(proc: subprocess.Popen, log_path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    base = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        if base is None:
            m = _URL_LINE.search(log_path.read_text(errors="replace"))
            base = m.group(1) if m else None
        if base is not None:
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        return base
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
        time.sleep(0.1)
    raise RuntimeError(f"the server did not answer /health in {timeout} s:\n{log_path.read_text(errors='replace')}")
