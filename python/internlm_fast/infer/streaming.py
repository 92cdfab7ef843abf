"""Text of a sequence as it is generated: deltas that never split a character, and stop strings.

`IncrementalDetokenizer` turns token ids into text pieces as they arrive. Sentencepiece's byte
fallback spells a character it has no piece for as its UTF-8 bytes, one token each, so a prefix of
the ids can end inside a character and decode to a trailing U+FFFD: such a tail is held back until
the character completes. Each token is decoded within a short window of the tokens before it (as
transformers' TextIteratorStreamer and vLLM do), so the cost per token is constant and pieces that
decode differently at the start of a text (sentencepiece's dummy-prefix space) come out right.

`StopStringFilter` holds back any text that might be the beginning of a stop string, so what is
emitted never contains any part of one, and reports the first complete stop string.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were decoded into text already emitted
        self.read = 0

    def add(self, token: int) -> str:
        """The text that `token` completes ("" while a character is still incomplete)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is held back, at the end of generation (a byte sequence that never completed
        stays U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


def check_stop_strings(stop_strings: Iterable[str] | str | None) -> tuple[str, ...]:
    if stop_strings is None:
        return ()
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    out = tuple(stop_strings)
    for s in out:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop_strings must be non-empty strings, got {s!r}")
    return out


class StopStringFilter:
    def __init__(self, stop_strings: Sequence[str]) -> None:
        self.stop_strings = tuple(stop_strings)
        self.pending = ""  # received, not yet emitted: could still start a stop string
        self.stopped = False

    def _held(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def push(self, text: str) -> str:
        """The part of the text so far that can be emitted; sets `stopped` at the first stop string
        (the text before it is emitted, the stop string and anything after it never are)."""
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        keep = self._held(self.pending)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class TextStream:
    """A sequence's text deltas: detokenized incrementally, stop strings held back and cut."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()) -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        self.filter = StopStringFilter(stop_strings) if stop_strings else None
        self.text = ""

    @property
    def stopped(self) -> bool:
        return self.filter is not None and self.filter.stopped

    def _out(self, piece: str) -> str:
        if self.filter is not None:
            piece = self.filter.push(piece)
        self.text += piece
        return piece

    def add(self, token: int) -> str:
        return self._out(self.detok.add(token))

    def finish(self) -> str:
        piece = self._out(self.detok.flush())
        if self.filter is not None:
            tail = self.filter.flush()
            self.text += tail
            piece += tail
        return piece
