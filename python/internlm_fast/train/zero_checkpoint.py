"""Checkpoints of a sharded (ZeRO) run, in the same atomic folder format as train/checkpoint.py.

Beside the usual files, a sharded checkpoint holds each rank's optimizer shard:
  model.safetensors                   full weights (fp32 masters for bf16 runs), written by rank 0
  optimizer.pt                        {"format": "zero", world_size, step, layout, shards: [file names]}
  optimizer-rank{r}-of-{w}.pt         rank r's AdamW moments, one flat tensor per bucket
  rng.pt, rng-rank{r}.pt              RNG states of rank 0 and of every other rank
  trainer.json, checksums.json        as for one process; checksums cover every file
The layout (each bucket's parameter names, shapes and offsets, and its padded size) places every
element of a shard, so a checkpoint loads onto any world size and bucket size: on the same world
size and layout each rank reads only its own shard; otherwise the shards are reassembled into
per-parameter tensors and cut again. A single-process run loads one too (its AdamW state is built
from the shards), and a sharded run loads a single-process checkpoint.

Writing: rank 0 makes the temporary folder, every rank writes its files into it, rank 0 writes the
checksums last and renames the folder into place, with barriers between. A rank that dies while
saving leaves only a temporary folder that the next save removes; the last complete checkpoint
stays as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from . import distributed as D
from .checkpoint import Checkpoint, CheckpointCommit, CheckpointError, model_tensors, rng_state
from .distributed import DistContext

if TYPE_CHECKING:
    from .zero_optim import ZeroOptimizer

FORMAT = "zero"


def shard_file(rank: int, world: int) -> str:
    return f"optimizer-rank{rank:05d}-of-{world:05d}.pt"


def rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-rank{rank:05d}.pt"


def is_sharded(ckpt: Checkpoint) -> bool:
    return isinstance(ckpt.optimizer_state, dict) and ckpt.optimizer_state.get("format") == FORMAT


def _trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def save_zero_checkpoint(
    ctx: DistContext,
    zero: ZeroOptimizer,
    model: nn.Module,
    folder: str | Path,
    step: int,
    trainer_state: dict,
    keep_last: int = 2,
) -> Path:
    """Every rank calls this at the same step; returns the checkpoint folder."""
    commit = CheckpointCommit(folder, step, "dist")
    masters = zero.gather_masters()  # a collective: before anything that only rank 0 does
    if ctx.is_main:
        commit.begin()
    D.barrier(ctx, f"checkpoint {commit.final.name}: folder made")
    mine = [shard_file(ctx.rank, ctx.world_size), rng_file(ctx.rank)]
    torch.save(zero.shard_state(), commit.tmp / mine[0])
    if ctx.is_main:
        if all(b.param_flat.dtype == torch.float32 for b in zero.buckets.buckets):
            tensors = model_tensors(model)
        else:  # the fp32 masters are the exact state; the model holds their cast
            tensors = _master_tensors(zero, masters)
        save_file(tensors, str(commit.tmp / "model.safetensors"), metadata={"format": "pt"})
        torch.save(
            {
                "format": FORMAT,
                "world_size": ctx.world_size,
                "step": zero.step_count,
                "layout": zero.buckets.layout(),
                "shards": [shard_file(r, ctx.world_size) for r in range(ctx.world_size)],
            },
            commit.tmp / "optimizer.pt",
        )
        commit.write_state(trainer_state)  # rng.pt: rank 0's
    else:
        torch.save(rng_state(), commit.tmp / mine[1])
    commit.sync(mine)
    D.barrier(ctx, f"checkpoint {commit.final.name}: shards written")
    if ctx.is_main:
        commit.commit(keep_last)
    D.barrier(ctx, f"checkpoint {commit.final.name}: renamed into place")
    return commit.final


def _master_tensors(zero: ZeroOptimizer, masters: list[Tensor]) -> dict[str, Tensor]:
    """name -> fp32 master weight, cut from the gathered flat buckets."""
    out = {}
    for b, flat in zip(zero.buckets.buckets, masters):
        for name, off, p in zip(b.names, b.offsets, b.params):
            out[name] = flat[off : off + p.numel()].view(p.shape).detach().cpu().clone()
    return out


# -- loading -------------------------------------------------------------------------------------


def _read_shard(path: Path, name: str) -> dict:
    f = path / name
    if not f.is_file():
        raise CheckpointError(f"checkpoint {path} is missing its optimizer shard {name}")
    return torch.load(f, map_location="cpu", weights_only=False)


def param_state_from_shards(ckpt: Checkpoint) -> tuple[int, dict[str, dict[str, Tensor]]]:
    """(optimizer step, {parameter name: {exp_avg, exp_avg_sq}}) reassembled from every shard."""
    meta = ckpt.optimizer_state
    shards = [_read_shard(ckpt.path, name) for name in meta["shards"]]
    out: dict[str, dict[str, Tensor]] = {}
    for bi, bucket in enumerate(meta["layout"]):
        flats = {key: torch.cat([s[key][bi] for s in shards]) for key in ("exp_avg", "exp_avg_sq")}
        for name, shape, off in zip(bucket["names"], bucket["shapes"], bucket["offsets"]):
            n = int(torch.Size(shape).numel())
            out[name] = {key: flat[off : off + n].view(shape).clone() for key, flat in flats.items()}
    return int(meta["step"]), out


def _adamw_names(model: nn.Module) -> list[str]:
    """Parameter names in the order of the single-process AdamW's state indices (optim.param_groups:
    the decayed matrices, then the rest)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]


