"""Inference: sampling and generation."""

from .sampling import generate_tokens, sample_next_token

__all__ = ["generate_tokens", "sample_next_token"]
