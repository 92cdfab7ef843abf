"""Train a sentencepiece tokenizer with InternLM's special tokens.

BPE, not unigram: on the built-in corpus (10 MB of Python sources, 2 cores) BPE trains over an order
of magnitude faster than unigram and compresses at least as well on identical settings, so it is the
better choice for code + prose here.

Settings chosen for code: no whitespace normalisation and no dummy prefix (text round-trips exactly,
indentation included), whitespace-only pieces (runs of indentation become one token), training
sentences are paragraphs that keep their newlines (so pieces like ":\\n" exist), digits split,
byte fallback (any text encodes, nothing becomes <unk>).
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from .documents import iter_texts
from .tokenizer import BOS, EOA, EOH, EOS, UNK

MAX_SENTENCE_BYTES = 4096  # training "sentences" are paragraphs cut to at most this many bytes
MIN_VOCAB_SIZE = 300  # 3 control + 2 user-defined + 256 byte pieces + some characters and merges


def train_tokenizer(
    inputs: Iterable[str | Path] | Iterator[str],
    output: str | Path,
    vocab_size: int = 8192,
    *,
    max_sentences: int = 200_000,
    txt_mode: str = "file",
    seed: int = 0,
    num_threads: int | None = None,
) -> Path:
    """Train a BPE sentencepiece model and write it to `output` (atomically); returns its path.

    `inputs` is either a list/tuple of .txt/.jsonl file paths, or an iterator (e.g. a generator)
    that yields document texts. Ids match InternLM: <unk> 0, <s> 1, </s> 2; <eoh> and <eoa> are
    user-defined single tokens. The training sample is at most `max_sentences` paragraphs, drawn by a
    seeded reservoir, so the result is deterministic for the same input and training time is capped
    (~3 s for the 10 MB built-in corpus on 2 cores).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (byte fallback takes 256), got {vocab_size}")
    if isinstance(inputs, (str, Path)):
        raise TypeError("inputs must be a list of file paths or an iterator of texts, not a single path or string")
    texts = inputs if isinstance(inputs, Iterator) else iter_texts(inputs, txt_mode)
    sentences = _sample(_paragraphs(texts), max_sentences, seed)
    if not sentences:
        raise ValueError("no training text in inputs")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            user_defined_symbols=[EOH, EOA],
            byte_fallback=True,
            character_coverage=0.9999,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=MAX_SENTENCE_BYTES * 2,
            input_sentence_size=0,  # already sampled above, deterministically
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training failed (vocab_size={vocab_size}): {e}") from None
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, output)
    return output


def _paragraphs(texts: Iterable[str]) -> Iterator[str]:
    """Training sentences: paragraphs (split at blank lines) with their inner newlines, long ones cut
    at line ends so each stays under MAX_SENTENCE_BYTES (sentencepiece drops longer sentences)."""
    for text in texts:
        for para in text.split("\n\n"):
            if len(para.encode()) <= MAX_SENTENCE_BYTES:
                if para.strip():
                    yield para
                continue
            chunk: list[str] = []
            size = 0
            for line in para.split("\n"):
                n = len(line.encode()) + 1
                if chunk and size + n > MAX_SENTENCE_BYTES:
                    yield "\n".join(chunk)
                    chunk, size = [], 0
                chunk.append(line[: MAX_SENTENCE_BYTES // 4])  # a line longer than this is cut
                size += min(n, MAX_SENTENCE_BYTES)
            if any(s.strip() for s in chunk):
                yield "\n".join(chunk)


def _sample(items: Iterator[str], k: int, seed: int) -> list[str]:
    """A seeded reservoir sample of at most k items, in input order (all of them when there are fewer)."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for i, item in enumerate(items):
        if i < k:
            reservoir.append((i, item))
        else:
            j = rng.randrange(i + 1)
            if j < k:
                reservoir[j] = (i, item)
    return [item for _, item in sorted(reservoir)]
