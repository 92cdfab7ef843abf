"""One conversion: load a source (memory-mapped), write a Hugging Face folder atomically."""

from __future__ import annotations

import ast
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from internlm_fast.model import PRESETS, InternLMConfig, preset
from internlm_fast.model.hf_config import config_from_hf, read_json
from internlm_fast.model.pretrained import (
    DEFAULT_MAX_SHARD_SIZE,
    atomic_output_folder,
    load_model_config,
    load_pretrained,
    save_pretrained,
)
from internlm_fast.model.quantize import check_quantize, quantize_loaded


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_source(src: Path) -> Path:
    """A run folder (runs/<job>) stands for its newest intact checkpoint; a trainer checkpoint must be
    intact (its checksums verify); anything else is used as it is."""
    from internlm_fast.train.checkpoint import latest_valid_checkpoint, verify_checkpoint

    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if src.is_dir() and not (src / "config.json").exists() and (src / "checkpoints").is_dir():
        newest, skipped = latest_valid_checkpoint(src / "checkpoints")
        for msg in skipped:
            _say(msg)
        if newest is None:
            raise FileNotFoundError(f"{src / 'checkpoints'} holds no intact checkpoint")
        _say(f"converting the newest checkpoint of {src}: {newest.name}")
        src = newest
    if (src / "trainer.json").is_file() and (src / "checksums.json").is_file():
        problem = verify_checkpoint(src)
        if problem is not None:
            raise ValueError(f"checkpoint {src} is not usable: {problem}")
    return src


def find_tokenizer(src: Path) -> Path | None:
    """The tokenizer belonging to a source: its tokenizer.model, or for a trainer checkpoint the one its
    training config names (the built-in corpus' tokenizer when it trained on that)."""
    if (src / "tokenizer.model").is_file():
        return src / "tokenizer.model"
    if not (src / "trainer.json").is_file():
        return None
    cfg = read_json(src / "trainer.json").get("config") or {}
    data = cfg.get("data") or {}
    if data.get("tokenizer"):
        path = Path(data["tokenizer"])
        if not path.is_file():
            raise FileNotFoundError(f"{src / 'trainer.json'} names tokenizer {path}, which is gone; use --tokenizer")
        return path
    if data.get("train") == "builtin":
        from internlm_fast.data import prepare_builtin_corpus

        vocab_size = load_model_config(src).vocab_size
        return prepare_builtin_corpus(vocab_size=vocab_size, progress=False).tokenizer_path
    return None


def parse_config(spec: str | None, overrides: Sequence[str] = ()) -> InternLMConfig | None:
    """A model config from a preset name, a config.json (HF LLaMA/InternLM or our field names) or a
    model folder, with `field=value` overrides; None when neither is given."""
    if spec is None and not overrides:
        return None
    if spec is None:
        raise ValueError("--set needs --config to start from (a preset name or a config.json)")
    if spec in PRESETS:
        config = preset(spec)
    else:
        path = Path(spec)
        if path.is_dir():
            config = load_model_config(path)
        elif path.is_file():
            d = read_json(path)
            config = config_from_hf(d, str(path)) if "model_type" in d else InternLMConfig.from_dict(d)
        else:
            raise ValueError(f"--config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing file")
    fields = {f.name for f in dataclasses.fields(InternLMConfig)}
    values = {}
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or key not in fields:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(fields))}")
        try:
            values[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            values[key] = raw
    base = config.to_dict()
    if "num_key_value_heads" not in values and base["num_key_value_heads"] == base["num_attention_heads"]:
        base["num_key_value_heads"] = None  # no GQA stays no GQA when the head count changes
    try:
        return InternLMConfig(**{**base, **values})
    except (ValueError, TypeError) as e:
        raise ValueError(f"--set: {e}") from None


def convert(
    src: str | Path,
    dst: str | Path,
    tokenizer: str | Path | None = None,
    config: InternLMConfig | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    progress: bool = True,
    quantize: str | None = None,
) -> Path:
    """Load `src` (any format load_pretrained reads) and write it to `dst` as a transformers LLaMA
    folder with its tokenizer; `dst` appears complete or not at all. quantize="int8": an int8 folder
    (model.quantized_folder) instead, quantized after the cast to `dtype` as from_pretrained(...,
    dtype, quantize="int8") does; an int8 source needs it (it is rewritten, not dequantized)."""
    check_quantize(quantize)
    src, dst = Path(src), Path(dst)
    src = resolve_source(src)
    if dst.exists() and dst.resolve() == src.resolve() and not force:
        raise FileExistsError(f"destination {dst} is the source; choose another destination")
    tok = Path(tokenizer) if tokenizer is not None else find_tokenizer(src)
    if tok is not None and not (tok.is_file() or (tok / "tokenizer.model").is_file()):
        raise FileNotFoundError(f"tokenizer {tok} not found (a sentencepiece .model or a folder with tokenizer.model)")
    with atomic_output_folder(dst, force=force) as tmp:
        model = load_pretrained(src, config=config, dtype=dtype if quantize else None)
        if model.quantization is not None and quantize is None:
            raise ValueError(
                f"{src} is an int8 folder: convert writes float folders from float sources; pass --quantize "
                f"{model.quantization} to rewrite it as an int8 folder"
            )
        with torch.device("meta"):
            n = sum(p.numel() for p in type(model)(model.config).parameters())
        written = dtype or model.model.embed_tokens.weight.dtype
        model = quantize_loaded(model, quantize)
        save_pretrained(model, tmp, max_shard_size=max_shard_size, tokenizer=tok, dtype=dtype, progress=progress)
    what = f"int8 linears, {written} elsewhere" if quantize else str(written)
    _say(f"wrote {dst} ({n / 1e6:.1f}M parameters, {what}{', tokenizer' if tok else ', no tokenizer'})")
    if tok is None:
        _say("note: no tokenizer found for the source; pass --tokenizer to include one")
    return dst
