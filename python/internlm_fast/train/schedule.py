"""The learning-rate schedule InternLM trains with: linear warmup from 0, then cosine to eta_min."""

from __future__ import annotations

import math


class WarmupCosine:
    """lr(step) for step = 0 .. total_steps - 1; stateless apart from the step, so resuming is exact."""

    def __init__(self, lr: float, total_steps: int, warmup_ratio: float, eta_min: float) -> None:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        self.lr, self.total_steps, self.eta_min = lr, total_steps, eta_min
        self.warmup_steps = int(round(warmup_ratio * total_steps))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.eta_min + 0.5 * (self.lr - self.eta_min) * (1.0 + math.cos(math.pi * progress))
