"""Packed batches as InternLM builds them: documents, cut into pieces of at most seq_len tokens, in a
per-epoch shuffled order of pieces, are concatenated into one stream that is cut into rows of
micro_batch_size * seq_len tokens. A piece that does not fit continues in the next row. cu_seqlens
marks every piece boundary and every sub-row boundary (multiples of seq_len), so no segment is longer
than seq_len; the model restarts positions at each segment and never lets a segment's last token
predict the next one.
Shuffling pieces rather than whole documents matters when documents are long (source files, books):
otherwise one step's rows would come from one or two documents and its gradient would be dominated by
them. A piece is where a segment would have been cut anyway, so no context is lost.
Row g of the stream depends only on (seed, shuffle, g), so the loader's whole state is the number of
rows consumed: resuming is exact, and rank r of world w takes rows r, r + w, r + 2w, ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = -100
_STATE_VERSION = 1


class Dataset(Protocol):
    vocab_size: int

    def __len__(self) -> int: ...

    def tokens(self, i: int) -> np.ndarray: ...

    def loss_mask(self, i: int) -> np.ndarray | None: ...


@dataclass
class PackedBatch:
    input_ids: Tensor  # int64 (1, micro_batch_size * seq_len)
    labels: Tensor  # int64, same shape: input_ids where learnt, -100 where masked or padding (not shifted)
    cu_seqlens: Tensor  # int32 (segments + 1,): 0, ..., micro_batch_size * seq_len
    max_seqlen: int  # longest segment, <= seq_len
    num_tokens: int  # tokens that are not padding


def _document_lengths(dataset: Dataset) -> np.ndarray:
    # A dataset that knows its lengths (an index array) spares reading every document once.
    lengths = getattr(dataset, "lengths", None)
    if lengths is not None:
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.shape != (len(dataset),):
            raise ValueError(f"dataset.lengths has shape {lengths.shape}, expected ({len(dataset)},)")
        return lengths
    return np.fromiter((len(dataset.tokens(i)) for i in range(len(dataset))), dtype=np.int64, count=len(dataset))


class PackedLoader:
    """Iterator of PackedBatch over `dataset`; see the module docstring for the packing rule.

    loop=True repeats epochs forever, each in a new order; loop=False makes one pass and pads the last
    row with pad_id (its own segment, labels -100). Empty documents are skipped.
    """

    def __init__(
        self,
        dataset: Dataset,
        seq_len: int,
        micro_batch_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        loop: bool = True,
        pad_id: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        for name, value in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size), ("world_size", world_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if len(dataset) == 0:
            raise ValueError("dataset is empty: it has no documents to pack")
        doc_lengths = _document_lengths(dataset)
        if not (doc_lengths > 0).any():
            raise ValueError(f"dataset has {len(dataset)} documents but all are empty: nothing to pack")
        # pieces: (document, offset) of every seq_len-long slice of every non-empty document
        per_doc = -(-doc_lengths // seq_len)
        self._piece_doc = np.repeat(np.arange(len(doc_lengths)), per_doc)
        first = np.cumsum(per_doc) - per_doc
        self._piece_offset = (np.arange(self._piece_doc.size) - first[self._piece_doc]) * seq_len
        lengths = np.minimum(doc_lengths[self._piece_doc] - self._piece_offset, seq_len)
        self._docs = np.arange(self._piece_doc.size)
        self._num_documents = len(doc_lengths)
        self.dataset = dataset
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.seed, self.shuffle, self.loop, self.pad_id = seed, shuffle, loop, pad_id
        self.rank, self.world_size = rank, world_size
        self.row_len = micro_batch_size * seq_len
        self._lengths = lengths
        self.tokens_per_epoch = int(lengths.sum())
        self.rows_per_epoch = -(-self.tokens_per_epoch // self.row_len)  # with loop=False, the number of rows
        self._rows_consumed = 0  # global rows consumed by all ranks together before this rank's next batch
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._subrow_bounds = np.arange(0, self.row_len + 1, seq_len, dtype=np.int64)

    @property
    def epoch(self) -> int:
        """The epoch the next batch of this rank starts in."""
        return (self._rows_consumed + self.rank) * self.row_len // self.tokens_per_epoch

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document ids in the epoch's order, the stream offset within the epoch where each one ends)."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a row spans at most the current and the next epoch, except tiny datasets
                self._orders.pop(min(self._orders))
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self._docs) if self.shuffle else self._docs
            self._orders[epoch] = order, np.cumsum(self._lengths[order])
        return self._orders[epoch]

    def _pieces(self, start: int, stop: int) -> list[np.ndarray]:
        """The document pieces covering stream offsets [start, stop), as arrays: document id, begin and end
        within the document, and stream offset where the document ends. Vectorised per epoch."""
        parts = []
        while start < stop:
            epoch, lo = divmod(start, self.tokens_per_epoch)
            hi = min(lo + stop - start, self.tokens_per_epoch)
            order, ends = self._order(epoch)
            k0, k1 = np.searchsorted(ends, [lo, hi - 1], side="right")
            docs, doc_ends = order[k0 : k1 + 1], ends[k0 : k1 + 1]
            doc_starts = doc_ends - self._lengths[docs]
            base = epoch * self.tokens_per_epoch
            begin = np.maximum(doc_starts, lo) - doc_starts
            end = np.minimum(doc_ends, hi) - doc_starts
            parts.append((docs, begin, end, base + doc_ends))
            start = base + hi
        return [np.concatenate(column) for column in zip(*parts)]

    def _build_row(self, row: int) -> PackedBatch:
        start = row * self.row_len
        stop = start + self.row_len if self.loop else min(start + self.row_len, self.tokens_per_epoch)
        n_real = stop - start
        ids = np.full(self.row_len, self.pad_id, dtype=np.int64)
        docs, begin, end, doc_ends = self._pieces(start, stop)
        out = np.concatenate(([0], np.cumsum(end - begin)))
        piece_offset = self._piece_offset[docs]
        begin, end, docs = begin + piece_offset, end + piece_offset, self._piece_doc[docs]
        for doc, b, e, o in zip(docs.tolist(), begin.tolist(), end.tolist(), out.tolist()):
            ids[o : o + e - b] = self.dataset.tokens(doc)[b:e]
        labels = ids.copy()
        labels[n_real:] = IGNORE_INDEX
        for doc, b, e, o in zip(docs.tolist(), begin.tolist(), end.tolist(), out.tolist()):
            mask = self.dataset.loss_mask(doc)
            if mask is not None:
                labels[o : o + e - b][~np.asarray(mask[b:e], dtype=bool)] = IGNORE_INDEX
        # boundaries: sub-rows, document ends inside the row, and the end of real tokens (padding after it)
        cu = np.unique(np.concatenate((self._subrow_bounds, doc_ends[doc_ends < stop] - start, [n_real])))
        return PackedBatch(
            input_ids=torch.from_numpy(ids).view(1, -1),
            labels=torch.from_numpy(labels).view(1, -1),
            cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
            max_seqlen=int(np.diff(cu).max()),
            num_tokens=n_real,
        )

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> PackedBatch:
        row = self._rows_consumed + self.rank
        if not self.loop and row >= self.rows_per_epoch:
            raise StopIteration
        batch = self._build_row(row)
        self._rows_consumed += self.world_size
        return batch

    def state_dict(self) -> dict:
        """Plain ints and bools. All ranks of one world have the same state after the same number of
        batches, and a state resumes on another world size without skipping or repeating a row."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "loop": self.loop,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "num_documents": self._num_documents,
            "num_tokens": self.tokens_per_epoch,
            "rows_consumed": self._rows_consumed,
        }

    def load_state_dict(self, state: dict) -> None:
        expected = self.state_dict()
        if not isinstance(state, dict) or set(state) != set(expected):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a PackedLoader state: keys {got}, expected {sorted(expected)}")
        differ = [
            f"{key} is {state[key]!r} in the state but {expected[key]!r} here"
            for key in expected
            if key != "rows_consumed" and state[key] != expected[key]
        ]
        if differ:
            raise ValueError("PackedLoader state does not match this loader: " + "; ".join(differ))
        rows = state["rows_consumed"]
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise ValueError(f"PackedLoader state rows_consumed must be a non-negative int, got {rows!r}")
        self._rows_consumed = rows
