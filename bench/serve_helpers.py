"""The serving bench's model folder and server processes.

    folder = bench_model_dir()                       # the tiny preset, random, with a real tokenizer
    with running_server(folder, "--max-batch", "16") as base_url:      # "http://127.0.0.1:PORT"
        ...
    with running_server(folder, prefix_cache=False) as base_url: ...

The server runs as its own process (`python -m internlm_fast.serve`, --port 0) with THREADS torch
threads, as a user would start it; its output goes to a log file shown if it fails to start.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from internlm_fast.serve import process as serve_process

MODEL_NAME = "tiny-random"
THREADS = 2
START_TIMEOUT_S = 120
TOKENIZER_CORPUS_BYTES = 3_000_000  # enough stdlib text for an 8192-piece vocabulary, trained in ~1 s
FOLDER_VERSION = 1  # bump when the model or tokenizer recipe changes


def random_tiny_model(seed: int = 0, std: float = 0.3):
    """The tiny preset with weights far from a trained model's scale (matrices N(0, std)), so its logits
    are far from uniform and greedy choices are clear-cut rather than decided by rounding."""
    from internlm_fast.model import InternLMForCausalLM, preset

    torch.manual_seed(seed)
    model = InternLMForCausalLM(preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
    return model


def bench_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The bench's model folder (random tiny model + a sentencepiece tokenizer of 8192 pieces trained on
    stdlib sources), built once into `cache_dir` (default: internlm_fast's cache root) and reused."""
    from internlm_fast.data import Tokenizer, train_tokenizer
    from internlm_fast.data.builtin_corpus import default_cache_root, gather_documents

    root = Path(cache_dir or default_cache_root()) / f"bench-serve-v{FOLDER_VERSION}"
    folder = root / MODEL_NAME
    if (folder / "config.json").is_file() and (folder / "tokenizer.model").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="building-", dir=root))
    try:
        docs = gather_documents(max_bytes=TOKENIZER_CORPUS_BYTES)
        tok_path = train_tokenizer(iter(text for _, text in docs), staging / "tokenizer.model", vocab_size=8192)
        model = random_tiny_model()
        model.save_pretrained(staging / MODEL_NAME, tokenizer=Tokenizer(tok_path))
        try:
            os.replace(staging / MODEL_NAME, folder)  # atomic: a killed build leaves no half folder
        except OSError:
            if not (folder / "config.json").is_file():  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def running_server(model_dir: str | Path, *args: str, prefix_cache: bool = True, timeout: float = START_TIMEOUT_S):
    """The server on model_dir (THREADS threads) with extra CLI args, without prefix reuse if not
    `prefix_cache`: a context manager yielding the base URL (internlm_fast.serve.process)."""
    args = (*args, "--no-prefix-cache") if not prefix_cache else args
    return serve_process.running_server(model_dir, *args, threads=THREADS, timeout=timeout)
