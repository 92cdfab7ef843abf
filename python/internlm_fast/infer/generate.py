"""Batched KV-cache generation in which every sequence finishes on its own.

`generate_steps` is the loop: one packed prefill of all prompts, then one decode step per token for
the sequences still running. A sequence finishes at one of its eos ids (kept in its ids, as
transformers keeps it), at a stop string (needs a tokenizer), after max_new_tokens, or when it fills
the model's context (config.context_length: max_position_embeddings, times a rope scaling's factor);
it then leaves the decode batch and its cache row is reused. Prompts longer than PREFILL_CHUNK tokens
in all are prefilled in chunks of at most that many tokens, so activation memory stays bounded.
`generate_ids`, `generate_text` and `stream_text` are the loop's common uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from internlm_fast.model import InternLMForCausalLM
from internlm_fast.ops.inference import inference_kernels

from .cache_storage import KVCache, check_kv_dtype
from .sampling import SamplingConfig, make_generator, select_tokens
from .streaming import TextStream, check_stop_strings

PREFILL_CHUNK = 2048  # the most prompt tokens one prefill forward runs


@dataclass
class GenerationConfig(SamplingConfig):
    max_new_tokens: int = 20
    eos_token_id: int | Sequence[int] | None = None
    stop_strings: Sequence[str] | str | None = None
    kv_dtype: torch.dtype | str | None = None  # the KV cache's dtype (None: the model's); bf16 halves it

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kv_dtype is not None:
            self.kv_dtype = check_kv_dtype(self.kv_dtype)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        self.stop_strings = check_stop_strings(self.stop_strings)
        self.eos_ids = _eos_set(self.eos_token_id)


def _eos_set(eos: int | Iterable[int] | None) -> frozenset[int]:
    if eos is None:
        return frozenset()
    ids = [eos] if isinstance(eos, int) else list(eos)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError(f"eos_token_id must be a non-negative int or a list of them, got {eos!r}")
    return frozenset(ids)


@dataclass
class Step:
    """One generated token of sequence `row`."""

    row: int
    token: int
    text: str = ""  # the text this token completes (with a tokenizer; "" while a character is incomplete)
    finish_reason: str | None = None  # "eos", "stop_string" or "length" on the sequence's last token


@dataclass
class Generation:
    ids: list[int] = field(default_factory=list)  # new ids, the eos id that ended it included
    text: str = ""  # with a tokenizer: the decoded new ids, cut before a stop string
    finish_reason: str | None = None


def check_prompts(model: InternLMForCausalLM, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token id lists")
    limit, vocab = model.config.context_length, model.config.vocab_size
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise ValueError(f"prompt {i} is empty: give at least one token (for example the <s> id)")
        if len(p) > limit:
            c = model.config
            scaled = f" times the rope_scaling factor: {limit}" if c.rope_scaling else ""
            raise ValueError(
                f"prompt {i} has {len(p)} tokens, more than max_position_embeddings {c.max_position_embeddings}{scaled}"
            )
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab})")
        out.append(p)
    return out


def prefill(model: InternLMForCausalLM, cache: KVCache, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Runs the prompts (one per cache row, from the first) into the cache rows, after the tokens each
    row already caches (none, or a reused prefix), as packed rows, no padding: one forward, or with
    more than PREFILL_CHUNK tokens in all, forwards of at most PREFILL_CHUNK tokens, each after what
    its rows cache by then. Returns the logits after each prompt's last token, (prompts, vocab). Under
    torch.inference_mode()."""
    device = cache.lens.device
    lengths = [len(p) for p in prompts]
    if sum(lengths) <= PREFILL_CHUNK:
        return _prefill_packed(model, cache, [list(p) for p in prompts], None)
    table, lens = cache.block_table, cache.lens.clone()
    # every chunk rotates with its whole sequence's length, as one prefill would (dynamic rope scaling)
    totals = [n + c for n, c in zip(lengths, lens[: len(prompts)].tolist())]
    done = [0] * len(prompts)
    logits: list[torch.Tensor | None] = [None] * len(prompts)
    try:
        while any(d < n for d, n in zip(done, lengths)):
            rows, pieces, room = [], [], PREFILL_CHUNK
            for b, p in enumerate(prompts):
                take = min(lengths[b] - done[b], room)
                if take > 0:
                    rows.append(b)
                    pieces.append(list(p[done[b] : done[b] + take]))
                    room -= take
            index = torch.tensor(rows, device=device)
            cache.set_rows(table[index], lens[index])  # the rows of this chunk, first
            out = _prefill_packed(model, cache, pieces, [totals[b] for b in rows])
            lens[index] = cache.lens
            for slot, (b, piece) in enumerate(zip(rows, pieces)):
                done[b] += len(piece)
                if done[b] == lengths[b]:
                    logits[b] = out[slot]
    finally:
        cache.set_rows(table, lens)
    return torch.stack(logits)


