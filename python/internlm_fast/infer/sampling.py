"""Token sampling (temperature, nucleus/top-p) and a plain generation loop.

generate_tokens recomputes the whole prefix at every step: simple and exact, and fast enough for the
trainer's end-of-run sample on a small model. KV-cache generation is what serving uses.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def sample_next_token(
    logits: Tensor, temperature: float = 0.8, top_p: float = 0.8, generator: torch.Generator | None = None
) -> int:
    """One token id from the (vocab,) logits; temperature 0 means greedy."""
    if logits.dim() != 1:
        raise ValueError(f"logits must be 1-D (vocab,), got shape {tuple(logits.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
    keep = sorted_probs.cumsum(0) - sorted_probs < top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


@torch.no_grad()
def generate_tokens(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_p: float = 0.8,
    stop_ids: Iterable[int] = (),
    seed: int = 0,
) -> list[int]:
    """The new token ids sampled after prompt_ids (the stop token, if reached, is not included)."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty; give at least one token (for example the <s> id)")
    device = next(model.parameters()).device
    window = model.config.max_position_embeddings
    generator = torch.Generator(device="cpu").manual_seed(seed)
    stop, ids, new = set(stop_ids), list(prompt_ids), []
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            context = torch.tensor([ids[-window:]], device=device)
            logits = model(context).logits[0, -1].float().cpu()
            token = sample_next_token(logits, temperature, top_p, generator)
            if token in stop:
                break
            ids.append(token)
            new.append(token)
    finally:
        model.train(was_training)
    return new
