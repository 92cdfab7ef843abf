"""The built-in corpus: the Python standard library's own sources, present on every machine.

Gathered deterministically (sorted paths, a size cap filled in hash order), split by a hash of each
file's relative path into train and a held-out validation set, tokenized with a tokenizer trained on
the train split, and cached; a JSON manifest written last marks a complete cache, so a preparation
that was killed is redone rather than trusted.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from .token_file import TokenDataset, unigram_entropy
from .tokenize_corpus import tokenize_texts
from .tokenizer_trainer import train_tokenizer

MAX_CORPUS_BYTES = 10_000_000  # ~10 s to prepare on 2 cores; enough text for a small model
VAL_PER_MILLE = 30  # ~3% of the files are held out for validation
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
PYDOC_TOPICS = "pydoc_data/topics.py"
FORMAT_VERSION = 1  # bump when gathering, splitting or tokenizer settings change


@dataclass
class BuiltinCorpus:
    tokenizer_path: Path
    train_prefix: Path
    val_prefix: Path
    unigram_entropy: float  # nats per token of the train split on this tokenizer


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def candidate_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(relative path, path) of every stdlib .py file outside site-packages and test folders, sorted."""
    root = root or stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]  # prune: site-packages is huge
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath, name)
                out.append((path.relative_to(root).as_posix(), path))
    return sorted(out)


def _hash(tag: str, rel: str) -> str:
    return hashlib.sha256(f"{tag}:{rel}".encode()).hexdigest()


def _documents_of(rel: str, text: str) -> list[tuple[str, str]]:
    """A source file is one document; pydoc's topics.py, 0.75 MB of the language reference held in a
    dict of strings, becomes one prose document per topic (named topics.py#topic)."""
    if rel != PYDOC_TOPICS:
        return [(rel, text)]
    tree = ast.parse(text)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            return [(f"{rel}#{key}", doc) for key, doc in sorted(topics.items()) if doc.strip()]
    return [(rel, text)]


def gather_documents(root: Path | None = None, max_bytes: int = MAX_CORPUS_BYTES) -> list[tuple[str, str]]:
    """(name, text) of the corpus documents, sorted by name (a relative path).

    Documents are taken in the order of a hash of their name (a fixed pseudo-random order, so the cap
    keeps a spread of modules rather than the alphabetically first ones) while they fit in
    `max_bytes`; files that do not decode as UTF-8 are left out.
    """
    docs = []
    for rel, path in candidate_files(root):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            docs.extend(_documents_of(rel, text))
    chosen = []
    total = 0
    for name, text in sorted(docs, key=lambda d: _hash("select", d[0])):
        size = len(text.encode())
        if total + size <= max_bytes:
            chosen.append((name, text))
            total += size
    return sorted(chosen)


def is_validation(rel: str) -> bool:
    """Whether the file at this relative path is in the held-out validation split."""
    return int(_hash("val", rel)[:8], 16) % 1000 < VAL_PER_MILLE


