"""OpenAI's response shapes: chat.completion(.chunk) and text_completion objects, usage, logprobs.

Token strings in logprobs are the tokenizer's pieces with sentencepiece's word marker turned back
into a space, so that the tokens of a choice concatenate to its text (decode([id]) alone would drop
a word's leading space); a byte-fallback piece reports its one byte in `bytes`; special tokens show
as their literal text ("<eoa>").
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid

from .batch import Batch, Choice
from .requests import TokenOutput

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenText:
    """Token id -> (string, UTF-8 bytes) for logprobs, cached: a vocabulary is small and fixed."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, list[int]]] = {}
        special = ("bos_id", "eos_id", "eoh_id", "eoa_id", "unk_id")
        self.special = {getattr(tokenizer, a) for a in special if isinstance(getattr(tokenizer, a, None), int)}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self.cache.get(token_id)
        if hit is None:
            hit = self.cache[token_id] = self._text(token_id)
        return hit

    def _text(self, token_id: int) -> tuple[str, list[int]]:
        sp = getattr(self.tokenizer, "sp", None)
        if sp is None or not 0 <= token_id < sp.GetPieceSize():
            text = self.tokenizer.decode([token_id])
            return text, list(text.encode())
        piece = sp.IdToPiece(token_id)
        if token_id in self.special:
            return piece, list(piece.encode())
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            b = bytes([int(m.group(1), 16)])
            return b.decode("utf-8", errors="replace"), list(b)
        text = piece.replace("\u2581", " ")
        return text, list(text.encode())


def _finite(lp: float | None) -> float | None:
    """JSON has no -Infinity (a token masked out by top-k/top-p); OpenAI and vLLM report -9999."""
    return None if lp is None else (lp if math.isfinite(lp) else -9999.0)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(batch: Batch) -> dict:
    out = {
        "prompt_tokens": batch.prompt_tokens,
        "completion_tokens": batch.completion_tokens,
        "total_tokens": batch.prompt_tokens + batch.completion_tokens,
    }
    cached = batch.cached_tokens
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def chat_logprobs(outputs: list[TokenOutput], token_text: TokenText) -> dict:
    """OpenAI chat's {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    content = []
    for out in outputs:
        text, raw = token_text(out.token_id)
        top = []
        for tid, lp in out.top_logprobs or ():
            t, b = token_text(tid)
            top.append({"token": t, "logprob": _finite(lp), "bytes": b})
        content.append({"token": text, "logprob": _finite(out.logprob), "bytes": raw, "top_logprobs": top})
    return {"content": content}


def completion_logprobs(outputs: list[TokenOutput], token_text: TokenText, offset: int) -> dict:
    """OpenAI completions' {tokens, token_logprobs, top_logprobs, text_offset}. top_logprobs holds
    the k likeliest and the chosen token (up to k + 1, as OpenAI documents); text_offset is each
    token's character offset in the choice's text, counting from `offset`."""
    tokens, logprobs, tops, offsets = [], [], [], []
    for out in outputs:
        text, _ = token_text(out.token_id)
        tokens.append(text)
        logprobs.append(_finite(out.logprob))
        top = {token_text(tid)[0]: _finite(lp) for tid, lp in out.top_logprobs or ()}
        if out.logprob is not None:
            top.setdefault(text, _finite(out.logprob))
        tops.append(top)
        offsets.append(offset)
        offset += len(out.text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


class ResponseBuilder:
    """The bodies of one API call; `chat` picks chat.completion over text_completion."""

    def __init__(self, batch: Batch, model: str, chat: bool, token_text: TokenText, with_logprobs: bool) -> None:
        self.batch = batch
        self.model = model
        self.chat = chat
        self.token_text = token_text
        self.with_logprobs = with_logprobs
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.offsets = {c.index: 0 for c in batch.choices}

    def _head(self, object: str) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model}

    def response(self) -> dict:
        choices = []
        for c in self.batch.choices:
            text = "".join(c.text)
            entry: dict = {"index": c.index}
            if self.chat:
                entry["message"] = {"role": "assistant", "content": text}
                entry["logprobs"] = chat_logprobs(c.outputs, self.token_text) if self.with_logprobs else None
            else:
                entry["text"] = text
                lp = completion_logprobs(c.outputs, self.token_text, 0) if self.with_logprobs else None
                entry["logprobs"] = lp
            entry["finish_reason"] = c.finish_reason
            choices.append(entry)
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._head(kind), "choices": choices, "usage": usage(self.batch)}

    # streaming ----------------------------------------------------------------------------------

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {**self._head(self._chunk_object), "choices": choices}
        if self.batch.body.include_usage:
            chunk["usage"] = None  # OpenAI: null on every chunk but the final usage-only one
        return chunk

    def role_chunks(self) -> list[str]:
        """Chat streams open each choice with a delta carrying only the role, as OpenAI does."""
        if not self.chat:
            return []
        delta = {"role": "assistant", "content": ""}
        return [
            sse(self._chunk([{"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}]))
            for c in self.batch.choices
        ]

    def token_chunk(self, choice: Choice, out: TokenOutput) -> str | None:
        """The chunk of one token; None when it carries nothing (text held back, no logprobs, not last)."""
        if not out.text and out.finish_reason is None and not self.with_logprobs:
            return None
        entry: dict = {"index": choice.index}
        if self.chat:
            entry["delta"] = {"content": out.text} if out.text else {}
            entry["logprobs"] = chat_logprobs([out], self.token_text) if self.with_logprobs else None
        else:
            entry["text"] = out.text
            lp = None
            if self.with_logprobs:
                lp = completion_logprobs([out], self.token_text, self.offsets[choice.index])
            entry["logprobs"] = lp
        self.offsets[choice.index] += len(out.text)
        entry["finish_reason"] = out.finish_reason
        return sse(self._chunk([entry]))

    def usage_chunk(self) -> str:
        return sse({**self._head(self._chunk_object), "choices": [], "usage": usage(self.batch)})


def sse(obj: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


DONE = sse("[DONE]")
