"""A tiny training corpus for trainer tests: a sentencepiece tokenizer and train/val token files made
from a few standard-library modules (the last one is the validation split)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from internlm_fast.data import tokenize_files, train_tokenizer

STDLIB_MODULES = ("argparse.py", "json/decoder.py", "textwrap.py", "shlex.py", "fractions.py", "heapq.py")


def make_corpus(folder: Path, modules: tuple[str, ...] = STDLIB_MODULES) -> dict[str, Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for n in modules:  # the tokenize command reads .txt (one document per file) and .jsonl
        files.append(folder / (n.replace("/", "_") + ".txt"))
        files[-1].write_text((stdlib / n).read_text())
    tok = train_tokenizer(files, folder / "tok.model", vocab_size=512)
    tokenize_files(tok, files[:-1], folder / "train", workers=1, progress=False)
    tokenize_files(tok, files[-1:], folder / "val", workers=1, progress=False)
    return {"tokenizer": tok, "train": folder / "train", "val": folder / "val"}