def split_documents(docs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, validation) documents, split by a hash of the relative path."""
    val = [d for d in docs if is_validation(d[0])]
    train = [d for d in docs if not is_validation(d[0])]
    return train, val


def default_cache_root() -> Path:
    env = os.environ.get("INTERNLM_FAST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "internlm_fast"


def _fingerprint(vocab_size: int) -> str:
    """Changes when the stdlib files, the Python version or our settings change (stat only, fast)."""
    h = hashlib.sha256(f"v{FORMAT_VERSION} {sys.version} {vocab_size} {MAX_CORPUS_BYTES} {VAL_PER_MILLE}".encode())
    for rel, path in candidate_files():
        h.update(f"{rel}\0{path.stat().st_size}\0".encode())
    return h.hexdigest()


def prepare_builtin_corpus(
    cache_dir: str | Path | None = None, vocab_size: int = 8192, progress: bool = True
) -> BuiltinCorpus:
    """The built-in corpus, tokenized: prepared on first use (~10 s on 2 cores), then read from the cache.

    Lives in `cache_dir` (default `$INTERNLM_FAST_CACHE`, else `~/.cache/internlm_fast`) under
    `builtin-corpus-py{major}{minor}-v{vocab_size}`. Concurrent callers (e.g. several ranks) wait on a
    file lock, and the first one prepares it.
    """
    major, minor = sys.version_info[:2]
    folder = Path(cache_dir or default_cache_root()) / f"builtin-corpus-py{major}{minor}-v{vocab_size}"
    folder.mkdir(parents=True, exist_ok=True)
    corpus = BuiltinCorpus(folder / "tokenizer.model", folder / "train", folder / "val", float("nan"))
    manifest_path = folder / "manifest.json"
    fingerprint = _fingerprint(vocab_size)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = _read_manifest(manifest_path)
        if manifest is not None and manifest.get("fingerprint") == fingerprint and _readable(corpus):
            corpus.unigram_entropy = manifest["unigram_entropy"]
            return corpus
        manifest_path.unlink(missing_ok=True)
        _prepare(folder, corpus, vocab_size, progress)
        summary = {
            "fingerprint": fingerprint,
            "python": sys.version,
            "vocab_size": vocab_size,
            "unigram_entropy": corpus.unigram_entropy,
        }
        tmp = manifest_path.with_name("manifest.json.tmp")
        tmp.write_text(json.dumps(summary | _stats(corpus), indent=1))
        os.replace(tmp, manifest_path)
    return corpus


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _readable(corpus: BuiltinCorpus) -> bool:
    """Whether the cached files are all there and intact (cheap: headers and sizes only)."""
    try:
        TokenDataset(corpus.train_prefix)
        TokenDataset(corpus.val_prefix)
    except (OSError, ValueError):
        return False
    return corpus.tokenizer_path.is_file()


def _log(msg: str) -> None:
    print(f"[builtin corpus] {msg}", file=sys.stderr, flush=True)


def _prepare(folder: Path, corpus: BuiltinCorpus, vocab_size: int, progress: bool) -> None:
    start = time.perf_counter()
    docs = gather_documents()
    train, val = split_documents(docs)
    size = sum(len(t.encode()) for _, t in docs)
    _log(
        f"preparing Python {sys.version_info.major}.{sys.version_info.minor} stdlib sources in {folder}: "
        f"{len(docs)} documents, {size / 1e6:.1f} MB ({len(train)} train, {len(val)} validation)"
    )
    for stale in folder.iterdir():  # whatever an interrupted preparation left
        if stale.name != ".lock":
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    t = time.perf_counter()
    train_tokenizer(iter(text for _, text in train), corpus.tokenizer_path, vocab_size)
    _log(f"trained a {vocab_size}-token BPE tokenizer in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    for prefix, split in ((corpus.train_prefix, train), (corpus.val_prefix, val)):
        tokenize_texts(
            corpus.tokenizer_path,
            (text for _, text in split),
            prefix,
            progress=progress,
            total_chars=sum(len(text) for _, text in split),
        )
    corpus.unigram_entropy = unigram_entropy(TokenDataset(corpus.train_prefix))
    stats = _stats(corpus)
    _log(
        f"tokenized in {time.perf_counter() - t:.1f} s: {stats['train_tokens']} train and {stats['val_tokens']} "
        f"validation tokens, unigram entropy {corpus.unigram_entropy:.3f} nats; "
        f"ready in {time.perf_counter() - start:.1f} s"
    )


def _stats(corpus: BuiltinCorpus) -> dict:
    train, val = TokenDataset(corpus.train_prefix), TokenDataset(corpus.val_prefix)
    return {
        "train_docs": len(train),
        "train_tokens": train.num_tokens,
        "val_docs": len(val),
        "val_tokens": val.num_tokens,
    }
