"""The sentencepiece tokenizer with InternLM's special tokens and chat template.

Works with a model trained by `train_tokenizer` and with the official InternLM `tokenizer.model`.

Chat template (InternLM-chat's), one turn:  ``<s><|User|>:{query}<eoh>\\n<|Bot|>:{answer}<eoa>\\n``.
A system message comes first as ``<s><|System|>:{content}\\n``; the first user turn then omits its own
``<s>`` (one sequence start, as InternLM's ``build_inputs`` does).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

BOS, EOS, UNK, EOH, EOA = "<s>", "</s>", "<unk>", "<eoh>", "<eoa>"
ROLES = ("system", "user", "assistant")
# literal special-token strings in text become their ids; the split keeps the delimiters
_SPECIAL_RE = re.compile(r"(<s>|</s>|<eoh>|<eoa>)")


class Tokenizer:
    """A sentencepiece model plus InternLM's special tokens and chat template.

    `pad_id` is the model's pad id when it defines one, else `unk_id` (0): a padded position is always
    masked out of the loss, so any valid id serves, and InternLM's own models define no pad piece.
    """

    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        if path.is_dir() and (path / "tokenizer.model").is_file():
            path = path / "tokenizer.model"  # a Hugging Face checkpoint folder
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.model_path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
        self.vocab_size: int = self.sp.GetPieceSize()
        self.unk_id: int = self.sp.unk_id()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.unk_id
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path}: the model defines no {BOS} or {EOS} token (bos_id/eos_id are -1)")
        missing = [p for p in (EOH, EOA) if self.sp.PieceToId(p) == self.unk_id]
        if missing:
            raise ValueError(f"{path}: the model has no {' or '.join(missing)} token; InternLM chat needs both")
        self.eoh_id: int = self.sp.PieceToId(EOH)
        self.eoa_id: int = self.sp.PieceToId(EOA)
        self._special_ids = {BOS: self.bos_id, EOS: self.eos_id, EOH: self.eoh_id, EOA: self.eoa_id}
        self._special_pieces = {i: p for p, i in self._special_ids.items()}

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """The tokenizer of a model folder (its tokenizer.model), or of a sentencepiece .model file."""
        path = Path(path)
        if path.is_dir() and not (path / "tokenizer.model").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.model")
        return cls(path)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write tokenizer.model, tokenizer_config.json and special_tokens_map.json into the folder
        `path`, so transformers' AutoTokenizer loads it (offline, without remote code)."""
        save_tokenizer_files(self.model_path, path)
        return Path(path)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"

    @property
    def stop_ids(self) -> set[int]:
        """Generation stops at either of these."""
        return {self.eos_id, self.eoa_id}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`; the literal strings <s>, </s>, <eoh>, <eoa> become their single ids
        (whether or not the sentencepiece model itself knows them as user-defined symbols)."""
        ids = [self.bos_id] if bos else []
        if "<" in text:
            for part in _SPECIAL_RE.split(text):
                if part in self._special_ids:
                    ids.append(self._special_ids[part])
                elif part:
                    ids.extend(self.sp.EncodeAsIds(part))
        elif text:
            ids.extend(self.sp.EncodeAsIds(text))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`; special tokens are dropped, or written as their literal strings when
        `skip_special` is False."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self._special_pieces:
                if run:
                    out.append(self.sp.DecodeIds(run))
                    run = []
                if not skip_special:
                    out.append(self._special_pieces[i])
            else:
                if not 0 <= i < self.vocab_size:
                    raise ValueError(f"token id {i} out of range for vocab_size {self.vocab_size}")
                run.append(i)
        if run:
            out.append(self.sp.DecodeIds(run))
        return "".join(out)

    def encode_chat(
        self, messages: Sequence[dict], answer_ids: Callable[[str], list[int] | None] | None = None
    ) -> tuple[list[int], list[bool]]:
        """Ids of a conversation in InternLM's chat template and its loss mask.

        The mask is True exactly on the tokens the model must learn to generate: each assistant
        answer and the <eoa> that ends it. The "\\n" after <eoa> is template glue that generation
        never produces (it stops at <eoa>), so it is masked out like the system and user parts.
        A conversation may end with a user message; the ids then end in "<|Bot|>:" (see chat_prompt).
        answer_ids(content), when given and not None, spells an assistant message instead of encoding
        its text (a server passes the ids it generated the answer as, which its KV cache holds).
        """
        _check_messages(messages)
        ids: list[int] = []
        mask: list[bool] = []

        def add(tokens: list[int], target: bool) -> None:
            ids.extend(tokens)
            mask.extend([target] * len(tokens))

        after_system = False
        for msg in messages:
            role, content = msg["role"], msg["content"]
            if role == "system":
                add([self.bos_id] + self.encode(f"<|System|>:{content}\n"), False)
                after_system = True
            elif role == "user":
                start = [] if after_system else [self.bos_id]
                after_system = False
                add(start + self.encode(f"<|User|>:{content}"), False)
                add([self.eoh_id] + self.encode("\n<|Bot|>:"), False)
            else:
                # the answer is encoded on its own so its tokens are the same whether or not the
                # prompt before it is in the same string (training vs generation)
                known = answer_ids(content) if answer_ids is not None else None
                add((self.encode(content) if known is None else list(known)) + [self.eoa_id], True)
                add(self.encode("\n"), False)
        return ids, mask

    def chat_prompt(
        self, messages: Sequence[dict], answer_ids: Callable[[str], list[int] | None] | None = None
    ) -> list[int]:
        """Ids of a conversation that ends with a user message, ending in "<|Bot|>:" so the model
        generates the answer; the same ids `encode_chat` gives for the same messages."""
        _check_messages(messages)
        if messages[-1]["role"] != "user":
            raise ValueError(f"message {len(messages) - 1}: a chat prompt must end with a user message")
        return self.encode_chat(messages, answer_ids)[0]


