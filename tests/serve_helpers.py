"""The real server (`python -m internlm_fast.serve`) on loopback, for the serve tests and the chat
page's browser test.

    with running_server(model_dir, "--api-key", "k") as base_url:   # "http://127.0.0.1:PORT"
        httpx.get(base_url + "/health")

`served_model_dir` (session) is a small random model saved with a real sentencepiece tokenizer;
`server_url` (session) is one server on it, shared by every test that needs no special flags.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest

from internlm_fast.serve import process as serve_process

from .generate_helpers import small_model, train_small_tokenizer

MODEL_NAME = "tiny-internlm"
START_TIMEOUT_S = 120


def build_model_dir(folder: Path) -> Path:
    """A small random model + a trained sentencepiece tokenizer, saved as a model folder named
    MODEL_NAME (the server's default model name is the folder's name)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_small_tokenizer(folder)
    return small_model().save_pretrained(folder / MODEL_NAME, tokenizer=tokenizer)


def running_server(model_dir: str | Path, *args: str, timeout: float = START_TIMEOUT_S):
    """The server on model_dir with extra CLI args, one thread (fastest for a tiny model on shared
    cores): a context manager yielding the base URL (internlm_fast.serve.process.running_server)."""
    return serve_process.running_server(model_dir, *args, threads=1, timeout=timeout)


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
