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


def load_model(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    quantize: str | None = None,
) -> tuple[InternLMForCausalLM, Tokenizer]:
    """The model (in eval mode, on device, quantized with quantize="int8") and its tokenizer. Loaded for
    inference only: a bf16 model on the CPU comes in prepare_inference_'s layout, its linear weights
    held once."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    load = dict(dtype=dtype, device=device, quantize=quantize, inference=True)
    if (path / "config.json").is_file():
        return InternLMForCausalLM.from_pretrained(path, **load).eval(), Tokenizer.from_pretrained(path)
    if (path / "model.safetensors").is_file() and (path / "trainer.json").is_file():
        return InternLMForCausalLM.from_pretrained(path, **load).eval(), _checkpoint_tokenizer(path)
    raise ValueError(
        f"{path}: not a model folder: expected config.json (a saved model) or model.safetensors + "
        "trainer.json (a training checkpoint, runs/<job>/checkpoints/step-N)"
    )


def _checkpoint_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer a training checkpoint was trained with, as its training config names it."""
    cfg = config_from_dict(json.loads((path / "trainer.json").read_text())["config"])
    if cfg.data.tokenizer:
        return Tokenizer(cfg.data.tokenizer)
    if cfg.model.init_from and (Path(cfg.model.init_from) / "tokenizer.model").is_file():
        return Tokenizer(Path(cfg.model.init_from) / "tokenizer.model")
    if cfg.data.train == "builtin":
        vocab = cfg.model.build().vocab_size
        return Tokenizer(prepare_builtin_corpus(vocab_size=vocab, progress=False).tokenizer_path)
    raise ValueError(f"{path}/trainer.json names no tokenizer (data.tokenizer) and was not trained on 'builtin'")
