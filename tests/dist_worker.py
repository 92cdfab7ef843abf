"""One process of a distributed test: `python tests/dist_worker.py OUT_PREFIX key=value ...`.

Launched with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (tests/test_distributed.py sets them, as
torchrun would) it is one rank of a data-parallel run; without them, a single-process run. Trains
with the real Trainer and writes OUT_PREFIX-rank{r}.json: losses, optimizer-state bytes, checkpoint.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from internlm_fast.train import distributed as D
from internlm_fast.train.config import load_config
from internlm_fast.train.trainer import Trainer


def poison_last_rank_at(trainer: Trainer, step: int) -> list[int]:
    """Make the last rank's loss NaN at `step` (1-based), as the single-process NaN test does; returns
    the list that collects the steps every rank reported as skipped."""
    skipped: list[int] = []
    world = trainer.dist.world_size if trainer.dist is not None else 1
    last = trainer.dist is None or trainer.dist.rank == world - 1
    weight, train_step = trainer.model.model.norm.weight, trainer.train_step

    def wrapped(batches):
        poison = last and trainer.step + 1 == step
        if poison:
            trainer.optimizer.wait_params()  # ZeRO's last all-gather would overwrite the NaN
            saved = weight.detach()[0].item()
            with torch.no_grad():
                weight[0] = float("nan")
        metrics = train_step(batches)
        if poison:
            with torch.no_grad():
                weight[0] = saved
        if metrics["skipped"]:
            skipped.append(trainer.step + 1)
        return metrics

    trainer.train_step = wrapped
    return skipped


def main() -> int:
    out, overrides = sys.argv[1], sys.argv[2:]
    trainer = Trainer(load_config(None, overrides))
    nan_at = int(os.environ.get("DIST_WORKER_NAN_AT", "0"))
    skipped = poison_last_rank_at(trainer, nan_at) if nan_at else []
    result = trainer.fit()
    rank = trainer.dist.rank if trainer.dist is not None else 0
    trainer.optimizer.wait_params()
    record = {
        "rank": rank,
        "losses": result.losses,
        "val_loss": result.val_loss,
        "state_bytes": trainer.optimizer.state_bytes(),
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "rows_consumed": trainer.loader.state_dict()["rows_consumed"],
        "threads": torch.get_num_threads(),
        "skipped_steps": skipped,
        "inf_nan_skip_batches": result.inf_nan_skip_batches,
        "param_sum": float(sum(p.detach().double().sum() for p in trainer.model.parameters())),
    }
    with open(f"{out}-rank{rank}.json", "w") as f:
        json.dump(record, f)
    D.shutdown(trainer.dist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
