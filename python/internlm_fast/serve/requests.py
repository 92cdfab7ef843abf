"""What a client asks of the engine and what it gets back, one token at a time.

`SamplingParams` is one sequence's generation settings (the OpenAI fields the engine acts on);
`TokenOutput` is one generated token; `Request` is the handle `Engine.submit` returns: an async
iterator of TokenOutput that ends after the token carrying a finish_reason, and `cancel()`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


class QueueFull(Exception):
    """The waiting queue is at its bound: the client should retry after `retry_after` seconds."""

    def __init__(self, waiting: int, retry_after: int = 1) -> None:
        super().__init__(f"the server is at capacity: {waiting} requests are waiting; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (below 1e-5): greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the k likeliest
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k!r}")
        if not 0.01 <= self.repetition_penalty < float("inf"):  # below, the penalised logits overflow
            raise ValueError(f"repetition_penalty must be >= 0.01, got {self.repetition_penalty!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 are greedy (as in vLLM): dividing by them overflows the logits."""
        return self.temperature < 1e-5


@dataclass
class TokenOutput:
    token_id: int
    text: str  # the text this token completes ("" while a character or a possible stop string is held back)
    logprob: float | None = None  # log-probability of token_id under the model (with logprobs)
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), likeliest first
    finish_reason: str | None = None  # "stop" (eos or stop string) or "length" on the last token


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One sequence in the engine. Iterate it (async) for its tokens; `cancel()` frees its slot."""

    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    id: int = field(default_factory=lambda: next(_ids))
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (set when it is prefilled)
    cancelled: bool = False
    finished: bool = False
    error: BaseException | None = None
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    def cancel(self) -> None:
        """Stops generating: the engine drops the sequence at its next step and frees its cache."""
        self.cancelled = True

    # engine side (the scheduler thread) -----------------------------------------------------------

    def push(self, out: TokenOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self._queue.put_nowait, out)

    # client side (the event loop) -------------------------------------------------------------------

    async def __aiter__(self) -> AsyncIterator[TokenOutput]:
        while True:
            out = await self._queue.get()
            if isinstance(out, BaseException):
                raise out
            yield out
            if out.finish_reason is not None:
                return
