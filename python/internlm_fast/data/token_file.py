"""Compact memory-mapped token files.

A dataset PREFIX is three files:
- PREFIX.bin   all tokens, concatenated: uint16 when vocab_size <= 65536, else uint32 (little-endian);
- PREFIX.idx   a 40-byte header (magic, version, dtype, vocab_size, num_docs, has_loss_mask, num_tokens)
               then num_docs + 1 int64 document offsets into .bin (the first is 0, the last num_tokens);
- PREFIX.mask  (SFT only) one uint8 per token, 1 = the token is a training target.

The writer writes temporary files and renames them on close, .idx last, so a crash never leaves a
half-written file under a final name; the reader checks sizes and offsets before mapping anything, so
a truncated or corrupt file raises ValueError naming it instead of reading out of bounds.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import numpy as np

MAGIC = b"ILMFTOK\x00"
VERSION = 1
# magic, version, itemsize, has_loss_mask, vocab_size, num_docs, num_tokens
_HEADER = struct.Struct("<8sIBBxxIQQ")
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in it, else uint32."""
    return _DTYPES[2] if vocab_size <= 1 << 16 else _DTYPES[4]


def _paths(prefix: str | Path) -> tuple[Path, Path, Path]:
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx"), Path(prefix + ".mask")


class TokenFileWriter:
    """Append documents to a token file set; use as a context manager (files appear on a clean exit)."""

    def __init__(self, prefix: str | Path, vocab_size: int, has_loss_mask: bool = False) -> None:
        if not 0 < vocab_size < 1 << 32:
            raise ValueError(f"vocab_size must be in [1, 2**32), got {vocab_size}")
        self.prefix = Path(prefix)
        self.vocab_size = vocab_size
        self.has_loss_mask = has_loss_mask
        self.dtype = token_dtype(vocab_size)
        self.num_tokens = 0
        self._offsets = array("q", [0])
        self._final = _paths(prefix)
        self._tmp = tuple(p.with_name(p.name + ".tmp") for p in self._final)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(self._tmp[0], "wb")  # closed by close() or abort()
        self._mask = open(self._tmp[2], "wb") if has_loss_mask else None
        self._closed = False

    @property
    def num_docs(self) -> int:
        return len(self._offsets) - 1

    def add(self, tokens: Sequence[int] | np.ndarray, loss_mask: Sequence[bool] | np.ndarray | None = None) -> None:
        """Append one document (its token ids and, for SFT files, a same-length loss mask)."""
        if self._closed:
            raise ValueError(f"{self.prefix}: writer is closed")
        toks = np.asarray(tokens)
        if toks.ndim != 1 or (toks.size and toks.dtype.kind not in "iu"):
            raise ValueError(f"tokens must be a 1-D sequence of integers, got shape {toks.shape} dtype {toks.dtype}")
        if toks.size and (int(toks.min()) < 0 or int(toks.max()) >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got [{toks.min()}, {toks.max()}]")
        if self.has_loss_mask:
            if loss_mask is None:
                raise ValueError(f"{self.prefix}: this file has a loss mask; add() needs loss_mask")
            mask = np.asarray(loss_mask, dtype=bool)
            if mask.shape != toks.shape:
                raise ValueError(f"loss_mask length {mask.size} != tokens length {toks.size}")
            mask.astype(np.uint8).tofile(self._mask)
        elif loss_mask is not None:
            raise ValueError(f"{self.prefix}: loss_mask given but the writer has has_loss_mask=False")
        toks.astype(self.dtype).tofile(self._bin)
        self.num_tokens += toks.size
        self._offsets.append(self.num_tokens)

    def close(self) -> None:
        """Finish: write the index and move the files to their final names."""
        if self._closed:
            return
        self._closed = True
        for f in (self._bin, self._mask):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        header = _HEADER.pack(
            MAGIC,
            VERSION,
            self.dtype.itemsize,
            int(self.has_loss_mask),
            self.vocab_size,
            self.num_docs,
            self.num_tokens,
        )
        with open(self._tmp[1], "wb") as f:
            f.write(header)
            f.write(np.frombuffer(self._offsets, dtype=np.int64).astype("<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        for tmp, final in zip(self._tmp, self._final):
            if tmp.exists():
                os.replace(tmp, final)
        if not self.has_loss_mask:
            self._final[2].unlink(missing_ok=True)  # a stale mask from an earlier SFT file of this name

    def abort(self) -> None:
        """Discard everything written; the final names are left untouched."""
        self._closed = True
        for f in (self._bin, self._mask):
            if f is not None:
                f.close()
        for tmp in self._tmp:
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> TokenFileWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TokenDataset:
    """Read-only view of a token file set; documents are memory-mapped, never loaded whole."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        bin_path, idx_path, mask_path = _paths(prefix)
        for p in (bin_path, idx_path):
            if not p.is_file():
                raise FileNotFoundError(f"token file not found: {p}")
        raw = idx_path.read_bytes()
        if len(raw) < _HEADER.size:
            raise ValueError(f"{idx_path}: truncated index ({len(raw)} bytes, header needs {_HEADER.size})")
        magic, version, itemsize, has_mask, vocab_size, num_docs, num_tokens = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise ValueError(f"{idx_path}: not an internlm_fast token index (bad magic {magic!r})")
        if version != VERSION:
            raise ValueError(f"{idx_path}: unsupported token file version {version} (this reader knows {VERSION})")
        dtype_ok = itemsize in _DTYPES and vocab_size > 0 and token_dtype(vocab_size).itemsize == itemsize
        if not dtype_ok or has_mask not in (0, 1):
            raise ValueError(
                f"{idx_path}: corrupt header (itemsize {itemsize}, vocab_size {vocab_size}, has_loss_mask {has_mask})"
            )
        expected = _HEADER.size + 8 * (num_docs + 1)
        if len(raw) != expected:
            raise ValueError(f"{idx_path}: size {len(raw)} bytes, expected {expected} for {num_docs} documents")
        offsets = np.frombuffer(raw, dtype="<i8", offset=_HEADER.size)
        if offsets[0] != 0 or offsets[-1] != num_tokens or (num_docs and np.any(np.diff(offsets) < 0)):
            raise ValueError(f"{idx_path}: corrupt offsets (not increasing from 0 to num_tokens={num_tokens})")
        self.vocab_size: int = vocab_size
        self.has_loss_mask = bool(has_mask)
        self.num_tokens = int(num_tokens)
        self.offsets: np.ndarray = offsets  # int64, len(self) + 1; document i is offsets[i]:offsets[i + 1]
        self._tokens = _map(bin_path, _DTYPES[itemsize], num_tokens)
        self._mask = _map(mask_path, np.dtype(np.uint8), num_tokens).view(bool) if self.has_loss_mask else None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.prefix)!r}, docs={len(self)}, tokens={self.num_tokens})"

    @property
    def all_tokens(self) -> np.ndarray:
        """Every token of every document, concatenated (a memory map)."""
        return self._tokens

    @property
    def all_loss_mask(self) -> np.ndarray | None:
        """The loss mask of every token (bool, aligned with all_tokens); None for pretraining data."""
        return self._mask

    def _span(self, i: int) -> slice:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents in {self.prefix}")
        i %= n
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def tokens(self, i: int) -> np.ndarray:
        """Tokens of document i (a read-only 1-D view, uint16 or uint32)."""
        return self._tokens[self._span(i)]

    def loss_mask(self, i: int) -> np.ndarray | None:
        """Bool mask of document i, True where the token is a target to learn; None for pretraining data."""
        return None if self._mask is None else self._mask[self._span(i)]


def _map(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """Map `count` items of `path`, checking the file holds exactly that many first."""
    if not path.is_file():
        raise ValueError(f"{path}: missing (the index says it exists)")
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise ValueError(f"{path}: size {size} bytes, expected {count * dtype.itemsize} ({count} tokens)")
    if count == 0:
        return np.empty(0, dtype=dtype)  # mmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def unigram_entropy(dataset: TokenDataset) -> float:
    """Entropy in nats of the dataset's token frequencies: the loss of the best context-free model."""
    counts = np.zeros(0, dtype=np.int64)
    chunk = 1 << 24
    toks = dataset.all_tokens
    for start in range(0, dataset.num_tokens, chunk):
        c = np.bincount(toks[start : start + chunk])
        if c.size > counts.size:
            c[: counts.size] += counts
            counts = c
        else:
            counts[: c.size] += c
    total = counts.sum()
    if total == 0:
        raise ValueError(f"{dataset.prefix}: no tokens, entropy undefined")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())