def _check_messages(messages: Sequence[dict]) -> None:
    """Raise ValueError naming the message index when `messages` is not: an optional system message,
    then user and assistant messages alternating, starting with user."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    expected = "user"
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {msg!r:.80}")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i}: a 'system' message is only allowed first")
            continue
        if role != expected:
            raise ValueError(f"message {i}: expected a {expected!r} message, got {role!r} (user, assistant alternate)")
        expected = "assistant" if role == "user" else "user"
    if messages[-1]["role"] == "system":
        raise ValueError("messages: a conversation needs a user message after the system message")


def save_tokenizer_files(model_file: str | Path, folder: str | Path) -> dict:
    """Copy a sentencepiece model into `folder` as tokenizer.model with the tokenizer_config.json and
    special_tokens_map.json of transformers' LlamaTokenizer, which encodes plain text to the same ids
    (add_prefix_space follows the model's add_dummy_prefix; <s> is added in front, as InternLM does).
    Works for any sentencepiece model with <s> and </s>. Returns bos/eos (and <eoa>, or None) ids."""
    path = Path(model_file)
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {path}")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
    if sp.bos_id() < 0 or sp.eos_id() < 0:
        raise ValueError(f"{path}: the model defines no {BOS} or {EOS} token (bos_id/eos_id are -1)")
    pieces = {"bos_token": sp.IdToPiece(sp.bos_id()), "eos_token": sp.IdToPiece(sp.eos_id())}
    pieces["unk_token"] = sp.IdToPiece(sp.unk_id())
    # sentencepiece marks a word start with U+2581; a model with add_dummy_prefix marks the first word too
    add_prefix_space = sp.EncodeAsPieces("a")[0].startswith("\u2581")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **pieces,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": add_prefix_space,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "tokenizer.model"
    if not (target.exists() and os.path.samefile(path, target)):
        tmp = folder / ".tokenizer.model.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", pieces)):
        (folder / name).write_text(json.dumps(data, indent=2) + "\n")
    eoa = sp.PieceToId(EOA)
    eoa_id = eoa if eoa != sp.unk_id() else None
    return {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "eoa_token_id": eoa_id}
