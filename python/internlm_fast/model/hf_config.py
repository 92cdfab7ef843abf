"""config.json <-> InternLMConfig: transformers' LLaMA and InternLM's own (model_type internlm) configs,
and the model config of our trainer checkpoints (trainer.json)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .config import InternLMConfig, check_rope_scaling, preset

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_FIELDS = {f.name for f in dataclasses.fields(InternLMConfig)}


def config_to_hf(config: InternLMConfig, dtype: torch.dtype, bos_token_id: int = 1, eos_token_id: int = 2) -> dict:
    """config.json of transformers' LlamaForCausalLM computing the same function (attention_bias for
    InternLM's q/k/v/o biases). rope_theta is written both top-level (transformers 4) and in
    rope_parameters (transformers 5), and so is a rope scaling (rope_scaling, rope_parameters)."""
    dtype_name = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    scaling = config.rope_scaling or {"rope_type": "default"}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
        "rope_parameters": {**scaling, "rope_theta": config.rope_theta},
        "attention_bias": config.bias,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


def transformers_config(config: InternLMConfig, **overrides: object):
    """transformers' LlamaConfig computing the same function as `config` (config_to_hf's fields), to
    build a LlamaForCausalLM in memory beside ours; `overrides` (attn_implementation="sdpa") win."""
    import transformers

    fields = config_to_hf(config, torch.float32)
    for key in ("architectures", "model_type", "torch_dtype", "dtype"):  # a file's keys, not a model's
        del fields[key]
    return transformers.LlamaConfig(**{**fields, **overrides})


def config_from_hf(d: dict, where: str) -> InternLMConfig:
    """InternLMConfig of a LLaMA (model_type llama) or InternLM (model_type internlm) config.json.
    `where` names the file in error messages."""
    model_type = d.get("model_type")
    if model_type not in ("llama", "internlm"):
        raise ValueError(
            f"{where}: model_type {model_type!r} is not supported; this reads LLaMA ('llama') and InternLM "
            "('internlm') checkpoints"
        )
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (only silu / SwiGLU)")
    if d.get("mlp_bias", False):
        raise ValueError(f"{where}: mlp_bias true is not supported (InternLM has no MLP bias)")
    heads = d["num_attention_heads"]
    if d.get("head_dim") not in (None, d["hidden_size"] // heads):
        raise ValueError(f"{where}: head_dim {d['head_dim']} != hidden_size / num_attention_heads is not supported")
    rope = d.get("rope_parameters") or {}
    rotary = (d.get("rotary") if model_type == "internlm" else None) or {}
    try:
        scaling = check_rope_scaling(d.get("rope_scaling") or _internlm_rotary(rotary) or rope or None)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    theta = rope.get("rope_theta", d.get("rope_theta", rotary.get("base", 10000.0)))
    bias = d.get("bias", True) if model_type == "internlm" else d.get("attention_bias", False)
    try:
        return InternLMConfig(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rope_scaling=scaling,
            bias=bool(bias),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None


def _internlm_rotary(rotary: dict) -> dict | None:
    """rope_scaling of InternLM's config field rotary = {"base", "type": "origin" | "dynamic",
    "scaling_factor"}; its dynamic type is transformers' dynamic NTK scaling."""
    kind = rotary.get("type")
    if kind in (None, "origin"):
        return None
    if kind != "dynamic":
        raise ValueError(f"rotary type {kind!r} is not supported; InternLM's are 'origin' and 'dynamic'")
    return {"rope_type": "dynamic", "factor": rotary.get("scaling_factor", 1.0)}


def config_from_trainer_state(state: dict, where: str) -> InternLMConfig:
    """The model config of a trainer checkpoint's trainer.json: the `model_config` it records, or
    (older checkpoints) the preset and fields of its training config."""
    if isinstance(state.get("model_config"), dict):
        values = {k: v for k, v in state["model_config"].items() if k in _FIELDS}
        return InternLMConfig(**{**values, "gradient_checkpointing": False})
    model = (state.get("config") or {}).get("model")
    if not isinstance(model, dict) or "preset" not in model:
        raise ValueError(f"{where}: no model config (expected 'model_config' or 'config.model.preset')")
    fields = {k: v for k, v in model.items() if k in _FIELDS and k != "gradient_checkpointing"}
    return preset(model["preset"], **fields)


def read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d


def dtype_from_name(name: str | torch.dtype | None) -> torch.dtype | None:
    """torch dtype of 'bf16' / 'bfloat16' / 'fp32' / 'float32' / 'fp16' / 'float16' (or a dtype, or None)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    aliases = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "half": "float16", "float": "float32"}
    canonical = aliases.get(name.lower(), name.lower())
    for dtype, dtype_name in DTYPE_NAMES.items():
        if dtype_name == canonical:
            return dtype
    raise ValueError(f"dtype {name!r} is not one of bf16, fp16, fp32")
