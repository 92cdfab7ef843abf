"""Logits processing and token selection, with transformers' semantics.

Order as in transformers' generate: repetition penalty, then (sampling only) temperature, top-k,
top-p, then a draw from the softmax; greedy takes the argmax after the penalty. Every function works
on a (batch, vocab) fp32 tensor, one row per live sequence, and matches the transformers logits
processor of the same name (tests/test_generate_sampling.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: torch's global generator

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {type(self.do_sample).__name__}")
        _number("temperature", self.temperature, lambda v: v > 0, "> 0")
        _number("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1]")
        _number("repetition_penalty", self.repetition_penalty, lambda v: v > 0, "> 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")


def _number(name: str, value: object, ok, rule: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or not ok(value):
        raise ValueError(f"{name} must be a number {rule}, got {value!r}")


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: the logit of every token already in the
    sequence (seen, a (batch, vocab) bool mask) is divided by the penalty when positive and
    multiplied by it when negative."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: Tensor, top_k: int) -> Tensor:
    """transformers' TopKLogitsWarper: everything below the k-th largest logit becomes -inf."""
    k = min(max(top_k, 1), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, top_p: float) -> Tensor:
    """transformers' TopPLogitsWarper: keeps the most likely tokens whose probabilities sum to top_p
    (the one that crosses it included, and always at least one); the rest become -inf."""
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= 1 - top_p
    remove[..., -1] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def process_logits(logits: Tensor, cfg: SamplingConfig, seen: Tensor | None) -> Tensor:
    """The logits a token is selected from: the penalty, then the sampling warpers."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if not cfg.do_sample:
        return logits
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k > 0:
        logits = apply_top_k(logits, cfg.top_k)
    if cfg.top_p < 1.0:
        logits = apply_top_p(logits, cfg.top_p)
    return logits


def select_tokens(
    logits: Tensor,
    cfg: SamplingConfig,
    seen: Tensor | None = None,
    generator: torch.Generator | None = None,
    argmax: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The next token of every row, (batch,) int64: argmax, or a draw when cfg.do_sample. `argmax`
    replaces torch.argmax(scores, -1) (the decoder passes its kernel's)."""
    scores = process_logits(logits, cfg, seen)
    if not cfg.do_sample:
        return scores.argmax(dim=-1) if argmax is None else argmax(scores)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)[:, 0]


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)
