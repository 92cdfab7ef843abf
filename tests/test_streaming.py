"""Streaming text: deltas never split a UTF-8 character (sentencepiece byte fallback) and never
show any part of a stop string."""

from __future__ import annotations

import pytest

from internlm_fast.infer import (
    GenerationConfig,
    IncrementalDetokenizer,
    StopStringFilter,
    TextStream,
    generate_text,
    stream_text,
)

from .generate_helpers import one_thread, small_model, train_small_tokenizer  # noqa: F401 (fixture)

# none of these characters is in the tokenizer's training text: each is spelled as 3-4 byte tokens
RARE = "龘𝄞ü€🦀"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("tok"))


def _pieces(tokenizer, ids):
    return [tokenizer.sp.IdToPiece(i) for i in ids]


def test_byte_fallback_characters_are_never_split(tokenizer):
    text = f"Hello {RARE} 你好😀 world {RARE[1]}"
    ids = tokenizer.encode(text)
    assert sum(p.startswith("<0x") for p in _pieces(tokenizer, ids)) >= 14  # really byte-spelled
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas.count("") >= 10  # bytes held back until their character completes
    for ch in RARE:  # each rare character arrives whole, in one delta
        assert any(ch in d for d in deltas)


def test_an_incomplete_character_at_the_end_is_flushed(tokenizer):
    ids = tokenizer.encode("ok 龘")[:-1]  # the last byte of the character is missing
    detok = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detok.add(t) for t in ids)
    assert streamed == "ok "
    assert streamed + detok.flush() == tokenizer.decode(ids)


def test_stop_string_filter_holds_back_possible_starts():
    f = StopStringFilter(["User:", "abc"])
    out = [f.push(p) for p in ["Hel", "lo U", "s", "e"]]
    assert out == ["Hel", "lo ", "", ""]  # "U", "Us", "Use" could begin "User:"
    assert f.push("d") == "Used" and not f.stopped  # not a stop string after all: released
    assert f.push("ab") == "" and f.push("x") == "abx"
    assert f.push(" more Us") == " more " and f.push("er: rest") == "" and f.stopped
    assert f.push("anything") == "" and f.flush() == ""


def test_stop_string_inside_one_piece_and_flush():
    f = StopStringFilter(["STOP"])
    assert f.push("abc STOP def") == "abc " and f.stopped
    g = StopStringFilter(["STOP"])
    assert g.push("end ST") == "end " and g.flush() == "ST"


def test_text_stream_with_bytes_and_a_stop_string(tokenizer):
    text = f"{RARE}xy{RARE}<|User|>:more"
    ids = tokenizer.encode(text)
    stream = TextStream(tokenizer, ["<|User|>"])
    deltas = []
    for t in ids:
        deltas.append(stream.add(t))
        if stream.stopped:
            break
    deltas.append(stream.finish())
    assert "".join(deltas) == stream.text == f"{RARE}xy{RARE}"
    assert all("\ufffd" not in d and "<" not in d for d in deltas)


def test_stream_text_concatenates_to_the_generated_text(tokenizer, one_thread):  # noqa: F811
    model = small_model()
    prompt = tokenizer.encode("Hello", bos=True)
    cfg = GenerationConfig(max_new_tokens=40, do_sample=True, seed=5, stop_strings=["zz"])
    deltas = list(stream_text(model, tokenizer, prompt, cfg))
    assert deltas and all(deltas)
    assert "".join(deltas) == generate_text(model, tokenizer, prompt, cfg).text