def param_state_from_adamw(state_dict: dict, model: nn.Module) -> tuple[int, dict[str, dict[str, Tensor]]]:
    """The same per-parameter form from a single-process checkpoint's AdamW state_dict."""
    names = _adamw_names(model)
    out, step = {}, 0
    for index, st in state_dict["state"].items():
        out[names[int(index)]] = {"exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}
        step = int(st["step"])
    return step, out


def adamw_state_from_shards(ckpt: Checkpoint, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """A single-process AdamW state_dict (for optimizer.load_state_dict) from a sharded checkpoint."""
    step, per_param = param_state_from_shards(ckpt)
    names = _adamw_names(model)
    sd = optimizer.state_dict()
    state = {}
    for index, name in enumerate(names):
        if name not in per_param:
            raise CheckpointError(f"checkpoint {ckpt.path} has no optimizer state for {name!r}")
        st = per_param[name]
        state[index] = {
            "step": torch.tensor(float(step)),
            "exp_avg": st["exp_avg"].clone(),
            "exp_avg_sq": st["exp_avg_sq"].clone(),
        }
    return {"state": state, "param_groups": sd["param_groups"]}


def rank_rng_state(ckpt: Checkpoint, rank: int) -> dict:
    """This rank's RNG state from a sharded checkpoint; rank 0's when the checkpoint had fewer ranks."""
    f = ckpt.path / rng_file(rank)
    return torch.load(f, weights_only=False) if rank and f.is_file() else ckpt.rng_state


def load_zero_state(ctx: DistContext, zero: ZeroOptimizer, model: nn.Module, ckpt: Checkpoint) -> None:
    """Load a checkpoint's optimizer state and fp32 weights into the sharded optimizer: its own shard
    alone when the checkpoint was written by the same world size and layout, resharded otherwise,
    converted when it is a single-process checkpoint. The model's weights come from model_state."""
    masters = {n: t.float() for n, t in ckpt.model_state.items()}
    for name in _trainable_names(model):
        if name not in masters:
            raise CheckpointError(f"checkpoint {ckpt.path} has no weight for {name!r}")
    meta = ckpt.optimizer_state
    if is_sharded(ckpt) and meta["world_size"] == ctx.world_size and meta["layout"] == zero.buckets.layout():
        shard = _read_shard(ckpt.path, shard_file(ctx.rank, ctx.world_size))
        zero.load_shards(int(meta["step"]), shard["exp_avg"], shard["exp_avg_sq"], masters)
        return
    if is_sharded(ckpt):
        step, per_param = param_state_from_shards(ckpt)
    else:
        step, per_param = param_state_from_adamw(meta["optimizer"], model)
    zero.load_param_state(step, per_param, masters)
