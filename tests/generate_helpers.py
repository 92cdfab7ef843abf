"""Shared by the generation, streaming and chat tests: small random models and a real tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from internlm_fast.data import Tokenizer, train_tokenizer
from internlm_fast.model import InternLMConfig, InternLMForCausalLM

from .model_helpers import TINY_CONFIG

SMALL = {**TINY_CONFIG, "vocab_size": 400, "intermediate_size": 160, "max_position_embeddings": 256}

# The tokenizer learns these characters as pieces; any other non-ASCII character is spelled in
# byte-fallback tokens, one per UTF-8 byte.
TRAINING_TEXTS = [
    "Hello world, the model answers questions about Python. def main():\n    return 0\n",
    "中文测试：你好，世界！我们在这里。",
    "emoji 😀 and more text about functions, classes and the tokenizer.",
]


def small_model(seed: int = 0, std: float = 0.3, **overrides) -> InternLMForCausalLM:
    """A random model whose logits are far from uniform (std 0.3), so greedy choices are clear-cut."""
    torch.manual_seed(seed)
    model = InternLMForCausalLM(InternLMConfig(**{**SMALL, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
    return model


def train_small_tokenizer(folder: Path, vocab_size: int = 400) -> Tokenizer:
    path = train_tokenizer(iter(TRAINING_TEXTS * 50), folder / "tokenizer.model", vocab_size=vocab_size)
    return Tokenizer(path)


@pytest.fixture
def one_thread():
    """These models are tiny: a second thread saves nothing, and on shared cores every parallel region
    can wait milliseconds for a time slice (it made these files 10x slower on a loaded 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
