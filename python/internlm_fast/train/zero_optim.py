"""ZeRO-sharded AdamW (stage 1 or 2) over GradBuckets.

Each rank keeps the AdamW state (exp_avg, exp_avg_sq) and, for low-precision models, the fp32
master weights of its own shard of every bucket only: 1/world of the optimizer memory. For fp32
models the master shard is the model's own parameter memory (a view of the bucket), so nothing is
duplicated. Per step:
  1. the buckets' reductions, started during the backward, are waited for (GradBuckets.finish);
  2. one all-reduce of [partial sum of squared gradient, loss] gives the global gradient norm and
     the mean loss on every rank, so every rank clips alike and skips a non-finite step alike;
  3. AdamW updates the shard, with weight decay on the elements of matrices only (optim.py's rule);
  4. each bucket's parameters are all-gathered asynchronously, in forward order; a forward
     pre-hook on each block (and on the model, for the embeddings, final norm and head) waits for
     the buckets holding its parameters, so the gather overlaps the next forward.
The update is elementwise, so sharding changes no arithmetic: fp32 runs match a single process
with the same global batch to rounding of the gradient norm.
ZeroOptimizer is the sharded implementation of optimizer_modes.TrainOptimizer; its checkpoints are
written and read by zero_checkpoint.py.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from . import distributed as D
from .buckets import Bucket, CommClock, GradBuckets
from .checkpoint import Checkpoint, load_checkpoint, set_rng_state
from .distributed import DistContext
from .zero_checkpoint import load_zero_state, rank_rng_state, save_zero_checkpoint


def _runs(b: Bucket, lo: int, hi: int, decayed: list[bool]) -> list[tuple[int, int, bool]]:
    """[(start, end, decay)] in shard coordinates: the shard [lo, hi) cut at parameter boundaries,
    neighbours with the same weight-decay rule merged; padding belongs to no run."""
    runs: list[tuple[int, int, bool]] = []
    for off, p, decay in zip(b.offsets, b.params, decayed):
        a, e = max(off, lo), min(off + p.numel(), hi)
        if a >= e:
            continue
        if runs and runs[-1][1] == a - lo and runs[-1][2] == decay:
            runs[-1] = (runs[-1][0], e - lo, decay)
        else:
            runs.append((a - lo, e - lo, decay))
    return runs


class ZeroOptimizer:
    def __init__(
        self,
        model: nn.Module,
        ctx: DistContext,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        bucket_mb: float = 25.0,
        stage: int = 2,
        blocks: list[nn.Module] | None = None,
    ) -> None:
        self.ctx, self.model = ctx, model
        self.clock = CommClock()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        self.buckets = GradBuckets(named, ctx, bucket_mb, stage, self.clock)
        for b in self.buckets.buckets:  # every rank starts from rank 0's weights, however it got them
            D.broadcast_(ctx, b.param_flat, "initial parameter broadcast")
        self.masters: list[Tensor] = []
        self.exp_avg: list[Tensor] = []
        self.exp_avg_sq: list[Tensor] = []
        self.runs: list[list[tuple[int, int, bool]]] = []
        groups: dict[bool, list[Tensor]] = {True: [], False: []}
        self.views: list[list[Tensor]] = []
        for b in self.buckets.buckets:
            lo, hi = self.buckets.shard_range(b)
            own = b.param_flat[lo:hi]
            master = own if own.dtype == torch.float32 else own.float()
            self.masters.append(master)
            self.exp_avg.append(torch.zeros_like(master))
            self.exp_avg_sq.append(torch.zeros_like(master))
            runs = _runs(b, lo, hi, [p.dim() >= 2 for p in b.params])
            self.runs.append(runs)
            self.views.append([master[s:e] for s, e, _ in runs])
            for (_, _, decay), view in zip(runs, self.views[-1]):
                groups[decay].append(view)
        param_groups = [
            {"params": groups[True], "weight_decay": weight_decay},
            {"params": groups[False], "weight_decay": 0.0},
        ]
        param_groups = [g for g in param_groups if g["params"]] or [{"params": [], "weight_decay": 0.0}]
        fused = self.masters[0].device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
        self.step_count = 0
        self._init_state()
        self._pending: dict[int, object] = {}  # bucket index -> all-gather in flight
        self._install_prehooks(blocks or [])

    def _init_state(self) -> None:
        """AdamW's state is views of the flat per-bucket state, so a checkpoint saves flat shards."""
        for bi, runs in enumerate(self.runs):
            for (s, e, _), view in zip(runs, self.views[bi]):
                self.optimizer.state[view] = {
                    "step": torch.tensor(float(self.step_count), dtype=torch.float32, device=view.device),
                    "exp_avg": self.exp_avg[bi][s:e],
                    "exp_avg_sq": self.exp_avg_sq[bi][s:e],
                }

    # -- forward pre-hooks: wait for the parameters a block is about to use ----------------------

    def _install_prehooks(self, blocks: list[nn.Module]) -> None:
        in_block: set[nn.Parameter] = set()
        for block in blocks:
            params = {p for p in block.parameters() if p in self.buckets.bucket_of}
            in_block |= params
            ids = sorted({self.buckets.bucket_of[p].index for p in params})
            block.register_forward_pre_hook(lambda _m, _a, ids=ids: self.wait_params(ids))
        rest = sorted({b.index for p, b in self.buckets.bucket_of.items() if p not in in_block})
        # the model's own forward starts before any block: embeddings, final norm and head
        self.model.register_forward_pre_hook(lambda _m, _a: self.wait_params(rest))

    def wait_params(self, ids: list[int] | None = None) -> None:
        """Wait for the all-gathers of buckets `ids` (None: all) still in flight."""
        if self._pending:
            self.clock.poll()
        for i in list(self._pending) if ids is None else ids:
            work = self._pending.pop(i, None)
            if work is not None:
                self.clock.wait(self.ctx, work, f"parameter all-gather of bucket {i}")

    # -- the step -------------------------------------------------------------------------------

    def prepare_backward(self, last: bool) -> None:
        """Call before each micro-step's backward; `last` arms the overlapped reduction."""
        if last:
            self.buckets.arm()

    def step(self, loss: float, lr: float, clip_grad_norm: float) -> dict:
        """Finish the gradient reduction, clip, update this rank's shard and start the all-gather.
        `loss` is this rank's loss; returns the global mean loss, grad norm and whether the step was
        skipped (identical on every rank), and communication metrics."""
        shards = self.buckets.finish()
        grads = [g if g.dtype == torch.float32 else g.float() for g in shards]
        sq = float(sum(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in grads))
        t0 = time.perf_counter()
        total_sq, loss_sum = D.all_reduce_sum(self.ctx, [sq, loss], "gradient norm all-reduce")
        self.clock.blocked_s += time.perf_counter() - t0
        grad_norm = math.sqrt(total_sq) if total_sq >= 0 else float("nan")
        mean_loss = loss_sum / self.ctx.world_size
        skipped = not (math.isfinite(mean_loss) and math.isfinite(grad_norm))
        if not skipped:
            # torch.nn.utils.clip_grad_norm_'s rule, in fp32: coef = max / (norm + 1e-6), at most 1
            max_norm = clip_grad_norm if clip_grad_norm > 0 else math.inf
            norm32 = torch.tensor(grad_norm, dtype=torch.float32)
            coef = float(torch.clamp(max_norm / (norm32 + 1e-6), max=1.0))
            for bi, g in enumerate(grads):
                g.mul_(coef)
                for (s, e, _), view in zip(self.runs[bi], self.views[bi]):
                    view.grad = g[s:e]
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.step_count += 1
            for bi in range(len(self.views)):
                for view in self.views[bi]:
                    view.grad = None
            self._start_all_gather()
        metrics = self.clock.take(self.buckets.backward_end)
        return {"loss": mean_loss, "grad_norm": grad_norm, "skipped": skipped, **metrics}

    def zero_grad(self) -> None:
        # the flat gradient shards are consumed by step(); only the model's own .grad remain
        self.model.zero_grad(set_to_none=True)

    def _start_all_gather(self) -> None:
        for b in reversed(self.buckets.buckets):  # forward order: the first block's buckets first
            lo, hi = self.buckets.shard_range(b)
            master = self.masters[b.index]
            src = b.param_flat[lo:hi]
            if master.data_ptr() != src.data_ptr():
                src.copy_(master)  # cast to the model's dtype
            try:
                work = D.all_gather_single(b.param_flat, src, async_op=True)
            except Exception as e:
                raise D.failure(self.ctx, f"parameter all-gather of bucket {b.index}", e) from e
            self.clock.track("gather", work)
            self._pending[b.index] = work

    # -- memory and checkpoints -----------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds: AdamW moments, plus fp32 masters that are not
        the model's own memory."""
        n = sum(t.numel() * t.element_size() for t in self.exp_avg + self.exp_avg_sq)
        own = [b.param_flat[slice(*self.buckets.shard_range(b))].data_ptr() for b in self.buckets.buckets]
        n += sum(m.numel() * m.element_size() for m, ptr in zip(self.masters, own) if m.data_ptr() != ptr)
        return n

    def shard_state(self) -> dict:
        """This rank's optimizer shard, with the layout that places it (see zero_checkpoint)."""
        return {
            "rank": self.ctx.rank,
            "world_size": self.ctx.world_size,
            "step": self.step_count,
            "layout": self.buckets.layout(),
            "exp_avg": [t.detach().cpu().clone() for t in self.exp_avg],
            "exp_avg_sq": [t.detach().cpu().clone() for t in self.exp_avg_sq],
        }

    def state_dict(self) -> dict:
        """This rank's shard state with its fp32 master shards."""
        self.wait_params()
        return {**self.shard_state(), "masters": [m.detach().cpu().clone() for m in self.masters]}

    def load_state_dict(self, state: dict) -> None:
        """Load a state_dict() saved by this rank of a run with the same world size and layout; a
        collective (every rank calls it): the model's weights are all-gathered from the masters."""
        mine = (self.ctx.rank, self.ctx.world_size, self.buckets.layout())
        if (state["rank"], state["world_size"], state["layout"]) != mine:
            raise ValueError("the state was saved by another rank, world size or bucket layout; use a checkpoint")
        self.wait_params()
        ours = self.exp_avg + self.exp_avg_sq + self.masters
        saved = state["exp_avg"] + state["exp_avg_sq"] + state["masters"]
        with torch.no_grad():
            for dst, src in zip(ours, saved):
                dst.copy_(src)
        self._set_step(int(state["step"]))
        self._start_all_gather()
        self.wait_params()

    def save(self, folder: Path, step: int, trainer_state: dict, keep_last: int) -> Path:
        """A sharded checkpoint (zero_checkpoint.py); every rank calls it."""
        return save_zero_checkpoint(self.ctx, self, self.model, folder, step, trainer_state, keep_last)

    def load(self, path: Path) -> Checkpoint:
        """Any checkpoint, sharded on any world size or single-process; every rank calls it."""
        ckpt = load_checkpoint(path)
        load_zero_state(self.ctx, self, self.model, ckpt)
        set_rng_state(rank_rng_state(ckpt, self.ctx.rank))
        return ckpt

    def load_param_state(self, step: int, state: dict[str, dict[str, Tensor]], masters: dict[str, Tensor]) -> None:
        """Load per-parameter full tensors (any world size's checkpoint, resharded here):
        state[name] = {exp_avg, exp_avg_sq}; masters[name] = the fp32 weights."""
        with torch.no_grad():
            for bi, b in enumerate(self.buckets.buckets):
                for name, (a, e, off) in self._own_slices(b):
                    if name not in state:
                        raise KeyError(f"the checkpoint has no optimizer state for parameter {name!r}")
                    for dst, key in ((self.exp_avg[bi], "exp_avg"), (self.exp_avg_sq[bi], "exp_avg_sq")):
                        src = state[name][key].reshape(-1)
                        if src.numel() != b.params[b.names.index(name)].numel():
                            raise ValueError(f"{name}: the checkpoint's {key} has {src.numel()} elements")
                        dst[a:e].copy_(src[a - off : e - off])
        self._load_masters(step, masters)

    def load_shards(
        self, step: int, exp_avg: list[Tensor], exp_avg_sq: list[Tensor], masters: dict[str, Tensor]
    ) -> None:
        """Load this rank's own flat shards, saved by a run with the same world size and layout."""
        with torch.no_grad():
            for dst, src in zip(self.exp_avg + self.exp_avg_sq, exp_avg + exp_avg_sq):
                dst.copy_(src)
        self._load_masters(step, masters)

    def _own_slices(self, b: Bucket):
        """(name, (start, end, param offset)) for each parameter overlapping this rank's shard of b,
        start/end in shard coordinates."""
        lo, hi = self.buckets.shard_range(b)
        for name, off, p in zip(b.names, b.offsets, b.params):
            a, e = max(off, lo), min(off + p.numel(), hi)
            if a < e:
                yield name, (a - lo, e - lo, off - lo)

    def _load_masters(self, step: int, masters: dict[str, Tensor]) -> None:
        """The fp32 master shards and the model's (replicated) weights from full fp32 tensors."""
        self.wait_params()
        with torch.no_grad():
            for bi, b in enumerate(self.buckets.buckets):
                for name, p in zip(b.names, b.params):
                    if name not in masters or masters[name].numel() != p.numel():
                        raise KeyError(f"the checkpoint has no fp32 weight of {p.numel()} elements for {name!r}")
                    p.copy_(masters[name].reshape(p.shape))
                for name, (a, e, off) in self._own_slices(b):
                    self.masters[bi][a:e].copy_(masters[name].reshape(-1)[a - off : e - off])
        self._set_step(step)

    def _set_step(self, step: int) -> None:
        self.step_count = step
        for st in self.optimizer.state.values():
            st["step"].fill_(float(step))

    def gather_masters(self) -> list[Tensor]:
        """Every bucket's full fp32 master weights (a collective: all ranks call it)."""
        self.wait_params()
        out = []
        for b, master in zip(self.buckets.buckets, self.masters):
            if master.dtype == b.param_flat.dtype:
                out.append(b.param_flat)
                continue
            full = torch.empty(b.padded, dtype=torch.float32, device=master.device)
            try:
                D.all_gather_single(full, master.contiguous())
            except Exception as e:
                raise D.failure(self.ctx, "master weights gather for a checkpoint", e) from e
            out.append(full)
        return out
