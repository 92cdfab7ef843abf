"""The tiny model the tests share: every part of the architecture (several layers, several heads of
16 dims, an MLP wider than the hidden size) at a size that runs in Triton's interpreter and on two
CPU cores. Tests override single fields (`{**TINY_CONFIG, "num_key_value_heads": 2}` or
`tiny_config(num_key_value_heads=2)`) instead of keeping their own copy."""

from __future__ import annotations

from internlm_fast.model import PRESETS, InternLMConfig

# the nano preset (4 heads), cut down: every dimension smaller, 2 layers
TINY_CONFIG: dict[str, int] = {
    **PRESETS["nano"],
    **{"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2},
    "max_position_embeddings": 128,
}


def tiny_config(**overrides: object) -> InternLMConfig:
    """InternLMConfig of TINY_CONFIG with `overrides` set over it."""
    return InternLMConfig(**{**TINY_CONFIG, **overrides})
