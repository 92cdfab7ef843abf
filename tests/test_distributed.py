"""Data-parallel training with the ZeRO optimizer on real torch.distributed (gloo, CPU), each rank a
real process started as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):
- 2 ranks with half the global batch each equal one process step for step, with about half the
  optimizer state per rank;
- a checkpoint of 2 ranks resumes exactly on 2, on 1 (sharded or plain single process), and
  reshards onto 4, with the data position carried over;
- a rank killed or stopped mid-run makes the other stop with a clear error within the timeout,
  and the last complete checkpoint stays intact."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from internlm_fast.data import tokenize_files, train_tokenizer
from internlm_fast.train.checkpoint import latest_valid_checkpoint, load_checkpoint, verify_checkpoint
from internlm_fast.train.zero_checkpoint import is_sharded, param_state_from_shards

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
STEPS = 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for n in ["argparse.py", "json/decoder.py", "textwrap.py", "shlex.py", "fractions.py", "heapq.py"]:
        files.append(folder / (n.replace("/", "_") + ".txt"))
        files[-1].write_text((stdlib / n).read_text())
    tok = train_tokenizer(files, folder / "tok.model", vocab_size=512)
    tokenize_files(tok, files[:-1], folder / "train", workers=1, progress=False)
    tokenize_files(tok, files[-1:], folder / "val", workers=1, progress=False)
    return {"tokenizer": tok, "train": folder / "train", "val": folder / "val"}


def _overrides(corpus, run_dir: Path, **extra) -> list[str]:
    values = {
        "data.train": corpus["train"],
        "data.val": corpus["val"],
        "data.tokenizer": corpus["tokenizer"],
        "data.seq_len": 64,
        "data.micro_bsz": 2,
        "data.total_steps": STEPS,
        "model.vocab_size": 512,
        "model.hidden_size": 64,
        "model.intermediate_size": 96,
        "model.num_hidden_layers": 2,
        "model.num_attention_heads": 4,
        "model.max_position_embeddings": 128,
        "optimizer.lr": 1e-2,
        "lr_scheduler.warmup_ratio": 0.25,
        "log.folder": run_dir,
        "log.eval_every": 0,
        "log.eval_batches": 2,
        "log.progress": False,
        "log.tensorboard": False,
        "ckpt.checkpoint_every": 10,
        "ckpt.keep_last": 10,
        "generate.max_new_tokens": 0,
        "threads": 1,
        "dist.bucket_mb": 0.05,  # several buckets even for this tiny model: the overlap is exercised
        "dist.timeout_s": 20,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int | None, args: list[str], log: Path) -> list[subprocess.Popen]:
    """world ranks of `python args...` as torchrun would start them; world None: one plain process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python"), "OMP_NUM_THREADS": "1"}
    if world is None:
        return [subprocess.Popen([sys.executable, *args], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)]
    port = str(_free_port())
    procs = []
    for rank in range(world):
        rank_env = {
            **env,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        out = open(f"{log}.rank{rank}", "w")
        procs.append(subprocess.Popen([sys.executable, *args], env=rank_env, stdout=out, stderr=subprocess.STDOUT))
    return procs


def _wait_ok(procs: list[subprocess.Popen], log: Path, timeout: float = 120) -> None:
    for i, p in enumerate(procs):
        rc = p.wait(timeout=timeout)
        if rc != 0:
            f = Path(f"{log}.rank{i}") if Path(f"{log}.rank{i}").exists() else log
            raise AssertionError(f"process {i} exited with {rc}:\n{f.read_text()[-3000:]}")


def _worker(world: int | None, corpus, tmp: Path, name: str, **extra) -> list[subprocess.Popen]:
    args = [str(WORKER), str(tmp / name), *_overrides(corpus, tmp / name, **extra)]
    return _launch(world, args, tmp / f"{name}.log")


def _result(tmp: Path, name: str, rank: int = 0) -> dict:
    return json.loads((tmp / f"{name}-rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> Path:
    """One process with micro_num=2 and two ranks with micro_num=1 (the same global batch), side by side."""
    tmp = tmp_path_factory.mktemp("runs")
    procs = _worker(None, corpus, tmp, "single", **{"data.micro_num": 2})
    procs += _worker(2, corpus, tmp, "dp2", **{"data.micro_num": 1})
    _wait_ok(procs[:1], tmp / "single.log")
    _wait_ok(procs[1:], tmp / "dp2.log")
    return tmp


def test_two_ranks_equal_one_process_with_half_the_optimizer_state(runs):
    single, rank0, rank1 = _result(runs, "single"), _result(runs, "dp2", 0), _result(runs, "dp2", 1)
    assert len(single["losses"]) == len(rank0["losses"]) == STEPS
    diff = max(abs(a - b) for a, b in zip(single["losses"], rank0["losses"]))
    assert diff <= 1e-5, (single["losses"], rank0["losses"])
    assert rank0["losses"] == rank1["losses"]  # the reported loss is the global mean on every rank
    assert single["losses"][-1] < single["losses"][0] - 0.5  # it trains
    for r in (rank0, rank1):
        assert r["state_bytes"] <= 0.55 * single["state_bytes"], (r["state_bytes"], single["state_bytes"])
    assert rank0["rows_consumed"] == single["rows_consumed"] == 2 * STEPS


def test_per_rank_metrics_include_communication(runs):
    for path in (runs / "dp2" / "metrics.jsonl", runs / "dp2" / "ranks" / "rank1" / "metrics.jsonl"):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        train = [r for r in records if r.get("split") != "val"]
        assert [r["step"] for r in train] == list(range(1, STEPS + 1))
        for key in ("tgs", "tflops", "comm_s", "comm_wait_s", "comm_hidden", "rs_hidden"):
            assert all(key in r for r in train), key
        assert all(r["comm_s"] > 0 and 0 <= r["rs_hidden"] <= 1 for r in train[1:])


def test_sharded_checkpoint_layout(runs):
    ckpt = load_checkpoint(runs / "dp2" / "checkpoints" / "step-00000010")
    assert is_sharded(ckpt) and ckpt.optimizer_state["world_size"] == 2
    names = {p.name for p in ckpt.path.iterdir()}
    assert {"optimizer-rank00000-of-00002.pt", "optimizer-rank00001-of-00002.pt", "rng-rank00001.pt"} <= names
    assert set(json.loads((ckpt.path / "checksums.json").read_text())) == names - {"checksums.json"}
    assert ckpt.trainer_state["loader"]["rows_consumed"] == 20
    # a damaged shard is detected by the checksums like any other file
    damaged = runs / "damaged"
    damaged.mkdir()
    for f in ckpt.path.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    with open(damaged / "optimizer-rank00001-of-00002.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    assert "does not match its checksum" in verify_checkpoint(damaged)


def test_resume_on_two_one_and_four_ranks(runs, corpus):
    """From the 2-rank checkpoint at step 10: 2 ranks and 1 rank (sharded, or a plain process, with
    micro_num=2: the same global batch) continue with the uninterrupted run's losses; 4 ranks reshard
    (a run with no step left re-saves the state it loaded, to compare)."""
    ckpt = runs / "dp2" / "checkpoints" / "step-00000010"
    resume = {"ckpt.resume": ckpt}
    procs = {
        "re2": _worker(2, corpus, runs, "re2", **resume),
        "re1": _worker(1, corpus, runs, "re1", **resume, **{"data.micro_num": 2}),
        "plain1": _worker(None, corpus, runs, "plain1", **resume, **{"data.micro_num": 2}),
        "re4": _worker(4, corpus, runs, "re4", **resume, **{"data.total_steps": 10, "dist.bucket_mb": 0.02}),
    }
    for name, p in procs.items():
        _wait_ok(p, runs / f"{name}.log")
    expected = _result(runs, "dp2")["losses"][10:]
    for name in ("re2", "re1", "plain1"):
        got = _result(runs, name)["losses"]
        assert len(got) == 10
        assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-5, (name, got, expected)
    assert _result(runs, "re2")["losses"] == expected  # the same world size resumes bitwise
    # 4 ranks, other buckets: the state they loaded and saved again is the 2-rank state, element for element
    a, b = load_checkpoint(ckpt), load_checkpoint(runs / "re4" / "checkpoints" / "step-00000010")
    assert b.optimizer_state["world_size"] == 4 and b.optimizer_state["layout"] != a.optimizer_state["layout"]
    step_a, state_a = param_state_from_shards(a)
    step_b, state_b = param_state_from_shards(b)
    assert step_a == step_b == 10 and state_a.keys() == state_b.keys()
    for name in state_a:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state_a[name][key], state_b[name][key]), (name, key)
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
    assert b.trainer_state["loader"] == a.trainer_state["loader"]


@pytest.mark.parametrize("fault", ["killed", "stopped"])
def test_a_dead_or_hung_rank_stops_the_others_with_a_clear_error(corpus, tmp_path, fault):
    timeout_s = 6
    run = tmp_path / "run"
    args = ["-m", "internlm_fast.train", *_overrides(corpus, run, **{
        "data.total_steps": 100000, "ckpt.checkpoint_every": 3, "ckpt.keep_last": 2, "dist.timeout_s": timeout_s
    })]
    procs = _launch(2, args, tmp_path / "log")
    try:
        deadline = time.time() + 60
        while not latest_valid_checkpoint(run / "checkpoints")[0]:
            assert time.time() < deadline and all(p.poll() is None for p in procs), "no checkpoint appeared"
            time.sleep(0.2)
        os.kill(procs[1].pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        t0 = time.time()
        rc = procs[0].wait(timeout=timeout_s + 30)
        elapsed = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = Path(f"{tmp_path / 'log'}.rank0").read_text()
    assert rc != 0
    assert "error: rank 0 of 2" in out and "another rank died, hung or was killed" in out, out[-2000:]
    assert elapsed < timeout_s + 25, elapsed
    path, skipped = latest_valid_checkpoint(run / "checkpoints")
    assert path is not None and verify_checkpoint(path) is None and not skipped
