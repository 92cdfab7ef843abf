"""The real server (`python -m internlm_fast.serve`) on loopback, for the serve tests and the chat
page's browser test.

    with running_server(model_dir, "--api-key", "k") as base_url:   # "http://127.0.0.1:PORT"
        httpx.get(base_url + "/health")

`served_model_dir` (session) is a small random model saved with a real sentencepiece tokenizer;
`server_url` (session) is one server on it, shared by every test that needs no special flags.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

import internlm_fast

from .generate_helpers import small_model, train_small_tokenizer

MODEL_NAME = "tiny-internlm"
START_TIMEOUT_S = 120
_URL_LINE = re.compile(r"OpenAI API: (http://\S+)/v1")


def build_model_dir(folder: Path) -> Path:
    """A small random model + a trained sentencepiece tokenizer, saved as a model folder named
    MODEL_NAME (the server's default model name is the folder's name)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_small_tokenizer(folder)
    return small_model().save_pretrained(folder / MODEL_NAME, tokenizer=tokenizer)


def _server_env() -> dict[str, str]:
    # the server must import the same internlm_fast as the tests (the source tree under
    # PYTHONPATH=python), and one thread per op is fastest for a tiny model on shared cores
    src = str(Path(internlm_fast.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("INTERNLM_FAST_API_KEY", None)
    return env


@contextmanager
def running_server(model_dir: str | Path, *args: str, timeout: float = START_TIMEOUT_S) -> Iterator[str]:
    """Starts the server on 127.0.0.1 (a free port, --port 0) with extra CLI `args`, waits until
    GET /health answers, yields the base URL, and stops the server at the end. Its output goes to a
    file (a pipe nobody reads would fill and block it) shown in the error if it fails to start."""
    with tempfile.TemporaryDirectory(prefix="serve-test-") as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log:
            cmd = [sys.executable, "-m", "internlm_fast.serve", "--model", str(model_dir)]
            cmd += ["--host", "127.0.0.1", "--port", "0", "--log-level", "warning", *args]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_server_env())
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
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    return base
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    raise RuntimeError(f"the server did not answer /health in {timeout} s:\n{log_path.read_text(errors='replace')}")


# Test modules import these fixtures, and pytest then keeps one instance per importing module: the
# model folder and the server are cached here so a whole session builds and starts them once.
_shared: dict[str, object] = {}


@pytest.fixture(scope="session")
def served_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if "model_dir" not in _shared:
        _shared["model_dir"] = build_model_dir(tmp_path_factory.mktemp("served-model"))
    return _shared["model_dir"]


@pytest.fixture(scope="session")
def server_url(served_model_dir: Path, pytestconfig: pytest.Config) -> str:
    if "url" not in _shared:
        stack = ExitStack()
        _shared["url"] = stack.enter_context(running_server(served_model_dir))
        pytestconfig.add_cleanup(stack.close)  # at the end of the session
        pytestconfig.add_cleanup(lambda: _shared.clear())
    return _shared["url"]
