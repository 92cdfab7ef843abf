"""`python -m internlm_fast.serve`: an OpenAI-compatible HTTP server (chat, completions, models,
metrics) and a web chat page, over the continuous-batching engine.

Attributes load on first use, so that the engine and its request types import without FastAPI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "main"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "main":
        from .cli import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
