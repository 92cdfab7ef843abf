"""The trainer's optimizer, one interface for the three ways the weights are kept:

  PlainAdamW       fp32 model, torch AdamW stepping the model's own parameters;
  MasterAdamW      low-precision (bf16) model, AdamW stepping fp32 master copies that are cast back
                   into the model after each update, as InternLM's optimizer does;
  ZeroOptimizer    data parallel under torchrun: each rank keeps the AdamW state and fp32 masters of
                   its shard only (zero_optim.py), with overlapped bucketed reduction and all-gather.

build_train_optimizer picks one from the run (distributed or not, the model's dtype); the trainer
never asks which it got. Each one writes and reads the same atomic checkpoint format (checkpoint.py,
zero_checkpoint.py), and each reads the others' checkpoints: a single process resumes a sharded
run's checkpoint and the other way round.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .checkpoint import Checkpoint, load_checkpoint, model_tensors, save_checkpoint, set_rng_state
from .config import TrainConfig
from .distributed import DistContext
from .optim import build_optimizer
from .zero_checkpoint import adamw_state_from_shards, is_sharded
from .zero_optim import ZeroOptimizer


@runtime_checkable
class TrainOptimizer(Protocol):
    """What the trainer asks of its optimizer. Per step: prepare_backward before each micro-batch's
    backward, then step (which computes the gradient norm, clips, and skips the update when the loss
    or the norm is not finite, the same decision on every rank), then zero_grad."""

    model: nn.Module

    def prepare_backward(self, last: bool) -> None:
        """Before each micro-batch's backward; `last`: the last micro-batch of the step."""
        ...

    def step(self, loss: float, lr: float, clip_grad_norm: float) -> dict:
        """Clip to clip_grad_norm (<= 0: no clipping) and update with `lr` unless skipped. Returns
        {"loss" (the mean over ranks), "grad_norm", "skipped", ...}."""
        ...

    def zero_grad(self) -> None: ...

    def wait_params(self) -> None:
        """Block until the model's parameters hold the last update (ZeRO's all-gather is async)."""
        ...

    def state_bytes(self) -> int:
        """Bytes of optimizer state this process holds (moments and fp32 masters)."""
        ...

    def state_dict(self) -> dict:
        """The optimizer's whole in-memory state (fp32 masters included where it keeps them)."""
        ...

    def load_state_dict(self, state: dict) -> None: ...

    def save(self, folder: Path, step: int, trainer_state: dict, keep_last: int) -> Path:
        """Write checkpoint `step` atomically into `folder` (weights, optimizer state, RNG states and
        `trainer_state`); every rank calls it. Returns the checkpoint folder."""
        ...

    def load(self, path: Path) -> Checkpoint:
        """Restore weights, optimizer state and RNG states from a checkpoint written by any mode;
        returns it for the trainer's own state."""
        ...


class PlainAdamW:
    """fp32 model: AdamW (optim.build_optimizer) over the model's trainable parameters."""

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        self.model = model
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = self._optimized_params([p for p in model.parameters() if p.requires_grad])
        self.optimizer = build_optimizer(self.params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _optimized_params(self, model_params: list[nn.Parameter]) -> list[nn.Parameter]:
        return model_params

    def _grads_to_params(self) -> None:
        pass

    def _params_to_model(self) -> None:
        pass

    def prepare_backward(self, last: bool) -> None:
        pass

    def step(self, loss: float, lr: float, clip_grad_norm: float) -> dict:
        self._grads_to_params()
        max_norm = clip_grad_norm if clip_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not skipped:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self._params_to_model()
        return {"loss": loss, "grad_norm": grad_norm, "skipped": skipped}

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)

    def wait_params(self) -> None:
        pass

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values() if t.dim())

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def model_state(self) -> dict[str, Tensor]:
        """The weights a checkpoint stores: the exact state the optimizer steps."""
        return model_tensors(self.model)

    def save(self, folder: Path, step: int, trainer_state: dict, keep_last: int) -> Path:
        optimizer_state = {"optimizer": self.optimizer.state_dict()}
        return save_checkpoint(folder, step, self.model_state(), optimizer_state, trainer_state, keep_last)

    def _load_weights(self, ckpt: Checkpoint) -> None:
        missing, unexpected = self.model.load_state_dict(ckpt.model_state, strict=False)
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise ValueError(
                f"checkpoint {ckpt.path} does not fit the model: missing {missing}, unexpected {unexpected}"
            )

    def load(self, path: Path) -> Checkpoint:
        ckpt = load_checkpoint(path)
        self._load_weights(ckpt)
        if is_sharded(ckpt):  # written by a torchrun run: its shards, reassembled
            self.optimizer.load_state_dict(adamw_state_from_shards(ckpt, self.optimizer, self.model))
        else:
            self.optimizer.load_state_dict(ckpt.optimizer_state["optimizer"])
        set_rng_state(ckpt.rng_state)
        return ckpt


class MasterAdamW(PlainAdamW):
    """Low-precision model: AdamW steps fp32 copies of the trainable parameters, whose gradients are
    the model's cast up and whose values are cast back into the model after each update."""

    def _optimized_params(self, model_params: list[nn.Parameter]) -> list[nn.Parameter]:
        self.model_params = model_params
        return [nn.Parameter(p.detach().float().clone()) for p in model_params]

    def _grads_to_params(self) -> None:
        for m, p in zip(self.params, self.model_params):
            m.grad = None if p.grad is None else p.grad.float()

    def _params_to_model(self) -> None:
        with torch.no_grad():
            for m, p in zip(self.params, self.model_params):
                p.copy_(m)

    def state_bytes(self) -> int:
        return super().state_bytes() + sum(p.numel() * p.element_size() for p in self.params)

    def state_dict(self) -> dict:
        masters = {n: m.detach().clone() for n, m in zip(self.names, self.params)}
        return {**super().state_dict(), "masters": masters}

    def load_state_dict(self, state: dict) -> None:
        self._load_masters(state["masters"])
        super().load_state_dict(state)

    def _load_masters(self, masters: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, m in zip(self.names, self.params):
                m.copy_(masters[name])
        self._params_to_model()

    def model_state(self) -> dict[str, Tensor]:
        # the fp32 masters are the exact state; the model holds their cast
        return {n: m.detach().cpu().contiguous() for n, m in zip(self.names, self.params)}

    def _load_weights(self, ckpt: Checkpoint) -> None:
        super()._load_weights(ckpt)
        self._load_masters(ckpt.model_state)


def build_train_optimizer(model: nn.Module, cfg: TrainConfig, dist: DistContext | None) -> TrainOptimizer:
    """The optimizer for this run: ZeRO under torchrun, else fp32 masters for a low-precision model,
    else plain AdamW. The model must already be on its device and in its training dtype."""
    o = cfg.optimizer
    hyper = {"lr": o.lr, "betas": (o.adam_beta1, o.adam_beta2), "eps": o.adam_eps, "weight_decay": o.weight_decay}
    if dist is not None:
        blocks = list(model.model.layers)
        return ZeroOptimizer(
            model, dist, **hyper, bucket_mb=cfg.dist.bucket_mb, stage=cfg.dist.zero_stage, blocks=blocks
        )
    if any(p.dtype != torch.float32 for p in model.parameters() if p.requires_grad):
        return MasterAdamW(model, **hyper)
    return PlainAdamW(model, **hyper)
