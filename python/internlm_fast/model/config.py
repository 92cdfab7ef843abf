"""InternLM model configuration, with Hugging Face's field names so config.json files map 1:1."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class InternLMConfig:
    vocab_size: int = 103168
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as attention heads (InternLM-7B)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    bias: bool = True  # bias on the q/k/v/o projections (InternLM); none in the MLP or head
    tie_word_embeddings: bool = False
    gradient_checkpointing: bool = False  # recompute each layer in the backward

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 8 or self.head_dim > 256:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 8 up to 256 (flash attention)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> InternLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


PRESETS: dict[str, dict] = {
    # InternLM-7B, the defaults of InternLMConfig
    "internlm-7b": {},
    # 4 layers, hidden 256: 7.4M parameters with an 8192 vocabulary; trains in minutes on 2 cores
    "tiny": dict(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        max_position_embeddings=1024,
    ),
    # 4 layers, hidden 128, a 1024 vocabulary: 1.1M parameters, the default CPU training run. At a
    # 10-minute budget on 2 cores it beats tiny: it runs several times the tokens per second and, on
    # the built-in corpus, learns no slower per step.
    "nano": dict(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=1024,
    ),
    # 8 layers, hidden 512: 33.7M parameters
    "small": dict(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        max_position_embeddings=2048,
    ),
    # 16 layers, hidden 2048, InternLM's vocabulary: 1.23B parameters (0.42B of them the embeddings
    # and the lm_head); head_dim 128 like InternLM-7B, so its attention runs the same kernels. The
    # GPU suite's training and decoding model (bench/gpu_suite.py)
    "1b": dict(
        vocab_size=103168,
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=16,
        num_attention_heads=16,
        max_position_embeddings=4096,
    ),
}


def preset(name: str, **overrides) -> InternLMConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return InternLMConfig(**{**PRESETS[name], **overrides})
