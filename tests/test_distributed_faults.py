"""Sharded checkpoints reshard onto another world size (2 -> 4 and 2 -> 1 under torchrun), and a
rank that dies or hangs makes the others stop with a clear error within the timeout, leaving the
last complete checkpoint intact. Real gloo process groups, ranks launched as torchrun would."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from internlm_fast.train.checkpoint import latest_valid_checkpoint, load_checkpoint, verify_checkpoint
from internlm_fast.train.zero_checkpoint import param_state_from_shards

from .corpus_helpers import make_corpus
from .dist_helpers import launch, overrides, result, wait_ok, worker

TIMEOUT_S = 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def faulted(corpus, tmp_path_factory) -> dict[str, tuple[Path, int, float]]:
    """Two 2-rank runs side by side: in one, rank 1 is killed (SIGKILL) once a checkpoint exists; in
    the other it hangs (SIGSTOP). fault -> (run folder, rank 0's exit code, seconds rank 0 took to exit)."""
    tmp = tmp_path_factory.mktemp("faults")
    groups = {}
    for fault in ("killed", "stopped"):
        run = tmp / fault
        extra = {"data.total_steps": 100000, "ckpt.checkpoint_every": 3, "dist.timeout_s": TIMEOUT_S}
        args = ["-m", "internlm_fast.train", *overrides(corpus, run, **extra)]
        groups[fault] = (run, launch(2, args, run.with_suffix(".log")))
    out = {}
    try:
        deadline = time.time() + 60
        for fault, (run, procs) in groups.items():
            while not latest_valid_checkpoint(run / "checkpoints")[0]:
                assert time.time() < deadline and all(p.poll() is None for p in procs), f"{fault}: no checkpoint"
                time.sleep(0.2)
            os.kill(procs[1].pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        t0 = time.time()
        for fault, (run, procs) in groups.items():
            out[fault] = (run, procs[0].wait(timeout=TIMEOUT_S + 40), time.time() - t0)
    finally:
        for _, procs in groups.values():
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    return out


@pytest.mark.parametrize("fault", ["killed", "stopped"])
def test_a_dead_or_hung_rank_stops_the_other_with_a_clear_error(faulted, fault):
    run, code, elapsed = faulted[fault]
    log = Path(f"{run.with_suffix('.log')}.rank0").read_text()
    assert code != 0
    assert "error: rank 0 of 2" in log and "another rank died, hung or was killed" in log, log[-2000:]
    assert elapsed < TIMEOUT_S + 30, elapsed
    path, skipped = latest_valid_checkpoint(run / "checkpoints")
    assert path is not None and verify_checkpoint(path) is None and not skipped


def test_the_checkpoint_left_by_a_killed_run_reshards_onto_four_and_one(faulted, corpus, tmp_path):
    """A run with no step left re-saves the state it loaded: 4 ranks (other buckets too) and 1 rank
    save the 2-rank state element for element, with the data position."""
    src, _ = latest_valid_checkpoint(faulted["killed"][0] / "checkpoints")
    step = int(src.name.split("-")[1])
    again = {"ckpt.resume": src, "data.total_steps": step}
    procs = {
        "re4": worker(4, corpus, tmp_path, "re4", **again, **{"dist.bucket_mb": 0.02}),
        "re1": worker(1, corpus, tmp_path, "re1", **again),
    }
    for name, p in procs.items():
        wait_ok(p, tmp_path / f"{name}.log")
    a = load_checkpoint(src)
    step_a, state_a = param_state_from_shards(a)
    for name, world in (("re4", 4), ("re1", 1)):
        b = load_checkpoint(tmp_path / name / "checkpoints" / src.name)
        assert b.optimizer_state["world_size"] == world
        assert len(b.optimizer_state["shards"]) == world
        step_b, state_b = param_state_from_shards(b)
        assert step_a == step_b == step and state_a.keys() == state_b.keys()
        for key in state_a:
            for moment in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(state_a[key][moment], state_b[key][moment]), (name, key, moment)
        assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
        assert b.trainer_state["loader"] == a.trainer_state["loader"]
        assert result(tmp_path, name)["rows_consumed"] == 2 * step
    layouts = [load_checkpoint(tmp_path / n / "checkpoints" / src.name).optimizer_state["layout"] for n in procs]
    assert layouts[0] != a.optimizer_state["layout"]  # 0.02 MB buckets: the state really was cut anew
