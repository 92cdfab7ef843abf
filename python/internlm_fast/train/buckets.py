"""Flat gradient buckets with reduction overlapped with the backward pass.

The trainable parameters are assigned, in reverse registration order (roughly the order the
backward produces their gradients), to buckets of about `bucket_mb` MB. Each bucket owns two flat
buffers: the parameters (every parameter becomes a view into it, so the sharded optimizer's
all-gather writes straight into the model) and the gradients. A bucket is padded to a multiple of
world_size * ALIGN elements, so rank r owns the contiguous shard [r * shard, (r + 1) * shard) of
every bucket, whatever the parameter sizes.

During the backward of the last micro-step of a step (`arm()`), a post-accumulate-grad hook counts
each parameter's finished gradient; when a bucket is complete its gradients are copied and scaled
by 1 / world_size into the flat buffer in one native call (ops.flatten_scale_), freed, and the
reduction starts asynchronously, while the backward carries on with the earlier layers:
  stage 2: reduce-scatter, each rank receives only the sum of its shard (half the traffic of an
           all-reduce, and only a shard of gradients outlives the step);
  stage 1: all-reduce of the whole bucket, each rank then reads its shard (InternLM's Hybrid ZeRO).
torch 2.13's gloo implements reduce_scatter_tensor, so stage 2 runs on the CPU as on NCCL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from internlm_fast.ops import flatten_scale_

from . import distributed as D
from .distributed import DistContext

ALIGN = 32  # elements per shard are a multiple of this (128-byte rows for fp32, NCCL-friendly)


@dataclass
class Bucket:
    index: int
    names: list[str]
    params: list[nn.Parameter]
    offsets: list[int]  # where each parameter starts in the flat buffers
    numel: int  # real elements; [numel, padded) is padding, always zero in the gradients
    padded: int
    shard: int  # padded // world_size
    param_flat: Tensor
    grad_flat: Tensor
    grad_shard: Tensor  # this rank's reduced gradient shard (a view of grad_flat in stage 1)
    ready: int = 0
    work: dist.Work | None = None
    launched_at: float = 0.0


class CommClock:
    """Launch and completion times of async collectives, and the time the training thread spent
    blocked on them. Completion is seen by polling (gloo's reduce-scatter has no future to hook):
    at every gradient hook and forward pre-hook, and when a wait returns."""

    def __init__(self) -> None:
        self.intervals: list[list] = []  # [kind, launch time, work, completion time or None]
        self.blocked_s = 0.0

    def track(self, kind: str, work: dist.Work) -> None:
        self.intervals.append([kind, time.perf_counter(), work, None])

    def poll(self) -> None:
        now = time.perf_counter()
        for iv in self.intervals:
            if iv[3] is None and iv[2].is_completed():
                iv[3] = now

    def wait(self, ctx: DistContext, work: dist.Work, what: str) -> None:
        self.blocked_s += D.wait(ctx, work, what)
        self.poll()
        for iv in self.intervals:
            if iv[2] is work and iv[3] is None:
                iv[3] = time.perf_counter()

    def take(self, backward_end: float | None) -> dict:
        """Metrics of the collectives completed since the last call: comm_s (wall time with at least
        one in flight), comm_hidden (the share of it during which the training thread was not
        blocked waiting) and rs_hidden (the share of gradient-reduction time before the backward
        ended)."""
        finished = [(k, t0, t1) for k, t0, _, t1 in self.intervals if t1 is not None]
        self.intervals = [iv for iv in self.intervals if iv[3] is None]
        comm = _union(iv[1:] for iv in finished)
        reduce = [iv[1:] for iv in finished if iv[0] == "reduce"]
        rs = _union(reduce)
        before = _union((t0, min(t1, backward_end)) for t0, t1 in reduce if backward_end and t0 < backward_end)
        blocked, self.blocked_s = self.blocked_s, 0.0
        return {
            "comm_s": comm,
            "comm_wait_s": blocked,
            "comm_hidden": max(0.0, 1.0 - blocked / comm) if comm > 0 else 0.0,
            "rs_hidden": before / rs if rs > 0 else 0.0,
        }


def _union(intervals) -> float:
    total, end = 0.0, float("-inf")
    for t0, t1 in sorted(intervals):
        if t1 > end:
            total += t1 - max(t0, end)
            end = t1
    return total


def _padded(numel: int, world: int) -> int:
    unit = world * ALIGN
    return max(unit, -(-numel // unit) * unit)


def assign_buckets(named_params: list[tuple[str, nn.Parameter]], bucket_mb: float) -> list[list[int]]:
    """Indices into named_params, grouped into buckets: reverse order, a bucket closes once it
    reaches bucket_mb MB (a parameter larger than that gets a bucket of its own)."""
    limit = bucket_mb * 2**20
    groups, current, size = [], [], 0
    for i in reversed(range(len(named_params))):
        p = named_params[i][1]
        current.append(i)
        size += p.numel() * p.element_size()
        if size >= limit:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


class GradBuckets:
    def __init__(
        self,
        named_params: list[tuple[str, nn.Parameter]],
        ctx: DistContext,
        bucket_mb: float,
        stage: int,
        clock: CommClock,
    ) -> None:
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
        if stage not in (1, 2):
            raise ValueError(f"ZeRO stage must be 1 or 2, got {stage!r}")
        self.ctx, self.stage, self.clock = ctx, stage, clock
        self.world, self.rank = ctx.world_size, ctx.rank
        self.buckets = [
            self._build(b, [named_params[i] for i in idx])
            for b, idx in enumerate(assign_buckets(named_params, bucket_mb))
        ]
        self.bucket_of: dict[nn.Parameter, Bucket] = {p: b for b in self.buckets for p in b.params}
        self.armed = False
        self.backward_end: float | None = None
        for p in self.bucket_of:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def _build(self, index: int, named: list[tuple[str, nn.Parameter]]) -> Bucket:
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) != 1:
            raise ValueError(f"bucket {index} mixes parameter dtypes {dtypes}: give all parameters one dtype")
        offsets, n = [], 0
        for _, p in named:
            offsets.append(n)
            n += p.numel()
        padded = _padded(n, self.world)
        shard = padded // self.world
        p0 = named[0][1]
        param_flat = torch.zeros(padded, dtype=p0.dtype, device=p0.device)
        with torch.no_grad():
            for (_, p), off in zip(named, offsets):
                view = param_flat[off : off + p.numel()].view_as(p)
                view.copy_(p)
                p.data = view  # the parameter now lives in the flat buffer
        grad_flat = torch.zeros_like(param_flat)
        lo = self.rank * shard
        grad_shard = (
            torch.zeros(shard, dtype=p0.dtype, device=p0.device) if self.stage == 2 else grad_flat[lo : lo + shard]
        )
        return Bucket(
            index=index,
            names=[name for name, _ in named],
            params=[p for _, p in named],
            offsets=offsets,
            numel=n,
            padded=padded,
            shard=shard,
            param_flat=param_flat,
            grad_flat=grad_flat,
            grad_shard=grad_shard,
        )

    def layout(self) -> list[dict]:
        """What a checkpoint needs to cut a bucket's shards back into parameters."""
        return [
            {
                "names": b.names,
                "shapes": [list(p.shape) for p in b.params],
                "offsets": b.offsets,
                "numel": b.numel,
                "padded": b.padded,
            }
            for b in self.buckets
        ]

    def shard_range(self, bucket: Bucket) -> tuple[int, int]:
        return self.rank * bucket.shard, (self.rank + 1) * bucket.shard

    # -- the hot path ----------------------------------------------------------------------------

    def arm(self) -> None:
        """The next backward is the step's last: reduce each bucket as soon as its gradients are in."""
        self.armed = True
        for b in self.buckets:
            b.ready = 0

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self.armed:
            return
        self.clock.poll()
        b = self.bucket_of[p]
        b.ready += 1
        if b.ready == len(b.params):
            self._launch(b)

    def _launch(self, b: Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in b.params]
        flatten_scale_(b.grad_flat, grads, 1.0 / self.world)
        for p in b.params:
            p.grad = None
        try:
            if self.stage == 2:
                b.work = D.reduce_scatter_single(b.grad_shard, b.grad_flat, async_op=True)
            else:
                b.work = dist.all_reduce(b.grad_flat, async_op=True)
        except Exception as e:
            raise D.failure(self.ctx, f"gradient reduction of bucket {b.index}", e) from e
        self.clock.track("reduce", b.work)

    def finish(self) -> list[Tensor]:
        """After the last backward: reduce what is not yet in flight (parameters that got no
        gradient count as zero), wait for every bucket, and return this rank's gradient shards."""
        self.backward_end = time.perf_counter()
        self.armed = False
        for b in self.buckets:
            if b.work is None:
                self._launch(b)
        for b in self.buckets:
            self.clock.wait(self.ctx, b.work, f"gradient reduction of bucket {b.index}")
            b.work = None
        return [b.grad_shard for b in self.buckets]
