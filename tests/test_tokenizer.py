"""Tokenizer: special ids, exact round trips (byte fallback), literal special tokens, the chat template
and its loss mask, tokenizer training; on a real sentencepiece model trained here."""

from __future__ import annotations

import pytest
import sentencepiece as spm

from internlm_fast.data import Tokenizer, train_tokenizer

from .data_helpers import sample_texts, small_tokenizer_path  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def tok(small_tokenizer_path) -> Tokenizer:  # noqa: F811
    return Tokenizer(small_tokenizer_path)


def test_special_ids_match_internlm(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.pad_id == tok.unk_id  # the model defines no pad piece
    assert tok.vocab_size == 600
    assert {tok.sp.id_to_piece(i) for i in (tok.eoh_id, tok.eoa_id)} == {"<eoh>", "<eoa>"}
    assert tok.stop_ids == {tok.eos_id, tok.eoa_id}


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n    return x  # two spaces\n\n\tif y:\n\t\tpass\n",
        "  leading and trailing spaces  ",
        "naïve café, Grüße, 世界, emoji 😀🚀, math ∑∫, zero-width \u200b, nul \x00 end",
        "",
    ],
)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_unseen_characters_use_byte_fallback(tok):
    ids = tok.encode("😀")
    assert [tok.sp.id_to_piece(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert tok.unk_id not in ids


def test_bos_eos_flags(tok):
    body = tok.encode("hello")
    assert tok.encode("hello", bos=True, eos=True) == [tok.bos_id, *body, tok.eos_id]


def test_literal_special_strings_become_single_ids(tok):
    ids = tok.encode("a<eoh>b<eoa><s>c</s>")
    a, b, c = tok.encode("a"), tok.encode("b"), tok.encode("c")
    assert ids == [*a, tok.eoh_id, *b, tok.eoa_id, tok.bos_id, *c, tok.eos_id]
    assert tok.decode(ids, skip_special=False) == "a<eoh>b<eoa><s>c</s>"
    assert tok.decode(ids) == "abc"
    assert len(tok.encode("<eoh>")) == 1 and len(tok.encode("<eoa>")) == 1


def test_decode_rejects_out_of_range_ids(tok):
    with pytest.raises(ValueError, match="token id 600 out of range"):
        tok.decode([5, 600])


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello 世界"},
    {"role": "user", "content": "and?"},
    {"role": "assistant", "content": "done"},
]


def test_chat_template_text_is_exact(tok):
    ids, mask = tok.encode_chat(CHAT)
    assert len(ids) == len(mask)
    assert tok.decode(ids, skip_special=False) == (
        "<s><|System|>:Be brief.\n"
        "<|User|>:hi there<eoh>\n<|Bot|>:hello 世界<eoa>\n"
        "<s><|User|>:and?<eoh>\n<|Bot|>:done<eoa>\n"
    )
    no_system = tok.decode(tok.encode_chat(CHAT[1:3])[0], skip_special=False)
    assert no_system == "<s><|User|>:hi there<eoh>\n<|Bot|>:hello 世界<eoa>\n"


def test_chat_loss_mask_covers_exactly_answers_and_eoa(tok):
    ids, mask = tok.encode_chat(CHAT)
    # the masked tokens form one run per answer: the answer's tokens then <eoa>
    runs, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    assert runs == [tok.encode("hello 世界") + [tok.eoa_id], tok.encode("done") + [tok.eoa_id]]
    # the newline after each <eoa> is not a target
    for k, i in enumerate(ids):
        if i == tok.eoa_id:
            assert mask[k] and not mask[k + 1]


def test_chat_prompt_is_the_training_prefix(tok):
    prompt = tok.chat_prompt(CHAT[:4])
    ids, mask = tok.encode_chat(CHAT)
    assert ids[: len(prompt)] == prompt
    assert mask[len(prompt)]  # the first token after the prompt is the first answer token
    assert tok.decode(prompt).endswith("<|User|>:and?\n<|Bot|>:")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], r"message 1: unknown role 'bot'"),
        ([{"role": "assistant", "content": "a"}], r"message 0: expected a 'user' message, got 'assistant'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], r"message 1: expected a 'assistant'"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], r"message 1: a 'system' message"),
        ([{"role": "user", "content": 3}], r"message 0: content must be a string"),
        ([{"role": "user"}], r"message 0: expected a dict with 'role' and 'content'"),
        ([], r"non-empty list"),
    ],
)
def test_bad_conversations_are_rejected_naming_the_message(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.encode_chat(messages)


def test_chat_prompt_must_end_with_user(tok):
    with pytest.raises(ValueError, match="must end with a user message"):
        tok.chat_prompt(CHAT)


def test_missing_or_invalid_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ValueError, match="junk.model: not a sentencepiece model"):
        Tokenizer(junk)


def test_model_without_chat_tokens_is_rejected(tmp_path):
    prefix = tmp_path / "plain"
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(sample_texts(50)), model_prefix=str(prefix), vocab_size=150, minloglevel=2
    )
    with pytest.raises(ValueError, match="no <eoh> or <eoa> token"):
        Tokenizer(f"{prefix}.model")


def test_loads_a_hugging_face_folder(tmp_path, small_tokenizer_path):  # noqa: F811
    (tmp_path / "tokenizer.model").write_bytes(small_tokenizer_path.read_bytes())
    assert Tokenizer(tmp_path).vocab_size == 600


def test_training_is_deterministic(tmp_path, small_tokenizer_path):  # noqa: F811
    again = train_tokenizer(iter(sample_texts()), tmp_path / "again.model", 600)
    pieces = [Tokenizer(p).sp.id_to_piece(i) for p in (small_tokenizer_path, again) for i in range(600)]
    assert pieces[:600] == pieces[600:]


def test_training_from_files(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(sample_texts(100)))
    (tmp_path / "b.jsonl").write_text(
        '{"text": "plain text line"}\n{"messages": [{"role": "user", "content": "question"}]}\n'
    )
    path = train_tokenizer([tmp_path / "a.txt", str(tmp_path / "b.jsonl")], tmp_path / "files.model", 400)
    tok = Tokenizer(path)
    assert tok.vocab_size == 400 and tok.decode(tok.encode("question")) == "question"
    assert not (tmp_path / "files.model.tmp").exists()


def test_training_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "x.model")
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        train_tokenizer(iter(["text"]), tmp_path / "x.model", vocab_size=100)
    with pytest.raises(TypeError, match="not a single path"):
        train_tokenizer("corpus.txt", tmp_path / "x.model")
