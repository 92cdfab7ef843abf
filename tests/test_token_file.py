"""Token files: writer/reader round trips (uint16, uint32, loss masks), atomic writes, and corrupt or
truncated files raising ValueError that names the file."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from internlm_fast.data import TokenDataset, TokenFileWriter, unigram_entropy


def random_docs(vocab_size: int, seed: int = 0, n: int = 50) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab_size, size=rng.integers(1, 200)) for _ in range(n)]
    docs[3] = np.array([], dtype=np.int64)  # an empty document is allowed
    docs[7] = np.array([0, vocab_size - 1])  # both ends of the range
    return docs


@pytest.mark.parametrize("vocab_size, dtype", [(1000, np.uint16), (65536, np.uint16), (103168, np.uint32)])
def test_round_trip(tmp_path, vocab_size, dtype):
    docs = random_docs(vocab_size)
    with TokenFileWriter(tmp_path / "d", vocab_size) as w:
        for d in docs:
            w.add(d)
        w.add([1, 2, 3])  # a plain list works too
    ds = TokenDataset(tmp_path / "d")
    assert len(ds) == len(docs) + 1
    assert ds.vocab_size == vocab_size and not ds.has_loss_mask
    assert ds.num_tokens == sum(len(d) for d in docs) + 3
    for i, d in enumerate(docs):
        got = ds.tokens(i)
        assert got.dtype == dtype and got.ndim == 1
        np.testing.assert_array_equal(got, d)
        assert ds.loss_mask(i) is None
    np.testing.assert_array_equal(ds.tokens(-1), [1, 2, 3])
    assert (tmp_path / "d.bin").stat().st_size == ds.num_tokens * np.dtype(dtype).itemsize
    assert not (tmp_path / "d.mask").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]  # no temporary files left


def test_loss_mask_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    docs = random_docs(500, n=20)
    masks = [rng.random(len(d)) < 0.5 for d in docs]
    with TokenFileWriter(tmp_path / "sft", 500, has_loss_mask=True) as w:
        for d, m in zip(docs, masks):
            w.add(d, m)
    ds = TokenDataset(tmp_path / "sft")
    assert ds.has_loss_mask
    for i, (d, m) in enumerate(zip(docs, masks)):
        np.testing.assert_array_equal(ds.tokens(i), d)
        assert ds.loss_mask(i).dtype == bool
        np.testing.assert_array_equal(ds.loss_mask(i), m)


def test_empty_dataset(tmp_path):
    with TokenFileWriter(tmp_path / "e", 100):
        pass
    ds = TokenDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_tokens == 0
    with pytest.raises(IndexError, match="document 0 out of range for 0 documents"):
        ds.tokens(0)


def test_writer_rejects_bad_input(tmp_path):
    with TokenFileWriter(tmp_path / "a", 100) as w:
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 100\)"):
            w.add([5, 100])
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 100\)"):
            w.add([-1])
        with pytest.raises(ValueError, match="1-D sequence of integers"):
            w.add([0.5, 1.5])
        with pytest.raises(ValueError, match="has_loss_mask=False"):
            w.add([1], [True])
    with TokenFileWriter(tmp_path / "b", 100, has_loss_mask=True) as w:
        with pytest.raises(ValueError, match="needs loss_mask"):
            w.add([1, 2])
        with pytest.raises(ValueError, match="loss_mask length 1 != tokens length 2"):
            w.add([1, 2], [True])
    with pytest.raises(ValueError, match="vocab_size"):
        TokenFileWriter(tmp_path / "c", 0)


def test_failure_inside_writer_leaves_no_file(tmp_path):
    with TokenFileWriter(tmp_path / "old", 100) as w:
        w.add([1, 2, 3])
    with pytest.raises(RuntimeError, match="boom"), TokenFileWriter(tmp_path / "old", 100) as w:
        w.add([4, 5])
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.bin", "old.idx"]
    np.testing.assert_array_equal(TokenDataset(tmp_path / "old").tokens(0), [1, 2, 3])  # previous file intact


@pytest.fixture
def written(tmp_path):
    with TokenFileWriter(tmp_path / "d", 300, has_loss_mask=True) as w:
        for d in random_docs(300, n=10):
            w.add(d, np.ones(len(d), dtype=bool))
    return tmp_path / "d"


def _truncate(path, n_bytes: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - n_bytes])


@pytest.mark.parametrize(
    "suffix, cut, match",
    [
        (".bin", 1, r"d\.bin: size"),
        (".bin", 10**9, r"d\.bin: size 0 bytes"),
        (".mask", 1, r"d\.mask: size"),
        (".idx", 8, r"d\.idx: size"),
        (".idx", 10**9, r"d\.idx: truncated index"),
    ],
)
def test_truncated_files_raise_naming_the_file(written, suffix, cut, match):
    _truncate(written.with_name("d" + suffix), cut)
    with pytest.raises(ValueError, match=match):
        TokenDataset(written)


def test_corrupt_index_raises(written):
    idx = written.with_name("d.idx")
    raw = bytearray(idx.read_bytes())
    bad_magic = b"XXXXXXXX" + raw[8:]
    idx.write_bytes(bad_magic)
    with pytest.raises(ValueError, match=r"d\.idx: not an internlm_fast token index"):
        TokenDataset(written)
    # an offset past the end of the tokens
    past_end = raw.copy()
    struct.pack_into("<q", past_end, 40 + 8 * 3, 10**12)
    idx.write_bytes(bytes(past_end))
    with pytest.raises(ValueError, match=r"d\.idx: corrupt offsets"):
        TokenDataset(written)


def test_missing_files(tmp_path, written):
    with pytest.raises(FileNotFoundError, match=r"nothing\.idx|nothing\.bin"):
        TokenDataset(tmp_path / "nothing")
    written.with_name("d.mask").unlink()
    with pytest.raises(ValueError, match=r"d\.mask: missing"):
        TokenDataset(written)


def test_unigram_entropy(tmp_path):
    with TokenFileWriter(tmp_path / "u", 10) as w:
        w.add([0, 1, 2, 3])
        w.add([0, 1, 2, 3, 0, 1, 2, 3])
    assert unigram_entropy(TokenDataset(tmp_path / "u")) == pytest.approx(math.log(4))
    with TokenFileWriter(tmp_path / "s", 70000) as w:
        w.add([69999] * 3 + [5])
    p = np.array([0.75, 0.25])
    assert unigram_entropy(TokenDataset(tmp_path / "s")) == pytest.approx(float(-(p * np.log(p)).sum()))
