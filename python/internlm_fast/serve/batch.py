"""The engine requests of one API call: n choices per prompt, submitted and cancelled together.

One call's tokens arrive from several engine requests at once (n > 1, several prompts); `Batch.events`
merges them into one stream in arrival order. Whatever ends the iteration -- the last token, an
engine error, the client going away, the response being closed -- `cancel()` runs, so no engine slot
outlives the HTTP request that asked for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from .metrics import Metrics
from .protocol import DEFAULT_MAX_TOKENS, APIError, SamplingRequest
from .requests import QueueFull, Request, TokenOutput

# how often a request whose client may have left is checked (non-streaming calls never write to the
# socket, so only a poll notices the client is gone)
DISCONNECT_POLL_S = 0.1


class GenerationError(Exception):
    """An engine request failed while generating: only this API call fails."""


@dataclass(eq=False)
class Choice:
    index: int  # OpenAI's choice index: prompt_index * n + i
    prompt_index: int
    request: Request | None = None
    text: list[str] = field(default_factory=list)
    outputs: list[TokenOutput] = field(default_factory=list)
    finish_reason: str | None = None
    submitted_at: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.outputs)


_GONE = object()


class Batch:
    def __init__(
        self, engine, metrics: Metrics, prompts: list[list[int]], body: SamplingRequest, prompt_param: str
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.prompts = prompts
        self.body = body
        self.choices = [Choice(p * body.n_choices + i, p) for p in range(len(prompts)) for i in range(body.n_choices)]
        self.max_tokens = [self._max_tokens(p, prompt_param) for p in prompts]
        self.client_gone = False
        self._tasks: list[asyncio.Task] = []

    def _max_tokens(self, prompt: list[int], param: str) -> int:
        limit = self.engine.max_model_len
        left = limit - len(prompt)
        if left < 1:
            raise APIError(
                f"This model's maximum context length is {limit} tokens, but the prompt has {len(prompt)} "
                "tokens, which leaves no room for a completion. Shorten the prompt.",
                param=param,
                code="context_length_exceeded",
            )
        # a request for more than fits is cut to the context and finishes with "length", as vLLM does
        requested = self.body.requested_max_tokens()
        return min(left, DEFAULT_MAX_TOKENS if requested is None else requested)

    def submit(self) -> None:
        """Submits every choice; on any refusal the ones already submitted are cancelled."""
        try:
            for c in self.choices:
                params = self.body.sampling_params(c.index % self.body.n_choices, self.max_tokens[c.prompt_index])
                c.submitted_at = time.perf_counter()
                c.request = self.engine.submit(self.prompts[c.prompt_index], params)
        except QueueFull as e:
            self.cancel()
            retry = str(max(1, int(getattr(e, "retry_after", 1))))
            raise APIError(str(e), 503, code="server_overloaded", headers={"Retry-After": retry}) from None
        except ValueError as e:
            self.cancel()
            raise APIError(str(e)) from None
        self.metrics.prompt_tokens.inc(sum(len(p) for p in self.prompts))

    def cancel(self) -> None:
        for t in self._tasks:
            t.cancel()
        for c in self.choices:
            if c.request is not None and c.finish_reason is None:
                c.request.cancel()

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    @property
    def cached_tokens(self) -> int:
        # the first choice of each prompt: its siblings reuse the same prefix and would count it again
        firsts = [c for c in self.choices if c.index % self.body.n_choices == 0 and c.request is not None]
        return sum(c.request.cached_tokens for c in firsts)

    async def _pump(self, choice: Choice, queue: asyncio.Queue) -> None:
        """Forwards one engine request's tokens into the merged queue, timing them for the metrics."""
        last = None
        try:
            async for out in choice.request:
                now = time.perf_counter()
                if last is None:
                    self.metrics.time_to_first_token.observe(now - choice.submitted_at)
                else:
                    self.metrics.inter_token_latency.observe(now - last)
                last = now
                queue.put_nowait((choice, out))
            queue.put_nowait((choice, None))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            queue.put_nowait((choice, e))

    async def _watch(self, disconnected: Callable[[], Awaitable[bool]], queue: asyncio.Queue) -> None:
        while True:
            await asyncio.sleep(DISCONNECT_POLL_S)
            if await disconnected():
                queue.put_nowait(_GONE)
                return

    async def events(
        self, disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[tuple[Choice, TokenOutput]]:
        """(choice, token) in arrival order until every choice has finished. Records each token on its
        choice before yielding it. Stops early, with client_gone set, when `disconnected()` turns
        true; raises GenerationError when an engine request fails."""
        queue: asyncio.Queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._pump(c, queue)) for c in self.choices]
        if disconnected is not None:
            self._tasks.append(asyncio.create_task(self._watch(disconnected, queue)))
        live = len(self.choices)
        try:
            while live:
                item = await queue.get()
                if item is _GONE:
                    self.client_gone = True
                    return
                choice, out = item
                if out is None:
                    live -= 1
                    continue
                if isinstance(out, BaseException):
                    raise GenerationError(f"generation failed: {type(out).__name__}: {out}") from out
                choice.outputs.append(out)
                choice.text.append(out.text)
                self.metrics.generation_tokens.inc()
                if out.finish_reason is not None:
                    choice.finish_reason = out.finish_reason
                    self.metrics.finished.labels(finish_reason=out.finish_reason).inc()
                    self.metrics.request_latency.observe(time.perf_counter() - choice.submitted_at)
                yield choice, out
        finally:
            self.cancel()
