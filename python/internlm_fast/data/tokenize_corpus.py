"""Tokenize .txt/.jsonl files (or in-memory texts) into a token file set, on all cores.

Documents go to worker processes in chunks and come back in order, so the output is identical for
any number of workers. Pretraining documents become <s> text </s>; SFT conversations go through the
chat template and carry a loss mask. A malformed line stops everything (nothing is written) unless
`skip_bad_lines`, which skips and counts it.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .documents import CHAT, TEXT, MalformedLineError, Record, check_input_paths, iter_records, parse_record
from .token_file import TokenFileWriter
from .tokenizer import Tokenizer

# one worker task: enough work to amortise the inter-process copy, small enough to spread over workers
CHUNK_BYTES = 1 << 20
CHUNK_RECORDS = 512
MAX_REPORTED_BAD_LINES = 10


@dataclass
class TokenizeStats:
    output: Path
    num_docs: int
    num_tokens: int
    has_loss_mask: bool
    seconds: float
    skipped_bad_lines: int = 0
    bad_line_messages: list[str] = field(default_factory=list)  # the first few, for the report

    def summary(self) -> str:
        kind = "SFT (with loss mask)" if self.has_loss_mask else "pretraining"
        s = f"wrote {self.output}.bin/.idx: {self.num_docs} {kind} documents, {self.num_tokens} tokens"
        s += f" in {self.seconds:.1f} s"
        if self.skipped_bad_lines:
            s += f"; skipped {self.skipped_bad_lines} bad lines"
        return s


def tokenize_files(
    tokenizer_path: str | Path,
    inputs: Iterable[str | Path],
    output: str | Path,
    workers: int | None = None,
    skip_bad_lines: bool = False,
    progress: bool = True,
    txt_mode: str = "file",
) -> TokenizeStats:
    """Tokenize .txt and .jsonl files into PREFIX `output` (see token_file.py).

    `.txt`: one document per file (`txt_mode="file"`), per non-blank line ("line") or per blank-line
    separated paragraph ("paragraph"). `.jsonl`: one `{"text": ...}` or `{"messages": [...]}` per line;
    text and messages may not be mixed in one output. Raises MalformedLineError (`file:line: what`)
    on a bad line unless `skip_bad_lines`.
    """
    paths = check_input_paths(inputs)
    total = sum(p.stat().st_size for p in paths)
    return _tokenize(tokenizer_path, iter_records(paths, txt_mode), output, workers, skip_bad_lines, progress, total)


def tokenize_texts(
    tokenizer_path: str | Path,
    texts: Iterable[str],
    output: str | Path,
    workers: int | None = None,
    progress: bool = True,
    total_chars: int | None = None,
) -> TokenizeStats:
    """Tokenize in-memory pretraining documents into PREFIX `output`."""
    records = (Record("<text>", i + 1, "txt", t) for i, t in enumerate(texts))
    return _tokenize(tokenizer_path, records, output, workers, False, progress, total_chars)


def _tokenize(
    tokenizer_path: str | Path,
    records: Iterator[Record],
    output: str | Path,
    workers: int | None,
    skip_bad_lines: bool,
    progress: bool,
    total: int | None,
) -> TokenizeStats:
    start = time.perf_counter()
    tokenizer = Tokenizer(tokenizer_path)
    workers = max(1, workers or os.cpu_count() or 1)
    writer: TokenFileWriter | None = None
    first_kind: tuple[str, str] | None = None  # (kind, where) of the first document
    bad: list[str] = []
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not (progress and sys.stderr.isatty()))
    try:
        for results in _run_chunks(tokenizer.model_path, _chunks(records), workers):
            for kind, where, tokens, mask, size in results:
                bar.update(size)
                if kind == "bad":
                    if not skip_bad_lines:
                        raise MalformedLineError(where)
                    bad.append(where)
                    continue
                if first_kind is None:
                    first_kind = (kind, where)
                    writer = TokenFileWriter(output, tokenizer.vocab_size, has_loss_mask=kind == CHAT)
                elif kind != first_kind[0]:
                    raise ValueError(
                        f"{where}: {_describe(kind)} document, but {first_kind[1]} was {_describe(first_kind[0])}; "
                        "one output holds one kind (tokenize them into separate outputs)"
                    )
                writer.add(tokens, mask)
        if writer is None:
            raise ValueError("no documents in the inputs" + (f" ({len(bad)} bad lines skipped)" if bad else ""))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    writer.close()
    return TokenizeStats(
        output=Path(output),
        num_docs=writer.num_docs,
        num_tokens=writer.num_tokens,
        has_loss_mask=writer.has_loss_mask,
        seconds=time.perf_counter() - start,
        skipped_bad_lines=len(bad),
        bad_line_messages=bad[:MAX_REPORTED_BAD_LINES],
    )


def _describe(kind: str) -> str:
    return "an SFT ('messages')" if kind == CHAT else "a pretraining ('text')"


def _chunks(records: Iterator[Record]) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    size = 0
    for rec in records:
        chunk.append(rec)
        size += len(rec.payload)
        if size >= CHUNK_BYTES or len(chunk) >= CHUNK_RECORDS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _run_chunks(model_path: Path, chunks: Iterator[list[Record]], workers: int) -> Iterator[list[tuple]]:
    """Encoded chunks in input order; at most 2 chunks per worker in flight, so memory stays bounded."""
    if workers == 1:
        _init_worker(model_path)
        yield from map(_encode_chunk, chunks)
        return
    # fork: workers start at once and inherit the imports; they only run sentencepiece and json
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(model_path,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


_worker_tokenizer: Tokenizer | None = None


def _init_worker(model_path: Path) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_path)


def _encode_chunk(chunk: list[Record]) -> list[tuple]:
    """(kind, where, tokens, mask, payload size) per record; kind "bad" carries the error as `where`."""
    tok = _worker_tokenizer
    out = []
    for rec in chunk:
        try:
            kind, doc = parse_record(rec)
            if kind == TEXT:
                tokens, mask = tok.encode(doc, bos=True, eos=True), None
            else:
                tokens, mask = tok.encode_chat(doc)
        except MalformedLineError as e:
            out.append(("bad", str(e), None, None, len(rec.payload)))
            continue
        except ValueError as e:  # a conversation the chat template rejects (role, order)
            out.append(("bad", f"{rec.where}: {e}", None, None, len(rec.payload)))
            continue
        mask_arr = None if mask is None else np.asarray(mask, dtype=bool)
        out.append((kind, rec.where, np.asarray(tokens, dtype=np.uint32), mask_arr, len(rec.payload)))
    return out
