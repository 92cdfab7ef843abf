"""The trainer's three optimizer modes (plain fp32, fp32 masters of a bf16 model, ZeRO on a one-rank
gloo group) each round-trip their state, through state_dict/load_state_dict and through a checkpoint
folder: a fresh optimizer over a differently initialised model then takes bitwise the same next step
as the one that never stopped."""

from __future__ import annotations

import copy
import datetime

import pytest
import torch
import torch.distributed as dist

from internlm_fast.model import InternLMConfig, InternLMForCausalLM
from internlm_fast.train.distributed import DistContext
from internlm_fast.train.optimizer_modes import MasterAdamW, PlainAdamW, TrainOptimizer
from internlm_fast.train.zero_optim import ZeroOptimizer

from .model_helpers import TINY_CONFIG

CFG = TINY_CONFIG
MODES = [("plain", torch.float32), ("master", torch.bfloat16), ("zero", torch.float32), ("zero", torch.bfloat16)]
IDS = [f"{mode}-{str(dtype).removeprefix('torch.')}" for mode, dtype in MODES]


@pytest.fixture(scope="module")
def one_rank():
    """A gloo group of this process alone, as torchrun with one process makes."""
    timeout = datetime.timedelta(seconds=30)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    yield DistContext(0, 1, 0, "gloo", torch.device("cpu"), 30.0)
    dist.destroy_process_group()


def _build(mode: str, dtype: torch.dtype, seed: int, ctx: DistContext) -> TrainOptimizer:
    torch.manual_seed(seed)
    model = InternLMForCausalLM(InternLMConfig(**CFG))
    cos, sin = model.rotary_cos, model.rotary_sin
    model.to(dtype)
    model.rotary_cos, model.rotary_sin = cos, sin
    hyper = {"lr": 1e-2, "weight_decay": 0.1}
    if mode == "plain":
        return PlainAdamW(model, **hyper)
    if mode == "master":
        return MasterAdamW(model, **hyper)
    return ZeroOptimizer(model, ctx, **hyper, bucket_mb=0.01, blocks=list(model.model.layers))


def _step(opt: TrainOptimizer) -> tuple[float, float]:
    """One step on a batch of two packed documents drawn from torch's RNG."""
    ids = torch.randint(0, CFG["vocab_size"], (1, 32))
    cu_seqlens = torch.tensor([0, 20, 32], dtype=torch.int32)
    opt.prepare_backward(last=True)
    out = opt.model(ids, labels=ids, cu_seqlens=cu_seqlens)
    out.loss.backward()
    metrics = opt.step(out.loss.item(), 1e-2, 1.0)
    opt.zero_grad()
    opt.wait_params()
    assert not metrics["skipped"]
    return metrics["loss"], metrics["grad_norm"]


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _same_model(a: TrainOptimizer, b: TrainOptimizer) -> bool:
    return _equal(dict(a.model.state_dict()), dict(b.model.state_dict()))


@pytest.mark.parametrize(("mode", "dtype"), MODES, ids=IDS)
def test_checkpoint_round_trip(mode, dtype, one_rank, tmp_path):
    a = _build(mode, dtype, 0, one_rank)
    assert isinstance(a, TrainOptimizer)
    _step(a)
    _step(a)
    path = a.save(tmp_path, 2, {"note": mode}, keep_last=1)
    after_a = _step(a)  # its batch comes from the RNG state the checkpoint holds
    b = _build(mode, dtype, 1, one_rank)
    assert not _same_model(a, b)
    ckpt = b.load(path)
    assert ckpt.step == 2 and ckpt.trainer_state["note"] == mode
    assert _step(b) == after_a
    assert _same_model(a, b)
    assert _equal(a.state_dict(), b.state_dict())


@pytest.mark.parametrize(("mode", "dtype"), MODES, ids=IDS)
def test_state_dict_round_trip(mode, dtype, one_rank):
    a = _build(mode, dtype, 0, one_rank)
    _step(a)
    weights = {k: v.clone() for k, v in a.model.state_dict().items()}
    state = copy.deepcopy(a.state_dict())  # torch's state_dict holds the live tensors
    torch.manual_seed(7)
    after_a = _step(a)
    b = _build(mode, dtype, 1, one_rank)
    b.model.load_state_dict(weights)
    b.load_state_dict(state)
    torch.manual_seed(7)
    assert _step(b) == after_a
    assert _same_model(a, b)
    assert _equal(a.state_dict(), b.state_dict())
