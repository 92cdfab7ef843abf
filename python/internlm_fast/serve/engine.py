"""The engine: one scheduler thread owns the model and runs continuous batching over a paged KV cache.

Each iteration of the scheduler:
1. drops cancelled requests (their blocks go back to the pool at once);
2. admits waiting requests, first come first served, while the batch has room and the pool can
   promise each the blocks it may need (prompt + max_tokens); a request that does not fit waits;
3. prefills the admitted prompts as one packed row (the part after any reused prefix), sampling
   each one's first token;
4. runs one decode step for every running sequence and samples its next token.
Finished sequences leave the batch immediately and release their blocks; full blocks stay published
in the pool (block_pool.py), so a later prompt that starts with the same tokens (the next turn of a
chat: the previous prompt and answer) reuses them instead of prefilling them again.

Requests are submitted on the server's event loop; tokens flow back through each Request's queue.
Its parallel regions are fastest when no other long-lived thread of the process has run torch ops on
several threads (GNU OpenMP then stops spinning between regions): the server loads the model on a
thread that ends (cli.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from internlm_fast.infer.cache_storage import KVCache
from internlm_fast.infer.generate import prefill
from internlm_fast.infer.sampling import SamplingConfig, process_logits
from internlm_fast.infer.streaming import TextStream
from internlm_fast.model import InternLMForCausalLM

from .block_pool import BlockPool, block_hashes
from .requests import QueueFull, Request, SamplingParams, TokenOutput

log = logging.getLogger("internlm_fast.serve")


@dataclass(eq=False)
class Sequence:
    """A request's state on the scheduler thread."""

    req: Request
    tokens: list[int]  # prompt, then every generated token
    max_new: int  # max_tokens, cut to the context
    reserve: int  # blocks promised and not yet allocated
    stream: TextStream
    sampling: SamplingConfig
    generator: torch.Generator | None
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose keys and values are in the cache
    published: int = 0  # leading blocks published for prefix reuse
    chain: int = 0  # the chain hash of the last published block (block_pool.block_hashes)
    generated: int = 0
    last_time: float = 0.0

    @property
    def params(self) -> SamplingParams:
        return self.req.params


