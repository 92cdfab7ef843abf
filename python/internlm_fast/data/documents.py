"""Input files -> documents: `.txt` (one document per file, line or paragraph) and `.jsonl`
(`{"text": ...}` for pretraining, `{"messages": [{"role", "content"}, ...]}` for SFT).

Reading (`iter_records`) only splits bytes, so it is cheap and runs in the main process; decoding and
JSON parsing (`parse_record`) are the costly part and run in the tokenize workers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

TXT_MODES = ("file", "line", "paragraph")
TEXT, CHAT = "text", "chat"  # document kinds: pretraining text, SFT conversation
_BLANK_LINES_RE = re.compile(rb"\n(?:[ \t\r\f\v]*\n)+")


class MalformedLineError(ValueError):
    """A line (or .txt file) that is not a valid document; the message is `file:line: what is wrong`."""


@dataclass(frozen=True)
class Record:
    """One unparsed document: where it comes from and its raw content."""

    source: str
    line: int  # 1-based line where the document starts
    fmt: str  # "txt" or "jsonl"
    payload: bytes | str
    last_without_newline: bool = False  # the file's final line, not ended by a newline: maybe truncated

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def check_input_paths(paths: Iterable[str | Path]) -> list[Path]:
    """The paths as Path objects; raises naming the first one that is missing or has an unknown suffix."""
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"input file not found: {p}")
        if p.suffix not in (".txt", ".jsonl"):
            raise ValueError(f"{p}: unsupported input type {p.suffix!r} (expected .txt or .jsonl)")
        out.append(p)
    if not out:
        raise ValueError("no input files given")
    return out


def iter_records(paths: Iterable[Path], txt_mode: str = "file") -> Iterator[Record]:
    """Raw documents of every file, in order. Blank .jsonl lines and blank .txt documents are skipped."""
    if txt_mode not in TXT_MODES:
        raise ValueError(f"txt_mode must be one of {', '.join(TXT_MODES)}, got {txt_mode!r}")
    for path in paths:
        data = path.read_bytes()
        src = str(path)
        if path.suffix == ".jsonl":
            lines = data.split(b"\n")
            last = len(lines) - 1
            for i, line in enumerate(lines):
                if line.strip():
                    yield Record(src, i + 1, "jsonl", line, last_without_newline=(i == last))
        elif txt_mode == "file":
            if data.strip():
                yield Record(src, 1, "txt", data)
        elif txt_mode == "line":
            for i, line in enumerate(data.split(b"\n")):
                if line.strip():
                    yield Record(src, i + 1, "txt", line)
        else:
            start, line = 0, 1  # line: the line number at byte `start`
            for m in [*_BLANK_LINES_RE.finditer(data), None]:
                end = m.start() if m else len(data)
                para = data[start:end]
                if para.strip():
                    yield Record(src, line + _leading_newlines(para), "txt", para.strip(b"\n"))
                if m:
                    line += data.count(b"\n", start, m.end())
                    start = m.end()


def _leading_newlines(b: bytes) -> int:
    return len(b) - len(b.lstrip(b"\n"))


def parse_record(rec: Record) -> tuple[str, str | list[dict]]:
    """(TEXT, text) or (CHAT, messages); raises MalformedLineError saying where and what is wrong."""
    try:
        text = rec.payload if isinstance(rec.payload, str) else rec.payload.decode("utf-8")
    except UnicodeDecodeError as e:
        line = rec.line + rec.payload.count(b"\n", 0, e.start)
        raise MalformedLineError(f"{rec.source}:{line}: not valid UTF-8 (byte {e.start} of the document)") from None
    if rec.fmt == "txt":
        return TEXT, text
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (last line has no newline: truncated file?)" if rec.last_without_newline else ""
        raise MalformedLineError(f"{rec.where}: invalid JSON: {e.msg} at column {e.colno}{hint}") from None
    if not isinstance(obj, dict):
        raise MalformedLineError(f"{rec.where}: expected a JSON object, got {type(obj).__name__}")
    if ("text" in obj) == ("messages" in obj):
        what = "both" if "text" in obj else "neither"
        raise MalformedLineError(f"{rec.where}: expected exactly one of the keys 'text' or 'messages', found {what}")
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise MalformedLineError(f"{rec.where}: 'text' must be a string, got {type(obj['text']).__name__}")
        return TEXT, obj["text"]
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise MalformedLineError(f"{rec.where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise MalformedLineError(f"{rec.where}: messages[{i}] must be an object with string 'role' and 'content'")
    return CHAT, messages


def iter_texts(paths: Iterable[str | Path], txt_mode: str = "file", skip_bad_lines: bool = False) -> Iterator[str]:
    """The plain text of every document (a conversation's message contents joined by newlines), for
    tokenizer training."""
    for rec in iter_records(check_input_paths(paths), txt_mode):
        try:
            kind, doc = parse_record(rec)
        except MalformedLineError:
            if skip_bad_lines:
                continue
            raise
        yield doc if kind == TEXT else "\n".join(m["content"] for m in doc)
