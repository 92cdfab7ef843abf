"""Process groups for data-parallel training under torchrun: one process per device (or per CPU
process), NCCL for CUDA and gloo for the CPU, chosen from the device.

torchrun (or any launcher) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without
them the trainer runs single-process and nothing here is used. Every collective has the configured
timeout, so a rank that dies or hangs makes the others fail with a DistributedError that says so,
instead of waiting forever.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank died, hung or was killed."""


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    timeout_s: float

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_distributed() -> bool:
    """Whether a launcher (torchrun) started this process as one rank of a group."""
    return all(v in os.environ for v in _LAUNCH_VARS)


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set (launch with torchrun)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an int") from None


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: float = 300.0) -> DistContext | None:
    """Join the process group that torchrun set up; None when not launched by torchrun.

    device: auto | cpu | cuda (cuda means this rank's GPU, cuda:LOCAL_RANK). backend: auto (nccl for
    CUDA, gloo for the CPU), nccl or gloo. timeout_s bounds every collective."""
    if not launched_distributed():
        return None
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA GPU")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPUs: "
                "launch at most one process per GPU (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("dist.backend='nccl' needs CUDA devices; use gloo (or auto) on the CPU")
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistContext(rank, world, local_rank, backend, dev, timeout_s)


def shutdown(ctx: DistContext | None) -> None:
    if ctx is not None and dist.is_initialized():
        dist.destroy_process_group()


def failure(ctx: DistContext, what: str, err: BaseException) -> DistributedError:
    """The error a failed collective becomes: which rank saw it, what it was doing, and why."""
    return DistributedError(
        f"rank {ctx.rank} of {ctx.world_size}: {what} failed: another rank died, hung or was killed, or the "
        f"network failed (collectives time out after dist.timeout_s={ctx.timeout_s:g} s). Cause: {err}"
    )


def wait(ctx: DistContext, work: dist.Work, what: str) -> float:
    """Wait for an async collective; returns the seconds spent blocked."""
    t0 = time.perf_counter()
    try:
        work.wait()
    except Exception as e:  # gloo raises RuntimeError, NCCL DistBackendError
        raise failure(ctx, what, e) from e
    return time.perf_counter() - t0


def barrier(ctx: DistContext, what: str) -> None:
    """All ranks meet here. With gloo a monitored barrier, whose error names the ranks that did not come."""
    try:
        if ctx.backend == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=ctx.timeout_s), wait_all_ranks=True)
        else:
            dist.barrier()
    except Exception as e:
        raise failure(ctx, f"barrier ({what})", e) from e


def all_reduce_sum(ctx: DistContext, values: list[float], what: str) -> list[float]:
    """Element-wise sum of `values` over all ranks, in fp64."""
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    try:
        dist.all_reduce(t)
    except Exception as e:
        raise failure(ctx, what, e) from e
    return t.tolist()


def broadcast_(ctx: DistContext, tensor: torch.Tensor, what: str) -> None:
    """Rank 0's `tensor` into every rank's, in place."""
    try:
        dist.broadcast(tensor, src=0)
    except Exception as e:
        raise failure(ctx, what, e) from e


# torch 2.13 renamed the *_tensor collectives; both names exist there and the old ones warn
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
