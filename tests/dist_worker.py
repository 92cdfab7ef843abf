"""One process of a distributed test: `python tests/dist_worker.py OUT_PREFIX key=value ...`.

Launched with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (tests/test_distributed.py sets them, as
torchrun would) it is one rank of a data-parallel run; without them, a single-process run. Trains
with the real Trainer and writes OUT_PREFIX-rank{r}.json: losses, optimizer-state bytes, checkpoint.
"""

from __future__ import annotations

import json
import sys

import torch

from internlm_fast.train import distributed as D
from internlm_fast.train.config import load_config
from internlm_fast.train.trainer import Trainer


def optimizer_state_bytes(trainer: Trainer) -> int:
    if trainer.zero is not None:
        return trainer.zero.state_bytes()
    n = sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values() for t in s.values() if t.dim())
    if trainer.master is not None:
        n += sum(p.numel() * p.element_size() for p in trainer.master.params)
    return n


def main() -> int:
    out, overrides = sys.argv[1], sys.argv[2:]
    trainer = Trainer(load_config(None, overrides))
    result = trainer.fit()
    rank = trainer.dist.rank if trainer.dist is not None else 0
    record = {
        "rank": rank,
        "losses": result.losses,
        "val_loss": result.val_loss,
        "state_bytes": optimizer_state_bytes(trainer),
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "rows_consumed": trainer.loader.state_dict()["rows_consumed"],
        "threads": torch.get_num_threads(),
    }
    with open(f"{out}-rank{rank}.json", "w") as f:
        json.dump(record, f)
    D.shutdown(trainer.dist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
