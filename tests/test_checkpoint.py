"""Atomic checkpoints: round trip, checksums, keep-last-K, stale temporaries, damaged ones skipped."""

from __future__ import annotations

import json

import pytest
import torch

from internlm_fast.model import InternLMForCausalLM, preset
from internlm_fast.train.checkpoint import (
    CheckpointError,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    model_tensors,
    save_checkpoint,
    verify_checkpoint,
)
from internlm_fast.train.schedule import WarmupCosine


def _model(tie: bool = False) -> InternLMForCausalLM:
    torch.manual_seed(0)
    cfg = preset(
        "tiny", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
    )
    cfg.tie_word_embeddings = tie
    return InternLMForCausalLM(cfg)


def _save(folder, step, model, keep_last=2):
    opt = torch.optim.AdamW(model.parameters())
    return save_checkpoint(folder, step, model_tensors(model), {"optimizer": opt.state_dict()}, {"x": step}, keep_last)


def test_round_trip_is_bitwise(tmp_path):
    model = _model()
    path = _save(tmp_path, 7, model)
    assert path.name == "step-00000007" and verify_checkpoint(path) is None
    ckpt = load_checkpoint(path)
    assert ckpt.step == 7 and ckpt.trainer_state["x"] == 7
    for name, t in model.state_dict().items():
        assert torch.equal(ckpt.model_state[name], t), name
    # the HF names load into a fresh model unchanged
    fresh = _model()
    torch.nn.init.zeros_(fresh.lm_head.weight)
    fresh.load_state_dict(ckpt.model_state)
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


def test_tied_weights_are_stored_once(tmp_path):
    model = _model(tie=True)
    tensors = model_tensors(model)
    assert ("lm_head.weight" in tensors) != ("model.embed_tokens.weight" in tensors)


def test_keep_last_and_stale_temporaries(tmp_path):
    model = _model()
    stale = tmp_path / ".tmp-step-00000001-999"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert not stale.exists()


def test_damaged_newest_is_skipped(tmp_path):
    model = _model()
    _save(tmp_path, 1, model)
    newest = _save(tmp_path, 2, model)
    with open(newest / "optimizer.pt", "r+b") as f:
        f.seek(10)
        f.write(b"\x00garbage")
    path, skipped = latest_valid_checkpoint(tmp_path)
    assert path.name == "step-00000001"
    assert len(skipped) == 1 and "optimizer.pt" in skipped[0] and "checksum" in skipped[0]
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(newest)


def test_incomplete_checkpoint_is_reported(tmp_path):
    model = _model()
    path = _save(tmp_path, 3, model)
    (path / "checksums.json").unlink()
    assert "incomplete" in verify_checkpoint(path)
    assert latest_valid_checkpoint(tmp_path)[0] is None
    json.loads((path / "trainer.json").read_text())  # the rest is untouched


def test_warmup_cosine():
    s = WarmupCosine(lr=1.0, total_steps=100, warmup_ratio=0.1, eta_min=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(55) == pytest.approx(0.1 + 0.45 * (1 + torch.cos(torch.tensor(torch.pi * 0.5)).item()))
    assert s(99) > 0.1 and s(99) == pytest.approx(0.1, abs=1e-3)
    assert all(s(i) >= s(i + 1) for i in range(10, 99))
