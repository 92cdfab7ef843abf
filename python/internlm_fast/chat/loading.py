"""Which model the terminal chat talks to, and how it is loaded.

`load_model` is the one place that reads a model folder: a saved model (config.json, through
InternLMForCausalLM.from_pretrained / Tokenizer.from_pretrained) or a training checkpoint
(runs/<job>/checkpoints/step-N: model.safetensors + trainer.json, whose training config names the
model shape and the tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from internlm_fast.data import Tokenizer, prepare_builtin_corpus
from internlm_fast.model import InternLMForCausalLM
from internlm_fast.train.checkpoint import latest_valid_checkpoint
from internlm_fast.train.config import TrainConfig, config_from_dict


def default_model_dir() -> Path | None:
    """The default training run's output (`python -m internlm_fast.train` with no arguments): its
    exported final/ folder if there is one, else its newest intact checkpoint, else None."""
    cfg = TrainConfig()
    final = cfg.log_folder / "final"
    if (final / "config.json").is_file():
        return final
    return latest_valid_checkpoint(cfg.checkpoint_folder)[0]


def load_model(path: str | Path, dtype: torch.dtype | None = None) -> tuple[InternLMForCausalLM, Tokenizer]:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if (path / "config.json").is_file():
        if not hasattr(InternLMForCausalLM, "from_pretrained"):
            raise ValueError(f"{path} is a saved model folder, which needs InternLMForCausalLM.from_pretrained")
        kwargs = {} if dtype is None else {"dtype": dtype}
        return InternLMForCausalLM.from_pretrained(path, **kwargs).eval(), Tokenizer.from_pretrained(path)
    if (path / "model.safetensors").is_file() and (path / "trainer.json").is_file():
        return _load_training_checkpoint(path, dtype)
    raise ValueError(
        f"{path}: not a model folder: expected config.json (a saved model) or model.safetensors + "
        "trainer.json (a training checkpoint, runs/<job>/checkpoints/step-N)"
    )


def _load_training_checkpoint(path: Path, dtype: torch.dtype | None) -> tuple[InternLMForCausalLM, Tokenizer]:
    from safetensors.torch import load_file

    cfg = config_from_dict(json.loads((path / "trainer.json").read_text())["config"])
    model = InternLMForCausalLM(cfg.model.build())
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{path}/model.safetensors does not fit its config: missing {missing}, extra {unexpected}")
    if dtype is not None and dtype != torch.float32:
        cos, sin = model.rotary_cos, model.rotary_sin  # positions need fp32 tables
        model.to(dtype)
        model.rotary_cos, model.rotary_sin = cos, sin
    if cfg.data.tokenizer:
        tokenizer_path = Path(cfg.data.tokenizer)
    elif cfg.data.train == "builtin":
        tokenizer_path = prepare_builtin_corpus(vocab_size=model.config.vocab_size, progress=False).tokenizer_path
    else:
        raise ValueError(f"{path}/trainer.json names no tokenizer (data.tokenizer) and was not trained on 'builtin'")
    return model.eval(), Tokenizer(tokenizer_path)