def _prefill_packed(
    model: InternLMForCausalLM, cache: KVCache, pieces: list[list[int]], rope_lengths: list[int] | None
) -> torch.Tensor:
    device = cache.lens.device
    ids = torch.tensor([[t for p in pieces for t in p]], dtype=torch.long, device=device)
    cu = torch.zeros(len(pieces) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor([len(p) for p in pieces]).cumsum(0)
    return model.forward_cached(ids, cache, cu.to(device), rope_lengths=rope_lengths)


def decode(model: InternLMForCausalLM, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """One decode step: tokens (cache.batch,) int64, one per live sequence. Returns the logits after
    them, (batch, vocab). Under torch.inference_mode()."""
    return model.forward_cached(tokens[:, None], cache)


def generate_steps(
    model: InternLMForCausalLM, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, tokenizer=None
) -> Iterator[list[Step]]:
    """Yields, per decoding step, the new token of every sequence still running. The arguments are
    checked here, before the first step."""
    prompts = check_prompts(model, prompts)
    if cfg.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text (pass tokenizer=...)")
    return _steps(model, prompts, cfg, tokenizer) if cfg.max_new_tokens > 0 else iter(())


def _steps(
    model: InternLMForCausalLM, prompts: list[list[int]], cfg: GenerationConfig, tokenizer
) -> Iterator[list[Step]]:
    limit = model.config.context_length
    # a sequence may reach the context length; the last token is never fed back, so one position
    # fewer is cached
    budget = [min(cfg.max_new_tokens, limit - len(p) + 1) for p in prompts]
    with torch.inference_mode():
        longest = max(len(p) + n - 1 for p, n in zip(prompts, budget))
        cache = KVCache.for_model(model, len(prompts), longest, cfg.kv_dtype)
        device = cache.lens.device
        generator = make_generator(cfg.seed, device)
        argmax = inference_kernels(cache.lens).argmax
        seen = None
        if cfg.repetition_penalty != 1.0:
            seen = torch.zeros(len(prompts), model.config.vocab_size, dtype=torch.bool, device=device)
            for b, p in enumerate(prompts):
                seen[b, p] = True
        streams = [TextStream(tokenizer, cfg.stop_strings) for _ in prompts] if tokenizer is not None else None
        rows = list(range(len(prompts)))  # the sequence of each live cache row
        produced = [0] * len(prompts)
        logits = prefill(model, cache, prompts)
        while True:
            tokens = select_tokens(logits, cfg, seen, generator, argmax)
            if seen is not None:
                seen[torch.arange(len(rows), device=seen.device), tokens] = True
            steps, keep = [], []
            for slot, (row, token) in enumerate(zip(rows, tokens.tolist())):
                produced[row] += 1
                step = Step(row, token)
                if token in cfg.eos_ids:
                    step.finish_reason = "eos"
                elif streams is not None:
                    step.text = streams[row].add(token)
                    if streams[row].stopped:
                        step.finish_reason = "stop_string"
                if step.finish_reason is None and produced[row] >= budget[row]:
                    step.finish_reason = "length"
                if streams is not None and step.finish_reason is not None:
                    step.text += streams[row].finish()
                if step.finish_reason is None:
                    keep.append(slot)
                steps.append(step)
            yield steps
            if not keep:
                return
            if len(keep) < len(rows):
                cache.keep(keep)
                rows = [rows[s] for s in keep]
                index = torch.tensor(keep, device=tokens.device)
                tokens = tokens[index]
                if seen is not None:
                    seen = seen[index]
            logits = decode(model, cache, tokens)


def generate_ids(
    model: InternLMForCausalLM, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, tokenizer=None
) -> list[Generation]:
    """Generates for every prompt (a batch); returns each sequence's new ids (and text with a tokenizer)."""
    out = [Generation() for _ in prompts]
    for steps in generate_steps(model, prompts, cfg, tokenizer):
        for s in steps:
            g = out[s.row]
            g.ids.append(s.token)
            g.text += s.text
            g.finish_reason = s.finish_reason
    return out


def generate_text(
    model: InternLMForCausalLM, tokenizer, prompt_ids: Sequence[int], cfg: GenerationConfig
) -> Generation:
    return generate_ids(model, [prompt_ids], cfg, tokenizer)[0]


def stream_text(
    model: InternLMForCausalLM, tokenizer, prompt_ids: Sequence[int], cfg: GenerationConfig
) -> Iterator[str]:
    """Text deltas of one sequence as they are generated; never a partial character or any part
    of a stop string."""
    for steps in generate_steps(model, [prompt_ids], cfg, tokenizer):
        if steps[0].text:
            yield steps[0].text


def generate_tokens(
    model: InternLMForCausalLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_p: float = 0.8,
    stop_ids: Iterable[int] = (),
    seed: int = 0,
) -> list[int]:
    """The new token ids sampled after prompt_ids, the stop token (if reached) left out; temperature 0
    is greedy. (The trainer's end-of-run sample.)"""
    greedy = temperature == 0
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=1.0 if greedy else temperature,
        top_p=top_p,
        eos_token_id=list(stop_ids),
        seed=seed,
    )
    g = generate_ids(model, [prompt_ids], cfg)[0]
    return g.ids[:-1] if g.finish_reason == "eos" else g.ids
