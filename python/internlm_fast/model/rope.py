"""Rotary tables, with transformers' rope scalings (modeling_rope_utils.py).

The rotary kernels read cos/sin rows indexed by position. Without scaling and with linear scaling
(positions divided by the factor) one table serves every sequence: `rotary_tables`. Dynamic NTK
scaling makes the frequencies depend on the sequence length L seen by a forward: up to
max_position_embeddings the plain ones, past it those of the base

    rope_theta * (factor * L / max_position_embeddings - (factor - 1)) ** (d / (d - 2))

so a forward reaching past max_position_embeddings gets rows built for its own tokens:
`dynamic_rows` (one row per token, each at its position with its sequence's frequencies). What L is:

- a (batch, seqlen) forward: seqlen, as transformers (the batch's largest position + 1);
- a packed row: each document's own length, as if each ran alone (transformers would take the
  largest position of the row);
- a prefill: each prompt's length, cached prefix included; a decode step: each sequence's length
  after the step, so a token at position p gets the frequencies of p + 1 and cached keys keep the
  rotation they were written with, as in transformers' decoding, which however takes the batch's
  largest length for every sequence: the two agree at batch 1.

transformers keeps the frequencies of the longest forward seen until one falls back within
max_position_embeddings; ours depend on the forward alone. Tables are computed in fp64 and stored in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import InternLMConfig


def _inv_freq(config: InternLMConfig, device=None) -> Tensor:
    d = config.head_dim
    return 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)


def is_dynamic(config: InternLMConfig) -> bool:
    return config.rope_scaling is not None and config.rope_scaling["rope_type"] == "dynamic"


def rotary_tables(config: InternLMConfig, device=None) -> tuple[Tensor, Tensor]:
    """cos/sin (rows, head_dim / 2) in fp32, half-rotated layout: row p is position p. Rows: the
    model's context_length; with dynamic scaling, max_position_embeddings (longer forwards build
    their own rows with dynamic_rows)."""
    rows = config.max_position_embeddings if is_dynamic(config) else config.context_length
    positions = torch.arange(rows, dtype=torch.float64, device=device)
    if config.rope_scaling is not None and config.rope_scaling["rope_type"] == "linear":
        positions = positions / config.rope_scaling["factor"]
    angles = positions[:, None] * _inv_freq(config, device)
    return angles.cos().float(), angles.sin().float()


def needs_dynamic_rows(config: InternLMConfig, longest: int) -> bool:
    """Whether a forward whose longest sequence has `longest` tokens needs dynamic_rows."""
    return is_dynamic(config) and longest > config.max_position_embeddings


def dynamic_rows(config: InternLMConfig, positions: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin (tokens, head_dim / 2) in fp32 under dynamic scaling: row i rotates position
    positions[i] with the frequencies of a sequence of lengths[i] tokens."""
    d, m = config.head_dim, config.max_position_embeddings
    factor = config.rope_scaling["factor"]
    length = lengths.to(torch.float64)
    scaled = config.rope_theta * (factor * length / m - (factor - 1)) ** (d / (d - 2))
    base = torch.where(length > m, scaled, torch.full_like(scaled, config.rope_theta))
    exponents = torch.arange(0, d, 2, dtype=torch.float64, device=positions.device) / d
    angles = positions.to(torch.float64)[:, None] / base[:, None] ** exponents
    return angles.cos().float(), angles.sin().float()
