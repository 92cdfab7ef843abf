"""The built-in corpus: deterministic gathering, a disjoint train/validation split, and one real
preparation into tmp_path (~5 s on 2 cores) with its cache reuse and recovery."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from internlm_fast.data import BuiltinCorpus, TokenDataset, Tokenizer, prepare_builtin_corpus, unigram_entropy
from internlm_fast.data.builtin_corpus import (
    MAX_CORPUS_BYTES,
    candidate_files,
    default_cache_root,
    gather_documents,
    split_documents,
)


@pytest.fixture(scope="module")
def docs() -> list[tuple[str, str]]:
    return gather_documents()


def test_gathering_is_deterministic_and_capped(docs):
    assert gather_documents() == docs
    names = [name for name, _ in docs]
    assert names == sorted(names) and len(set(names)) == len(names)
    size = sum(len(text.encode()) for _, text in docs)
    assert 0.9 * MAX_CORPUS_BYTES < size <= MAX_CORPUS_BYTES
    assert any(name.startswith("pydoc_data/topics.py#") for name in names)  # prose: the language reference


def test_excluded_folders_and_undecodable_files(tmp_path):
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / "site-packages" / "lib").mkdir(parents=True)
    (tmp_path / "test").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "tests" / "test_mod.py").write_text("assert True\n")
    (tmp_path / "site-packages" / "lib" / "thirdparty.py").write_text("y = 2\n")
    (tmp_path / "test" / "t.py").write_text("z = 3\n")
    (tmp_path / "latin1.py").write_bytes(b"s = 'caf\xe9'\n")
    (tmp_path / "notes.txt").write_text("not python\n")
    (tmp_path / "top.py").write_text("print('hello')\n")
    assert [rel for rel, _ in candidate_files(tmp_path)] == ["latin1.py", "pkg/mod.py", "top.py"]
    assert gather_documents(tmp_path) == [("pkg/mod.py", "x = 1\n"), ("top.py", "print('hello')\n")]
    assert gather_documents(tmp_path, max_bytes=7) == [("pkg/mod.py", "x = 1\n")]  # the cap keeps what fits


def test_split_is_disjoint_complete_and_small(docs):
    train, val = split_documents(docs)
    train_names, val_names = {n for n, _ in train}, {n for n, _ in val}
    assert not train_names & val_names
    assert train_names | val_names == {n for n, _ in docs}
    assert 0.02 <= len(val) / len(docs) <= 0.05
    assert split_documents(docs) == (train, val)


def test_default_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("INTERNLM_FAST_CACHE", str(tmp_path))
    assert default_cache_root() == tmp_path
    monkeypatch.delenv("INTERNLM_FAST_CACHE")
    assert default_cache_root().parts[-2:] == (".cache", "internlm_fast")


def test_prepare_for_real_then_reuse_then_recover(tmp_path, capfd):
    start = time.perf_counter()
    corpus = prepare_builtin_corpus(tmp_path, vocab_size=8192, progress=False)
    prepare_s = time.perf_counter() - start
    assert isinstance(corpus, BuiltinCorpus)
    assert corpus.tokenizer_path.parent.name.startswith("builtin-corpus-py3")
    assert corpus.tokenizer_path.parent.name.endswith("-v8192")
    assert "[builtin corpus] preparing" in capfd.readouterr().err
    tok = Tokenizer(corpus.tokenizer_path)
    train, val = TokenDataset(corpus.train_prefix), TokenDataset(corpus.val_prefix)
    assert tok.vocab_size == train.vocab_size == 8192
    assert train.num_tokens > 2_000_000 and 0 < val.num_tokens < train.num_tokens / 10
    assert corpus.unigram_entropy == pytest.approx(unigram_entropy(train))
    assert 5.0 < corpus.unigram_entropy < 8.0
    first = train.tokens(0)
    assert first[0] == tok.bos_id and first[-1] == tok.eos_id
    manifest = json.loads((corpus.tokenizer_path.parent / "manifest.json").read_text())
    assert manifest["train_tokens"] == train.num_tokens and manifest["val_docs"] == len(val)
    print(f"prepare_builtin_corpus: {prepare_s:.1f} s, {train.num_tokens} train tokens")

    # reuse: nothing is rebuilt
    model_mtime = corpus.tokenizer_path.stat().st_mtime_ns
    again = prepare_builtin_corpus(tmp_path, vocab_size=8192, progress=False)
    assert again == corpus and corpus.tokenizer_path.stat().st_mtime_ns == model_mtime
    assert "preparing" not in capfd.readouterr().err

    # a damaged cache (e.g. a preparation killed and the files cut) is rebuilt, to the same result
    bin_path = corpus.train_prefix.with_name("train.bin")
    tokens_before = np.fromfile(bin_path, dtype=np.uint16)
    bin_path.write_bytes(bin_path.read_bytes()[:1000])
    rebuilt = prepare_builtin_corpus(tmp_path, vocab_size=8192, progress=False)
    assert "preparing" in capfd.readouterr().err
    assert rebuilt.unigram_entropy == corpus.unigram_entropy
    np.testing.assert_array_equal(np.fromfile(bin_path, dtype=np.uint16), tokens_before)
