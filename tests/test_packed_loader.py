"""PackedLoader: packing, cu_seqlens, SFT labels, shuffling, exact resume, padding, rank splitting, and the
packed-batch contract with the model end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from internlm_fast.data.packed_loader import PackedBatch, PackedLoader
from internlm_fast.model import InternLMForCausalLM

from .model_helpers import tiny_config


class ListDataset:
    """In-memory stand-in for TokenDataset: same API."""

    def __init__(self, docs: list[np.ndarray], masks: list[np.ndarray | None] | None = None, vocab_size: int = 1000):
        self.docs = [np.asarray(d, dtype=np.int32) for d in docs]
        self.masks = masks
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return len(self.docs)

    def tokens(self, i: int) -> np.ndarray:
        return self.docs[i]

    def loss_mask(self, i: int) -> np.ndarray | None:
        return None if self.masks is None else self.masks[i]


def random_docs(n: int, seed: int = 0, max_len: int = 40, vocab: int = 1000, empty_every: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, vocab, size=int(rng.integers(1, max_len + 1))) for _ in range(n)]
    if empty_every:
        for i in range(0, n, empty_every):
            docs[i] = docs[i][:0]
    return docs


def pieces(ds: ListDataset, seq_len: int) -> list[tuple[int, int]]:
    """(document, offset) of every seq_len slice of every non-empty document, in document order."""
    return [(i, o) for i in range(len(ds)) for o in range(0, len(ds.tokens(i)), seq_len)]


def epoch_order(ds: ListDataset, seed: int, epoch: int, seq_len: int, shuffle: bool = True) -> list[tuple[int, int]]:
    all_pieces = pieces(ds, seq_len)
    if not shuffle:
        return all_pieces
    return [all_pieces[k] for k in np.random.default_rng([seed, epoch]).permutation(len(all_pieces))]


def reference_stream(ds: ListDataset, seed: int, epochs: int, seq_len: int, shuffle: bool = True):
    """Token stream, label stream and piece-end offsets, built one piece at a time."""
    ids, labels, ends = [], [], []
    for epoch in range(epochs):
        for i, o in epoch_order(ds, seed, epoch, seq_len, shuffle):
            tokens = ds.tokens(i)[o : o + seq_len].astype(np.int64)
            mask = ds.loss_mask(i)
            ids.append(tokens)
            labels.append(tokens if mask is None else np.where(mask[o : o + seq_len], tokens, -100))
            ends.append(sum(map(len, ids)))
    return np.concatenate(ids), np.concatenate(labels), np.array(ends)


def take(loader: PackedLoader, n: int) -> list[PackedBatch]:
    return [next(loader) for _ in range(n)]


def assert_same_batch(a: PackedBatch, b: PackedBatch) -> None:
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.cu_seqlens, b.cu_seqlens)
    assert (a.max_seqlen, a.num_tokens) == (b.max_seqlen, b.num_tokens)


def test_rows_are_the_document_stream_in_permutation_order():
    ds = ListDataset(random_docs(60, empty_every=7))
    seq_len, mbs, seed = 16, 3, 5
    batches = list(PackedLoader(ds, seq_len, mbs, seed=seed, loop=False))
    got = np.concatenate([b.input_ids[0, : b.num_tokens].numpy() for b in batches])
    ids, _, _ = reference_stream(ds, seed, epochs=1, seq_len=seq_len)
    np.testing.assert_array_equal(got, ids)
    assert sorted({i for i, _ in epoch_order(ds, seed, 0, seq_len)}) == [i for i in range(60) if i % 7]  # empty skipped
    assert all(b.input_ids.shape == (1, seq_len * mbs) and b.input_ids.dtype == torch.int64 for b in batches)


@pytest.mark.parametrize("seq_len,mbs", [(16, 1), (16, 4), (7, 3), (64, 2)])
def test_cu_seqlens_mark_document_and_subrow_boundaries(seq_len, mbs):
    ds = ListDataset(random_docs(50, seed=1, max_len=30))
    loader = PackedLoader(ds, seq_len, mbs, seed=2, loop=True)
    row_len = seq_len * mbs
    n_rows = 3 * loader.rows_per_epoch  # crosses two epoch boundaries
    _, _, ends = reference_stream(ds, 2, epochs=4, seq_len=seq_len)
    for row in range(n_rows):
        b = next(loader)
        cu = b.cu_seqlens
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == row_len
        seg = (cu[1:] - cu[:-1]).numpy()
        assert (seg > 0).all() and seg.max() <= seq_len and b.max_seqlen == seg.max()
        doc_bounds = {int(e - row * row_len) for e in ends if row * row_len < e < (row + 1) * row_len}
        assert set(cu.tolist()) == doc_bounds | set(range(0, row_len + 1, seq_len))
        assert b.num_tokens == row_len


def test_sft_mask_sets_labels_to_ignore():
    docs = random_docs(30, seed=3)
    rng = np.random.default_rng(4)
    masks = [rng.random(len(d)) < 0.5 if i % 3 else None for i, d in enumerate(docs)]
    ds = ListDataset(docs, masks)
    batches = list(PackedLoader(ds, 32, 2, seed=1, loop=False))
    ids, labels, _ = reference_stream(ds, 1, epochs=1, seq_len=32)
    got_labels = np.concatenate([b.labels[0].numpy() for b in batches])
    got_ids = np.concatenate([b.input_ids[0].numpy() for b in batches])
    np.testing.assert_array_equal(got_labels[: len(labels)], labels)
    np.testing.assert_array_equal(got_ids[: len(ids)], ids)
    assert (got_labels == -100).sum() > 0.2 * len(ids)  # the masks did mask something
    assert (got_labels[len(labels) :] == -100).all()


def test_shuffle_is_deterministic_per_seed_and_epoch():
    ds = ListDataset(random_docs(40, seed=5))

    def stream(seed, shuffle=True):
        loader = PackedLoader(ds, 16, 2, seed=seed, shuffle=shuffle)
        return torch.cat([b.input_ids for b in take(loader, 2 * loader.rows_per_epoch)], 1)[0]

    assert torch.equal(stream(7), stream(7))
    assert not torch.equal(stream(7), stream(8))
    one_epoch = sum(len(d) for d in ds.docs)
    s = stream(7)
    assert not torch.equal(s[:one_epoch], s[one_epoch : 2 * one_epoch])  # a new order each epoch
    s = stream(7, shuffle=False)
    assert torch.equal(s[:one_epoch], torch.from_numpy(np.concatenate(ds.docs)).long())
    assert torch.equal(s[:one_epoch], s[one_epoch : 2 * one_epoch])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_resume_is_exact(world_size):
    ds = ListDataset(random_docs(25, seed=6), masks=None)
    kw = dict(seq_len=16, micro_batch_size=2, seed=11, world_size=world_size)
    for rank in range(world_size):
        full = take(PackedLoader(ds, rank=rank, **kw), 30)
        per_epoch = PackedLoader(ds, **kw).rows_per_epoch // world_size
        for k in [0, 1, 5, per_epoch, per_epoch + 1, 2 * per_epoch + 3]:
            first = PackedLoader(ds, rank=rank, **kw)
            take(first, k)
            state = json.loads(json.dumps(first.state_dict()))
            resumed = PackedLoader(ds, rank=rank, **kw)
            resumed.load_state_dict(state)
            for want, got in zip(full[k : k + 6], take(resumed, 6)):
                assert_same_batch(want, got)


def test_resume_on_another_world_size_neither_skips_nor_repeats():
    ds = ListDataset(random_docs(25, seed=7))
    single = PackedLoader(ds, 8, 2, seed=3)
    rows = take(single, 12)
    state = PackedLoader(ds, 8, 2, seed=3).state_dict()
    state["rows_consumed"] = 4  # as after 4 batches on one process
    ranks = [PackedLoader(ds, 8, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for step in range(4):
        for r, loader in enumerate(ranks):
            assert_same_batch(next(loader), rows[4 + 2 * step + r])


def test_loop_false_pads_the_last_row_then_stops():
    ds = ListDataset(random_docs(20, seed=8), vocab_size=50)
    total = sum(len(d) for d in ds.docs)
    seq_len, mbs = 16, 4
    row_len = seq_len * mbs
    assert total % row_len  # the test needs a partial last row
    loader = PackedLoader(ds, seq_len, mbs, seed=0, loop=False, pad_id=3)
    batches = list(loader)
    assert len(batches) == -(-total // row_len) == loader.rows_per_epoch
    last = batches[-1]
    n = total - (len(batches) - 1) * row_len
    assert last.num_tokens == n
    assert (last.input_ids[0, n:] == 3).all() and (last.labels[0, n:] == -100).all()
    assert n in last.cu_seqlens.tolist() and last.cu_seqlens[-1] == row_len
    assert (last.cu_seqlens[1:] - last.cu_seqlens[:-1]).max() <= seq_len
    assert all(b.num_tokens == row_len for b in batches[:-1])
    with pytest.raises(StopIteration):
        next(loader)


def test_ranks_are_disjoint_and_cover_the_rows():
    ds = ListDataset(random_docs(40, seed=9))
    kw = dict(seq_len=8, micro_batch_size=2, seed=4, loop=False)
    single = list(PackedLoader(ds, **kw))
    world = 3
    per_rank = [list(PackedLoader(ds, rank=r, world_size=world, **kw)) for r in range(world)]
    assert sum(map(len, per_rank)) == len(single)
    for g, want in enumerate(single):
        assert_same_batch(want, per_rank[g % world][g // world])


def test_row_longer_than_an_epoch():
    ds = ListDataset([np.array([1, 2, 3]), np.array([], dtype=np.int32), np.array([4, 5])])
    loader = PackedLoader(ds, seq_len=4, micro_batch_size=3, seed=0)
    ids, _, ends = reference_stream(ds, 0, epochs=10, seq_len=4)
    for row in range(4):
        b = next(loader)
        np.testing.assert_array_equal(b.input_ids[0].numpy(), ids[row * 12 : (row + 1) * 12])
        doc_bounds = {int(e - row * 12) for e in ends if row * 12 < e < (row + 1) * 12}
        assert set(b.cu_seqlens.tolist()) == doc_bounds | {0, 4, 8, 12}


def test_bad_arguments_are_rejected():
    ds = ListDataset(random_docs(5))
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(ds, 0)
    with pytest.raises(ValueError, match="micro_batch_size"):
        PackedLoader(ds, 8, micro_batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        PackedLoader(ds, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        PackedLoader(ds, 8, rank=-1)
    with pytest.raises(ValueError, match="dataset is empty"):
        PackedLoader(ListDataset([]), 8)
    with pytest.raises(ValueError, match="all are empty"):
        PackedLoader(ListDataset([np.array([], dtype=np.int32)] * 3), 8)


def test_bad_state_is_rejected_saying_what_differs():
    ds = ListDataset(random_docs(5))
    state = PackedLoader(ds, 8, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed is 1 in the state but 2 here"):
        PackedLoader(ds, 8, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len is 8 in the state but 16 here"):
        PackedLoader(ds, 16, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_documents"):
        PackedLoader(ListDataset(random_docs(6)), 8, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="keys"):
        PackedLoader(ds, 8, seed=1).load_state_dict({k: v for k, v in state.items() if k != "seed"})
    with pytest.raises(ValueError, match="rows_consumed"):
        PackedLoader(ds, 8, seed=1).load_state_dict({**state, "rows_consumed": -1})


def test_packed_loss_equals_the_mean_of_per_segment_losses():
    """The model's loss on a packed batch = (sum of per-token losses of each segment run alone) / count:
    positions restart per segment, attention stays inside it, and -100 labels are not learnt."""
    torch.manual_seed(0)
    vocab = 97
    docs = random_docs(12, seed=10, max_len=20, vocab=vocab)
    rng = np.random.default_rng(11)
    masks = [rng.random(len(d)) < 0.7 if i % 2 else None for i, d in enumerate(docs)]
    ds = ListDataset(docs, masks, vocab_size=vocab)
    model = InternLMForCausalLM(tiny_config(vocab_size=vocab))
    model.eval()
    batches = list(PackedLoader(ds, seq_len=16, micro_batch_size=3, seed=0, loop=False))
    assert len(batches) >= 2 and batches[-1].num_tokens < 48  # includes a padded row
    for b in batches:
        with torch.no_grad():
            loss = model(b.input_ids, labels=b.labels, cu_seqlens=b.cu_seqlens).loss
            total, count = 0.0, 0
            cu = b.cu_seqlens.tolist()
            for s, e in zip(cu[:-1], cu[1:]):
                logits = model(b.input_ids[:, s:e]).logits[0].double()
                target = b.labels[0, s + 1 : e]
                total += F.cross_entropy(logits[:-1], target, ignore_index=-100, reduction="sum").item()
                count += int((target != -100).sum())
        assert count > 0
        expected = torch.tensor(total / count, dtype=torch.float64)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
