"""Conversion between our checkpoints, Hugging Face folders and InternLM training checkpoints:
`python -m internlm_fast.convert {to-hf,from-hf,from-internlm} SRC DST`. The loading and saving live in
internlm_fast.model.pretrained; this package resolves sources, tokenizers and configs for the CLI."""

from .convert import convert, find_tokenizer, parse_config

__all__ = ["convert", "find_tokenizer", "parse_config"]
