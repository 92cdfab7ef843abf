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
    # transformers' rope_scaling: {"rope_type": "linear" | "dynamic", "factor": f >= 1} (legacy key "type"),
    # normalised to those two keys; None: the plain rotary embedding. See model/rope.py
    rope_scaling: dict | None = None
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
        self.rope_scaling = check_rope_scaling(self.rope_scaling)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def context_length(self) -> int:
        """The longest sequence the model accepts: max_position_embeddings, times the factor of a rope
        scaling (transformers sets no limit on dynamic scaling; past it, the scaled frequencies are as
        far out of training as unscaled ones past max_position_embeddings)."""
        if self.rope_scaling is None:
            return self.max_position_embeddings
        return int(self.max_position_embeddings * self.rope_scaling["factor"])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> InternLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


ROPE_SCALING_TYPES = ("linear", "dynamic")


def check_rope_scaling(value: object) -> dict | None:
    """rope_scaling as {"rope_type", "factor"}, or None for the plain rotary embedding. Accepts what
    transformers accepts for these types: rope_type (or the legacy "type"), a number factor >= 1, and
    keys these types do not read (rope_theta, ...)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"rope_scaling must be a dict like {{'rope_type': 'dynamic', 'factor': 2.0}}, got {value!r}")
    kind = value.get("rope_type", value.get("type"))
    if kind == "default" and "factor" not in value:
        return None
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(
            f"rope_scaling rope_type {kind!r} is not supported; choose one of {', '.join(ROPE_SCALING_TYPES)}"
        )
    if "factor" not in value:
        raise ValueError(f"rope_scaling of rope_type {kind!r} needs a factor")
    factor = value["factor"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1.0 or factor == float("inf"):
        raise ValueError(f"rope_scaling factor must be a finite number >= 1, got {factor!r}")
    if value.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("rope_scaling partial_rotary_factor is not supported (every dim of a head rotates)")
    return {"rope_type": kind, "factor": float(factor)}


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