class Engine:
    def __init__(
        self,
        model: InternLMForCausalLM,
        tokenizer,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_model_len: int | None = None,
        block_size: int = 16,
        cache_tokens: int | None = None,
        prefix_cache: bool = True,
        prefix_cache_tokens: int | None = None,
        kv_dtype: torch.dtype | str | None = None,
    ) -> None:
        """cache_tokens: the pool (default max_batch x max_model_len tokens); prefix_cache_tokens: the
        most tokens kept cached for reuse once no sequence holds them (default: whatever the pool has
        free), least recently used evicted first; kv_dtype: the cache's dtype (default: the model's)."""
        limit = model.config.context_length  # max_position_embeddings, longer with rope scaling
        self.max_model_len = limit if max_model_len is None else max_model_len
        sizes = (("max_batch", max_batch, 1), ("max_queue", max_queue, 0), ("block_size", block_size, 1))
        for name, value, low in sizes:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not 2 <= self.max_model_len <= limit:
            raise ValueError(f"max_model_len must be in [2, {limit}] (the model's context), got {max_model_len}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue, self.page = max_batch, max_queue, block_size
        self.blocks_per_seq = -(-self.max_model_len // block_size)
        tokens = max_batch * self.max_model_len if cache_tokens is None else cache_tokens
        num_blocks = -(-tokens // block_size)
        if num_blocks < self.blocks_per_seq:
            raise ValueError(
                f"cache_tokens {tokens} cannot hold one sequence of max_model_len {self.max_model_len} tokens"
            )
        self.cache = KVCache.pool_for_model(model, num_blocks, block_size, kv_dtype)
        max_cached = None if prefix_cache_tokens is None else prefix_cache_tokens // block_size
        self.pool = BlockPool(num_blocks, block_size, max_cached)
        self.prefix_cache = prefix_cache
        self.eos_ids = frozenset(getattr(tokenizer, "stop_ids", ()) or ())
        self.device = model.lm_head.weight.device
        self.waiting: deque[Request] = deque()
        self.running: list[Sequence] = []
        self.answers: OrderedDict[str, list[int]] = OrderedDict()  # answer text -> its generated ids
        self._threads = torch.get_num_threads()
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- the event loop's side ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="internlm_fast-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, prompt: list[int], params: SamplingParams) -> Request:
        """Queues a request; call on the event loop that will iterate it. Raises ValueError for a prompt
        that leaves no room to generate, QueueFull when max_queue requests already wait."""
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"the prompt holds a token id outside the vocabulary [0, {vocab})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens; this model's context is {self.max_model_len} tokens, "
                "prompt and completion together: shorten the prompt"
            )
        req = Request(list(prompt), params, asyncio.get_running_loop())
        with self._wake:
            if len(self.waiting) >= self.max_queue:  # requests whose clients left give their places up
                self.waiting = deque(r for r in self.waiting if not r.cancelled)
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(len(self.waiting))
            self.waiting.append(req)
            self._wake.notify()
        return req

    def stats(self) -> dict:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "cache_blocks_used": self.pool.used,
            "cache_blocks_cached": len(self.pool.cached),
            "cache_blocks_total": self.pool.num_blocks,
        }

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The chat template's ids for these messages. An assistant message that is an answer this
        engine generated is spelled with the ids it was generated as (re-encoding its text may split it
        differently), so the next turn of a chat starts with exactly the tokens already cached."""
        return self.tokenizer.chat_prompt(messages, answer_ids=self.answers.get)

    # -- the scheduler thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        # torch's thread count is per thread: take the one set where the engine was made. On the CPU
        # the decode steps leave one core to the event loop, which streams every token as it comes:
        # a parallel region whose second thread is descheduled waits for it at every barrier (on 2
        # cores a batch-1 step took twice as long with 2 threads as with 1). Prefill, which is
        # GEMM-bound and streams nothing, keeps every thread.
        self._prefill_threads = self._threads
        self._decode_threads = max(1, self._threads - 1) if self.device.type == "cpu" else self._threads
        while True:
            with self._wake:
                while not self._stop and not self.waiting and not self.running:
                    self._wake.wait()
                if self._stop:
                    break
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as e:  # a failed forward fails the requests in it, not the server
                log.exception("engine step failed")
                for seq in self.running:
                    self._finish(seq, error=e)
                self.running = []
        for seq in self.running:
            self._finish(seq, error=RuntimeError("the server is shutting down"))
        with self._wake:
            for req in self.waiting:
                req.push(RuntimeError("the server is shutting down"))
            self.waiting.clear()

    def _step(self) -> None:
        for seq in [s for s in self.running if s.req.cancelled]:
            self.running.remove(seq)
            self._finish(seq)
        new = self._admit()
        if new:
            torch.set_num_threads(self._prefill_threads)
            try:
                self._prefill(new)
            except Exception as e:  # the prompts in the failed forward fail; the running ones go on
                log.exception("prefill failed")
                for seq in new:
                    if not seq.req.finished:
                        self._finish(seq, error=e)
                self.running = [s for s in self.running if s not in new]
        if self.running:
            torch.set_num_threads(self._decode_threads)
            self._decode()

    def _admit(self) -> list[Sequence]:
        new = []
        with self._wake:
            while self.waiting and len(self.running) + len(new) < self.max_batch:
                req = self.waiting[0]
                if req.cancelled:
                    self.waiting.popleft()
                    continue
                seq = self._start(req)
                if seq is None:  # the pool cannot promise its blocks yet: it waits, in order
                    break
                self.waiting.popleft()
                new.append(seq)
        return new

    def _start(self, req: Request) -> Sequence | None:
        """A sequence for the request, holding its reused prefix blocks and a reservation for the rest,
        or None (nothing held) when the pool cannot promise them."""
        n, page = len(req.prompt), self.page
        max_new = min(req.params.max_tokens, self.max_model_len - n)
        # the last prompt token is always computed: its logits give the first new token
        shared, chain = self.pool.match_prefix(req.prompt, (n - 1) // page) if self.prefix_cache else ([], 0)
        need = -(-(n + max_new - 1) // page) - len(shared)
        if not self.pool.reserve(need):
            self.pool.release(shared)
            return None
        p = req.params
        sampling = SamplingConfig(
            do_sample=not p.greedy,
            temperature=p.temperature if not p.greedy else 1.0,
            top_p=p.top_p,
            top_k=p.top_k,
            repetition_penalty=p.repetition_penalty,
        )
        generator = None
        if p.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(p.seed)
        seq = Sequence(req, list(req.prompt), max_new, need, TextStream(self.tokenizer, p.stop), sampling, generator)
        seq.blocks, seq.cached, seq.published, seq.chain = shared, len(shared) * page, len(shared), chain
        req.cached_tokens = seq.cached
        return seq

    def _grow(self, seq: Sequence, tokens: int) -> None:
        """Allocates blocks until the sequence can hold `tokens` tokens."""
        while len(seq.blocks) * self.page < tokens:
            seq.blocks.append(self.pool.allocate())
            seq.reserve -= 1

    def _rows(self, seqs: list[Sequence]) -> None:
        width = max(len(s.blocks) for s in seqs)
        table = torch.zeros(len(seqs), width, dtype=torch.int32)
        for i, s in enumerate(seqs):
            table[i, : len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.int32)
        self.cache.set_rows(table, torch.tensor([s.cached for s in seqs], dtype=torch.int64))

    def _prefill(self, new: list[Sequence]) -> None:
        for seq in new:
            self._grow(seq, len(seq.tokens))
        self._rows(new)
        logits = prefill(self.model, self.cache, [s.tokens[s.cached :] for s in new])
        for seq in new:
            seq.cached = len(seq.tokens)
            self._publish(seq)
        self.running.extend(new)
        self._emit(new, logits)

    def _decode(self) -> None:
        seqs = self.running
        for seq in seqs:
            self._grow(seq, len(seq.tokens))
        self._rows(seqs)
        tokens = torch.tensor([s.tokens[-1] for s in seqs], dtype=torch.long, device=self.device)
        logits = self.model.forward_cached(tokens[:, None], self.cache)
        for seq in seqs:
            seq.cached += 1
            self._publish(seq)
        self._emit(list(seqs), logits)

    def _publish(self, seq: Sequence) -> None:
        """Publishes the sequence's newly filled blocks for prefix reuse."""
        full = seq.cached // self.page
        if not self.prefix_cache or full <= seq.published:
            return
        # the chain continues from the last published block: each token is hashed once
        hashes = block_hashes(seq.tokens, self.page, full, seq.published, seq.chain)
        for i, h in enumerate(hashes, seq.published):
            self.pool.publish(seq.blocks[i], h)
        seq.published, seq.chain = full, hashes[-1]

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Samples each sequence's next token, sends it, and retires the sequences that finished."""
        now = time.perf_counter()
        logits = logits.float()
        greedy = [i for i, s in enumerate(seqs) if not s.sampling.do_sample and s.sampling.repetition_penalty == 1.0]
        chosen = [0] * len(seqs)
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
                chosen[i] = t
        done = []
        for i, seq in enumerate(seqs):
            try:
                if i not in greedy:
                    chosen[i] = self._sample(seq, logits[i])
                out = self._token(seq, chosen[i], logits[i])
            except Exception as e:  # this request's own failure (sampling, detokenizing)
                log.exception("request %d failed", seq.req.id)
                done.append(seq)
                self._finish(seq, error=e)
                continue
            seq.last_time = now
            seq.req.push(out)
            if out.finish_reason is not None:
                done.append(seq)
                self._finish(seq, answer=out.finish_reason)
        if done:
            self.running = [s for s in self.running if s not in done]

    def _sample(self, seq: Sequence, row: torch.Tensor) -> int:
        seen = None
        if seq.sampling.repetition_penalty != 1.0:
            seen = torch.zeros(1, row.shape[-1], dtype=torch.bool, device=row.device)
            seen[0, seq.tokens] = True
        scores = process_logits(row[None], seq.sampling, seen)
        if not seq.sampling.do_sample:
            return int(scores.argmax(-1))
        return int(torch.multinomial(scores.softmax(-1), 1, generator=seq.generator))

    def _token(self, seq: Sequence, token: int, row: torch.Tensor) -> TokenOutput:
        seq.tokens.append(token)
        seq.generated += 1
        out = TokenOutput(token, "")
        if seq.params.logprobs is not None:
            lp = torch.log_softmax(row, -1)
            out.logprob = float(lp[token])
            if seq.params.logprobs > 0:
                top = torch.topk(lp, seq.params.logprobs)
                out.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
            else:
                out.top_logprobs = []
        if token in self.eos_ids and not seq.params.ignore_eos:
            out.finish_reason = "stop"
        else:
            out.text = seq.stream.add(token)
            if seq.stream.stopped:
                out.finish_reason = "stop"
            elif seq.generated >= seq.max_new:
                out.finish_reason = "length"
        if out.finish_reason is not None:
            out.text += seq.stream.finish()
        return out

    def _finish(self, seq: Sequence, error: BaseException | None = None, answer: str | None = None) -> None:
        """Releases the sequence's blocks; sends an error if it failed; remembers the ids of an answer
        whose text is exactly its tokens' (so the chat's next turn finds them cached)."""
        self.pool.release(seq.blocks, unreserve=seq.reserve)
        seq.blocks, seq.reserve = [], 0
        seq.req.finished = True
        if error is not None:
            seq.req.error = error
            seq.req.push(error)
        elif answer is not None and not seq.stream.stopped:
            ids = seq.tokens[len(seq.req.prompt) :]
            if ids and ids[-1] in self.eos_ids:
                ids = ids[:-1]
            self.answers[seq.stream.text] = ids
            self.answers.move_to_end(seq.stream.text)
            while len(self.answers) > 1024:
                self.answers.popitem(last=False)
