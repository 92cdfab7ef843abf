"""The generation methods of InternLMForCausalLM: model.generate, model.chat and model.stream_chat call
the functions of the same names here (modeling.GENERATION_API). `generate` is transformers' over
padded (batch, seqlen) tensors, on top of generate_ids; chat and stream_chat are InternLM's (chat.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from internlm_fast.model import InternLMForCausalLM

from .chat import chat, stream_chat
from .generate import GenerationConfig, generate_ids

__all__ = ["chat", "generate", "stream_chat"]


def _rows(input_ids: object, attention_mask: object) -> list[list[int]]:
    """Each row's tokens, its padding (mask 0, on either side) left out."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(
            f"input_ids must be an integer tensor (batch, seqlen), got "
            f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}"
        )
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids has batch 0: give at least one prompt")
    ids = input_ids.tolist()
    if attention_mask is None:
        return ids
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {shape}")
    mask = attention_mask.bool().tolist()
    return [[t for t, m in zip(row, keep) if m] for row, keep in zip(ids, mask)]


def generate(
    model: InternLMForCausalLM,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    stop_strings: Sequence[str] | str | None = None,
    tokenizer=None,
    kv_dtype: torch.dtype | str | None = None,
) -> Tensor:
    """input_ids followed by the new ids, (batch, seqlen + longest generation), as transformers
    returns them: a row that finished early (eos id included) is filled with pad_token_id (default: the
    first eos id, else 0). attention_mask marks padding, left or right; each row is generated from its
    own tokens only, and the new ids always follow the full input width."""
    rows = _rows(input_ids, attention_mask)
    if eos_token_id is None:
        eos_token_id = getattr(model.config, "eos_token_id", None)
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id,
        stop_strings=stop_strings,
        seed=seed,
        kv_dtype=kv_dtype,
    )
    if pad_token_id is None:
        pad_token_id = _first(eos_token_id)
    gens = generate_ids(model, rows, cfg, tokenizer)
    width = max((len(g.ids) for g in gens), default=0)
    new = torch.full((len(rows), width), pad_token_id, dtype=input_ids.dtype)
    for b, g in enumerate(gens):
        new[b, : len(g.ids)] = torch.tensor(g.ids, dtype=input_ids.dtype)
    return torch.cat([input_ids, new.to(input_ids.device)], dim=1)


def _first(eos: int | Sequence[int] | None) -> int:
    if eos is None:
        return 0
    return eos if isinstance(eos, int) else (list(eos) or [0])[0]
