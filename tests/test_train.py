"""The trainer end to end on a small real corpus: metrics, checkpoints, bitwise resume, NaN skipping,
kill -9 during a checkpoint save, and the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import internlm_fast
from internlm_fast.data import TokenDataset
from internlm_fast.train.checkpoint import list_checkpoints, load_checkpoint
from internlm_fast.train.config import load_config
from internlm_fast.train.trainer import Trainer

from .corpus_helpers import make_corpus
from .train_helpers import run_overrides


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer and train/val token files made from a few standard-library modules."""
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def _overrides(corpus, run_dir: Path, **extra) -> list[str]:
    every = {"log.eval_every": 4, "ckpt.checkpoint_every": 3, "log.tensorboard": True, "generate.max_new_tokens": 8}
    return run_overrides(corpus, run_dir, **{**every, **extra})


def _train(corpus, run_dir: Path, **extra):
    return Trainer(load_config(None, _overrides(corpus, run_dir, **extra))).fit()


def test_trains_logs_checkpoints_and_samples(corpus, tmp_path):
    result = _train(corpus, tmp_path / "run", **{"data.total_steps": 12, "data.micro_num": 2})
    assert len(result.losses) == 12 and result.inf_nan_skip_batches == 0
    assert result.losses[-1] < result.losses[0] - 0.5, result.losses
    assert result.val_loss is not None and result.val_loss < result.losses[0]
    assert isinstance(result.sample, str)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") != "val"]
    assert [r["step"] for r in train] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "tgs", "tflops", "mem_mib", "step_s", "data_share", "inf_nan_skip_batches"):
        assert key in train[0], key
    assert train[0]["lr"] < train[5]["lr"]  # warmup
    assert sum(r.get("split") == "val" for r in records) == 3  # steps 4, 8 and the end
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "step-00000003",
        "step-00000006",
        "step-00000009",
        "step-00000012",
    ]


def test_resume_is_bitwise(corpus, tmp_path):
    full = _train(corpus, tmp_path / "full")
    first = load_checkpoint(tmp_path / "full" / "checkpoints" / "step-00000003")
    resumed = _train(corpus, tmp_path / "resumed", **{"ckpt.resume": str(first.path)})
    assert resumed.losses == full.losses[3:]
    a = load_checkpoint(full.checkpoint).model_state
    b = load_checkpoint(resumed.checkpoint).model_state
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_auto_with_nothing_to_resume_starts_fresh(corpus, tmp_path):
    result = _train(corpus, tmp_path / "run", **{"ckpt.resume": "auto", "data.total_steps": 2})
    assert len(result.losses) == 2


def test_nan_loss_skips_the_update_and_counts_it(corpus, tmp_path):
    trainer = Trainer(load_config(None, _overrides(corpus, tmp_path / "run")))
    batches = [next(iter(trainer.loader))]
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with torch.no_grad():
        trainer.model.model.norm.weight[0] = float("nan")
    metrics = trainer.train_step(batches)
    assert metrics["skipped"] and trainer.inf_nan_skip_batches == 1
    with torch.no_grad():
        trainer.model.model.norm.weight[0] = before["model.norm.weight"][0]
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    metrics = trainer.train_step(batches)
    assert not metrics["skipped"] and trainer.inf_nan_skip_batches == 1
    assert not torch.equal(before["lm_head.weight"], trainer.model.lm_head.weight)


def test_bf16_trains(corpus, tmp_path):
    result = _train(corpus, tmp_path / "run", **{"model.dtype": "bf16", "data.total_steps": 6})
    assert result.losses[-1] < result.losses[0]
    state = load_checkpoint(result.checkpoint).model_state
    assert state["lm_head.weight"].dtype == torch.float32  # the fp32 master weights are what is saved


def _cli(args: list[str], **popen) -> subprocess.Popen:
    # the package under test, whether installed or run from python/ with PYTHONPATH
    src = str(Path(internlm_fast.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    return subprocess.Popen([sys.executable, "-m", "internlm_fast.train", *args], env=env, **popen)


def test_cli_unknown_key_is_an_error_with_a_suggestion(tmp_path):
    proc = _cli(["--optimizer.learning_rate=1"], stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "optimizer.learning_rate" in err and "optimizer.lr" in err


def test_kill_during_checkpoint_save_then_resume_auto(corpus, tmp_path):
    """Checkpoint every step with a model whose files take a while to write, kill -9 the trainer as
    soon as a save has started, resume with --resume auto and finish: the final loss is the one of
    an uninterrupted run."""
    big = {"model.vocab_size": 8192, "data.total_steps": 10, "ckpt.checkpoint_every": 1, "ckpt.keep_last": 3}
    reference = _train(corpus, tmp_path / "reference", **big)
    run_dir = tmp_path / "killed"
    ckpts = run_dir / "checkpoints"
    args = [f"--{o}" for o in _overrides(corpus, run_dir, **big)]
    proc = _cli(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_mid_save = False
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if list_checkpoints(ckpts) and list(ckpts.glob(".tmp-step-*")):
            os.kill(proc.pid, signal.SIGKILL)
            killed_mid_save = True
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert killed_mid_save, "the trainer finished before a save could be interrupted"
    assert list(ckpts.glob(".tmp-step-*")), "the kill did not land during a save"
    newest = list_checkpoints(ckpts)[-1]
    proc = _cli([*args, "--resume", "auto"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resumed from {newest}" in err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") != "val"]
    assert [r["step"] for r in train] == list(range(1, 11))
    assert train[-1]["loss"] == reference.losses[-1]
    final = load_checkpoint(list_checkpoints(ckpts)[-1])
    assert final.step == 10


def test_tokens_files_are_used_as_given(corpus):
    assert len(TokenDataset(corpus["train"])) == 5
