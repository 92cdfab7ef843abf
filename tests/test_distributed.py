"""Data-parallel training with the ZeRO optimizer on real torch.distributed (gloo, CPU), each rank a
real process started as torchrun would: 2 ranks with half the global batch each equal one process
step for step with about half the optimizer state per rank (fp32 and bf16); their checkpoint
resumes exactly on 2 ranks (in ZeRO stage 1 too) and on a plain single process (same global batch),
data position included.
Resharding onto 4 ranks and dead or hung ranks: test_distributed_faults.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from internlm_fast.train.checkpoint import load_checkpoint, verify_checkpoint
from internlm_fast.train.zero_checkpoint import is_sharded

from .corpus_helpers import make_corpus
from .dist_helpers import result, wait_ok, worker

STEPS, RESUME_AT = 20, 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> Path:
    """One process with micro_num=2 and two ranks with micro_num=1 (the same global batch), side by side."""
    tmp = tmp_path_factory.mktemp("runs")
    every = {"ckpt.checkpoint_every": RESUME_AT}
    bf16 = {"model.dtype": "bf16", "data.total_steps": 4}
    procs = {
        "single": worker(None, corpus, tmp, "single", **every, **{"data.micro_num": 2}),
        "dp2": worker(2, corpus, tmp, "dp2", **every, **{"data.micro_num": 1}),
        "bf16_single": worker(None, corpus, tmp, "bf16_single", **bf16, **{"data.micro_num": 2}),
        "bf16_dp2": worker(2, corpus, tmp, "bf16_dp2", **bf16),
        "nan_dp2": worker(2, corpus, tmp, "nan_dp2", env={"DIST_WORKER_NAN_AT": "2"}, **{"data.total_steps": 4}),
    }
    for name, p in procs.items():
        wait_ok(p, tmp / f"{name}.log")
    return tmp


def test_two_ranks_equal_one_process_with_half_the_optimizer_state(runs):
    single, rank0, rank1 = result(runs, "single"), result(runs, "dp2", 0), result(runs, "dp2", 1)
    assert len(single["losses"]) == len(rank0["losses"]) == STEPS
    diff = max(abs(a - b) for a, b in zip(single["losses"], rank0["losses"]))
    assert diff <= 1e-5, (single["losses"], rank0["losses"])
    assert rank0["losses"] == rank1["losses"]  # the reported loss is the global mean on every rank
    assert single["losses"][-1] < single["losses"][0] - 0.5  # it trains
    for r in (rank0, rank1):
        assert r["state_bytes"] <= 0.55 * single["state_bytes"], (r["state_bytes"], single["state_bytes"])
    assert rank0["rows_consumed"] == single["rows_consumed"] == 2 * STEPS


def test_bf16_keeps_fp32_master_shards(runs):
    """bf16 model: each rank holds the fp32 masters and moments of its shards only (about half the
    single process's optimizer memory); the checkpoint holds the fp32 masters, as a single process's does."""
    single, rank0 = result(runs, "bf16_single"), result(runs, "bf16_dp2", 0)
    assert rank0["state_bytes"] <= 0.55 * single["state_bytes"], (rank0["state_bytes"], single["state_bytes"])
    assert max(abs(a - b) for a, b in zip(single["losses"], rank0["losses"])) <= 2e-2
    ckpt = load_checkpoint(runs / "bf16_dp2" / "checkpoints" / "step-00000004")
    assert all(t.dtype == torch.float32 for t in ckpt.model_state.values())
    plain = load_checkpoint(runs / "bf16_single" / "checkpoints" / "step-00000004")
    assert ckpt.model_state.keys() == plain.model_state.keys()


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(runs):
    rank0, rank1 = result(runs, "nan_dp2", 0), result(runs, "nan_dp2", 1)
    assert rank0["skipped_steps"] == rank1["skipped_steps"] == [2]
    assert rank0["inf_nan_skip_batches"] == rank1["inf_nan_skip_batches"] == 1
    assert rank0["param_sum"] == rank1["param_sum"]  # the replicas stayed identical
    assert all(x == x for x in rank0["losses"][2:])  # training went on


def test_per_rank_metrics_include_communication(runs):
    for path in (runs / "dp2" / "metrics.jsonl", runs / "dp2" / "ranks" / "rank1" / "metrics.jsonl"):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        train = [r for r in records if r.get("split") != "val"]
        assert [r["step"] for r in train] == list(range(1, STEPS + 1))
        for key in ("tgs", "tflops", "comm_s", "comm_wait_s", "comm_hidden", "rs_hidden"):
            assert all(key in r for r in train), key
        assert all(r["comm_s"] > 0 and 0 <= r["rs_hidden"] <= 1 and 0 <= r["comm_hidden"] <= 1 for r in train[1:])


def test_sharded_checkpoint_layout_and_checksums(runs, tmp_path):
    ckpt = load_checkpoint(runs / "dp2" / "checkpoints" / f"step-{RESUME_AT:08d}")
    assert is_sharded(ckpt) and ckpt.optimizer_state["world_size"] == 2
    names = {p.name for p in ckpt.path.iterdir()}
    assert {"optimizer-rank00000-of-00002.pt", "optimizer-rank00001-of-00002.pt", "rng-rank00001.pt"} <= names
    assert set(json.loads((ckpt.path / "checksums.json").read_text())) == names - {"checksums.json"}
    assert ckpt.trainer_state["loader"]["rows_consumed"] == 2 * RESUME_AT
    for f in ckpt.path.iterdir():  # a damaged shard is caught by the checksums like any other file
        (tmp_path / f.name).write_bytes(f.read_bytes())
    with open(tmp_path / "optimizer-rank00001-of-00002.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    assert "does not match its checksum" in verify_checkpoint(tmp_path)


def test_resume_on_two_ranks_and_on_one_plain_process(runs, corpus):
    resume = {"ckpt.resume": runs / "dp2" / "checkpoints" / f"step-{RESUME_AT:08d}"}
    procs = {
        "re2": worker(2, corpus, runs, "re2", **resume, **{"dist.zero_stage": 1}),  # all-reduce buckets
        "plain1": worker(None, corpus, runs, "plain1", **resume, **{"data.micro_num": 2}),
    }
    for name, p in procs.items():
        wait_ok(p, runs / f"{name}.log")
    expected = result(runs, "dp2")["losses"][RESUME_AT:]
    assert result(runs, "re2")["losses"] == expected  # the same world size resumes bitwise (even in stage 1)
    got = result(runs, "plain1")["losses"]  # 2 -> 1: AdamW state rebuilt from the shards
    assert len(got) == STEPS - RESUME_AT
    assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-5, (got, expected)
    assert result(runs, "plain1")["rows_consumed"] == result(runs, "dp2")["rows_consumed"]
