"""`python -m internlm_fast.data tokenize / train-tokenizer` end to end, and tokenize_files: .txt and .jsonl,
pretraining and SFT, malformed and truncated lines, --skip-bad-lines, determinism across worker counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import internlm_fast
from internlm_fast.data import MalformedLineError, TokenDataset, Tokenizer, tokenize_files

from .data_helpers import sample_texts, small_tokenizer_path  # noqa: F401  (a fixture)

PYTHON_DIR = str(Path(internlm_fast.__file__).parents[1])


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    cmd = [sys.executable, "-m", "internlm_fast.data", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def tokenize_cli(tok_path: Path, inputs: list[Path], output: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("tokenize", "--tokenizer", tok_path, "--input", *inputs, "--output", output, *extra)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def no_outputs(folder: Path, name: str) -> bool:
    return not any(p.name.startswith(name + ".") for p in folder.iterdir())


@pytest.fixture(scope="module")
def tok(small_tokenizer_path) -> Tokenizer:  # noqa: F811
    return Tokenizer(small_tokenizer_path)


def test_txt_files_are_one_document_each_and_workers_do_not_change_the_output(
    tmp_path,
    tok,
    small_tokenizer_path,  # noqa: F811
):
    texts = sample_texts(1500, seed=1)
    inputs = []
    for i in range(3):  # enough documents for several worker tasks
        for j, text in enumerate(texts[i * 500 : (i + 1) * 500]):
            path = tmp_path / f"in{i}_{j:03d}.txt"
            path.write_text(text)
            inputs.append(path)
    one = tokenize_cli(small_tokenizer_path, inputs, tmp_path / "w1", "--workers", "1")
    two = tokenize_cli(small_tokenizer_path, inputs, tmp_path / "w2", "--workers", "2")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert "1500 pretraining documents" in one.stderr
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()
    ds = TokenDataset(tmp_path / "w1")
    assert len(ds) == 1500 and not ds.has_loss_mask
    for i in (0, 777, 1499):
        assert ds.tokens(i).tolist() == tok.encode(texts[i], bos=True, eos=True)


def test_jsonl_pretraining(tmp_path, tok, small_tokenizer_path):  # noqa: F811
    src = write_jsonl(tmp_path / "p.jsonl", [{"text": "first doc"}, "", {"text": "second\ndoc 世界"}])
    res = tokenize_cli(small_tokenizer_path, [src], tmp_path / "p")
    assert res.returncode == 0, res.stderr
    ds = TokenDataset(tmp_path / "p")
    assert len(ds) == 2  # the blank line is no document
    assert tok.decode(ds.tokens(1).tolist(), skip_special=False) == "<s>second\ndoc 世界</s>"


def test_jsonl_sft_has_a_loss_mask(tmp_path, tok, small_tokenizer_path):  # noqa: F811
    chats = [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ],
    ]
    src = write_jsonl(tmp_path / "s.jsonl", [{"messages": m} for m in chats])
    res = tokenize_cli(small_tokenizer_path, [src], tmp_path / "s")
    assert res.returncode == 0, res.stderr
    assert "SFT (with loss mask)" in res.stderr
    ds = TokenDataset(tmp_path / "s")
    assert ds.has_loss_mask and len(ds) == 2
    for i, messages in enumerate(chats):
        ids, mask = tok.encode_chat(messages)
        assert ds.tokens(i).tolist() == ids
        assert ds.loss_mask(i).tolist() == mask


def test_malformed_line_names_file_and_line_and_leaves_no_output(tmp_path, small_tokenizer_path):  # noqa: F811
    src = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"text": "ok"}, '{"text": "unclosed', {"text": "ok"}])
    res = tokenize_cli(small_tokenizer_path, [src], tmp_path / "out")
    assert res.returncode == 2
    assert f"{src}:3: invalid JSON" in res.stderr
    assert "Traceback" not in res.stderr
    assert no_outputs(tmp_path, "out")


def test_skip_bad_lines_counts_them(tmp_path, small_tokenizer_path):  # noqa: F811
    rows = [{"text": "ok"}, "[1, 2]", {"txt": "typo"}, {"text": 5}, {"text": "fine"}, "not json"]
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    res = tokenize_cli(small_tokenizer_path, [src], tmp_path / "out", "--skip-bad-lines")
    assert res.returncode == 0, res.stderr
    assert "skipped 4 bad lines" in res.stderr
    assert f"skipped {src}:2: expected a JSON object" in res.stderr
    assert len(TokenDataset(tmp_path / "out")) == 2


def test_train_tokenizer_cli(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(sample_texts(100)))
    res = run_cli("train-tokenizer", "--input", src, "--output", tmp_path / "t.model", "--vocab-size", "400")
    assert res.returncode == 0, res.stderr
    assert Tokenizer(tmp_path / "t.model").vocab_size == 400
    res = run_cli("train-tokenizer", "--input", tmp_path / "none.txt", "--output", tmp_path / "u.model")
    assert res.returncode == 2 and "none.txt" in res.stderr


@pytest.mark.parametrize(
    "rows, match",
    [
        (['{"text": "ok"}', '{"text": "cut'], r"bad\.jsonl:2: invalid JSON.*truncated file"),
        ([{"text": "a", "messages": []}], r"bad\.jsonl:1: expected exactly one of the keys 'text' or 'messages'"),
        ([{"messages": "hi"}], r"bad\.jsonl:1: 'messages' must be a non-empty list"),
        ([{"messages": [{"role": "user"}]}], r"bad\.jsonl:1: messages\[0\] must be an object"),
        ([{"messages": [{"role": "robot", "content": "x"}]}], r"bad\.jsonl:1: message 0: unknown role 'robot'"),
    ],
)
def test_bad_records(tmp_path, small_tokenizer_path, rows, match):  # noqa: F811
    src = tmp_path / "bad.jsonl"
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    src.write_text(text.rstrip("\n"))  # no final newline: the first case is a truncated file
    with pytest.raises(MalformedLineError, match=match):
        tokenize_files(small_tokenizer_path, [src], tmp_path / "out", workers=1, progress=False)
    assert no_outputs(tmp_path, "out")


def test_truncated_last_line_is_skippable(tmp_path, small_tokenizer_path):  # noqa: F811
    src = tmp_path / "t.jsonl"
    src.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c')
    stats = tokenize_files(small_tokenizer_path, [src], tmp_path / "o", workers=2, skip_bad_lines=True, progress=False)
    assert (stats.num_docs, stats.skipped_bad_lines) == (2, 1)
    assert "t.jsonl:3" in stats.bad_line_messages[0]


def test_mixing_pretraining_and_sft_is_an_error(tmp_path, small_tokenizer_path):  # noqa: F811
    src = write_jsonl(tmp_path / "mix.jsonl", [{"text": "a"}, {"messages": [{"role": "user", "content": "q"}]}])
    expected = r"mix\.jsonl:2: an SFT \('messages'\) document, but .*mix\.jsonl:1 was a pretraining"
    with pytest.raises(ValueError, match=expected):
        tokenize_files(small_tokenizer_path, [src], tmp_path / "out", workers=1, progress=False)
    assert no_outputs(tmp_path, "out")


def test_invalid_utf8_names_the_line(tmp_path, small_tokenizer_path):  # noqa: F811
    src = tmp_path / "latin1.txt"
    src.write_bytes(b"fine\nstill fine\ncaf\xe9\n")
    with pytest.raises(MalformedLineError, match=r"latin1\.txt:3: not valid UTF-8"):
        tokenize_files(small_tokenizer_path, [src], tmp_path / "out", workers=1, progress=False)


@pytest.mark.parametrize("mode, expected", [("line", ["a b", "c", "d"]), ("paragraph", ["a b\nc", "d"])])
def test_txt_modes(tmp_path, tok, small_tokenizer_path, mode, expected):  # noqa: F811
    src = tmp_path / "m.txt"
    src.write_text("a b\nc\n\n  \nd\n")
    tokenize_files(small_tokenizer_path, [src], tmp_path / mode, workers=1, progress=False, txt_mode=mode)
    ds = TokenDataset(tmp_path / mode)
    assert [tok.decode(ds.tokens(i).tolist()) for i in range(len(ds))] == expected


def test_input_errors(tmp_path, small_tokenizer_path):  # noqa: F811
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        tokenize_files(small_tokenizer_path, [tmp_path / "missing.jsonl"], tmp_path / "o", progress=False)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"x\.csv: unsupported input type '\.csv'"):
        tokenize_files(small_tokenizer_path, [tmp_path / "x.csv"], tmp_path / "o", progress=False)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no documents in the inputs"):
        tokenize_files(small_tokenizer_path, [tmp_path / "empty.jsonl"], tmp_path / "o", progress=False)
    assert np.all([not p.name.startswith("o.") for p in tmp_path.iterdir()])
