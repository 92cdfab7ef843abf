"""Shared by the data tests: a small generated corpus and a real sentencepiece tokenizer trained on it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from internlm_fast.data import train_tokenizer

WORDS = (
    "the model learns to predict the next token from the tokens before it and a tokenizer splits text into "
    "pieces while the trainer packs documents into rows of fixed length with attention kept inside each document"
).split()
CODE = [
    "def {name}(x, y=None):\n    if y is None:\n        return x\n    return x + y\n",
    "class {Name}:\n    def __init__(self, value):\n        self.value = value\n\n    def __repr__(self):\n"
    '        return f"{Name}({{self.value!r}})"\n',
    "for i in range({n}):\n    total += i * {n}\nprint(total)\n",
]


def sample_texts(n_docs: int = 300, seed: int = 0) -> list[str]:
    """Deterministic prose + Python-like documents, with the chat markers in some of them."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        prose = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))).capitalize() + "."
        code = rng.choice(CODE).format(name=f"fn_{rng.choice(WORDS)}", Name=f"Thing{i % 7}", n=rng.randint(1, 999))
        chat = f"<|User|>:{rng.choice(WORDS)}?\n<|Bot|>:{rng.choice(WORDS)}.\n" if i % 5 == 0 else ""
        docs.append(f"{prose}\n\n{code}\n{chat}")
    return docs


def train_small_tokenizer(folder: Path, vocab_size: int = 600) -> Path:
    return train_tokenizer(iter(sample_texts()), folder / "small.model", vocab_size)


@pytest.fixture(scope="module")
def small_tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_small_tokenizer(tmp_path_factory.mktemp("tokenizer"))
