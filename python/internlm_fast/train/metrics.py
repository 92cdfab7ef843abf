"""Per-step training metrics to a JSONL file, TensorBoard and the console."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch


def memory_mib(device: torch.device) -> tuple[float, float]:
    """(current, peak) memory in MiB: allocated tensors on CUDA, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20, torch.cuda.max_memory_allocated(device) / 2**20
    current = peak = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                current = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return current, peak


def _fmt(key: str, value) -> str:
    if isinstance(value, float):
        if key == "lr":
            return f"{key}={value:.2e}"
        return f"{key}={value:.4g}" if math.isfinite(value) else f"{key}={value}"
    return f"{key}={value}"


class MetricsLogger:
    """Appends one JSON object per step to `folder/metrics.jsonl` and writes TensorBoard scalars to
    `folder/tensorboard`. On resume from a checkpoint taken after step k, records of steps > k left
    by the interrupted run are dropped so the file reads as one run."""

    CONSOLE_KEYS = ("loss", "lr", "grad_norm", "tgs", "tflops", "mem_mib", "step_s", "data_share", "comm_hidden")

    def __init__(self, folder: str | Path, tensorboard: bool = True, resume_step: int = 0) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.folder / "metrics.jsonl"
        self._truncate_after(resume_step)
        self._jsonl = open(self.jsonl_path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                print(f"tensorboard logging is off ({e}); pip install tensorboard to enable it", file=sys.stderr)
            else:
                self._tb = SummaryWriter(
                    str(self.folder / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
                )

    def _truncate_after(self, resume_step: int) -> None:
        if not self.jsonl_path.exists():
            return
        kept = []
        for line in self.jsonl_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if record.get("step", 0) <= resume_step:
                kept.append(line)
        self.jsonl_path.write_text("".join(k + "\n" for k in kept))

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{metrics.get('split', 'train')}/{key}", value, step)

    @classmethod
    def console_line(cls, step: int, total: int, metrics: dict) -> str:
        parts = [f"step {step}/{total}"]
        parts += [_fmt(k, metrics[k]) for k in cls.CONSOLE_KEYS if k in metrics]
        return " ".join(parts)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
