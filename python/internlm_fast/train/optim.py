"""The optimizer the trainer uses: AdamW with decoupled weight decay on the matrices only.

Parameter groups follow Megatron-LM / nanoGPT: weight decay on every parameter of two or more
dimensions (the projection matrices, the input embeddings and the lm_head), none on 1-D parameters
(the q/k/v/o biases and the RMSNorm weights), whose decay only pulls a scale or an offset toward
zero and hurts more than it regularises.

The step is torch's fused AdamW kernel where the parameters' device has one (CPU and CUDA): one
sweep over each parameter, where the multi-tensor (foreach) path sweeps every parameter once per
sqrt/div/lerp. Same update, same fp32 state.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

_FUSED_DEVICES = ("cpu", "cuda")


def param_groups(model: nn.Module | Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Two AdamW groups of the trainable parameters: decayed (ndim >= 2) and not decayed (ndim < 2).
    A parameter shared by two modules (tied embeddings) appears once. `model` may also be the
    parameters themselves (the trainer's fp32 master copies in bf16 training)."""
    decay, no_decay = [], []
    params = model.parameters() if isinstance(model, nn.Module) else model
    for p in params:  # parameters() already yields a shared parameter once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module | Iterable[nn.Parameter],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> torch.optim.Optimizer:
    """AdamW over `model`'s trainable parameters, weight decay on the matrices only (see the module
    docstring); the fused implementation when every parameter is a floating-point tensor on a
    device that has one, else the foreach one."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
        raise ValueError(f"betas must be in [0, 1), got {betas!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("the model has no trainable parameters")
    devices = {p.device.type for p in params}
    fused = len(devices) == 1 and devices <= set(_FUSED_DEVICES) and all(p.is_floating_point() for p in params)
    groups = [g for g in groups if g["params"]]
    if fused:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)
