"""Atomic training checkpoints.

A checkpoint is a folder `step-00000123/` holding
  model.safetensors   the weights, Hugging Face names (loads into transformers' LlamaForCausalLM)
  optimizer.pt        optimizer and scheduler state
  rng.pt              torch / CUDA / numpy / python RNG states
  trainer.json        step, data loader position, counters, the full training config
  checksums.json      sha256 of every file above; written last
A sharded (ZeRO) run adds each rank's optimizer shard and RNG state (see zero_checkpoint.py); the
checksums cover every file named in checksums.json.

It is written into a hidden temporary folder beside the final one, every file is fsynced, and the
folder is renamed into place, so a kill at any moment leaves either no new checkpoint (a stray
`.tmp-*` folder that the next save removes) or a complete one. Loading verifies the checksums; a
damaged checkpoint is reported and the next older one is used instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^step-(\d{8})$")
_FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "trainer.json")


class CheckpointError(RuntimeError):
    pass


@dataclass
class Checkpoint:
    path: Path
    step: int
    trainer_state: dict
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict
    rng_state: dict


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as safetensors wants it: contiguous CPU tensors, tied weights stored once."""
    out, seen = {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.stride()) if t.numel() else None
        if key is not None and key in seen:
            continue  # a tied weight (tie_word_embeddings): load_state_dict(strict=False) restores it
        seen[key] = name
        out[name] = t.detach().to("cpu").contiguous()
    return out


class CheckpointCommit:
    """One checkpoint written atomically: files go into a hidden temporary folder beside the final
    one, and commit() fsyncs them, writes checksums.json last and renames the folder into place.

    A sharded run builds one on every rank with the same `tag` (so every rank names the same
    temporary folder); rank 0 alone calls begin() and commit(), with barriers between."""

    def __init__(self, folder: str | Path, step: int, tag: str) -> None:
        self.folder = Path(folder)
        self.step = step
        self.final = self.folder / f"step-{step:08d}"
        self.tmp = self.folder / f".tmp-{self.final.name}-{tag}"

    def begin(self) -> Path:
        """Make the temporary folder, removing those left by runs killed mid-save."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def write_state(self, trainer_state: dict) -> None:
        """trainer.json (the trainer's state and the step) and rng.pt (this process' RNG states)."""
        (self.tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": self.step}, indent=1))
        torch.save(rng_state(), self.tmp / "rng.pt")

    def sync(self, names: list[str]) -> None:
        """fsync files this process wrote (on a shared file system only the writer can flush them)."""
        for name in names:
            _fsync(self.tmp / name)

    def commit(self, keep_last: int) -> Path:
        """Checksums of every file, written last; then the rename, and all but the newest `keep_last`
        checkpoints deleted. Returns the checkpoint folder."""
        files = sorted(p for p in self.tmp.iterdir() if p.name != "checksums.json")
        sums = {}
        for f in files:
            _fsync(f)
            sums[f.name] = _sha256(f)
        (self.tmp / "checksums.json").write_text(json.dumps(sums, indent=1))
        _fsync(self.tmp / "checksums.json")
        _fsync(self.tmp)
        if self.final.exists():  # the same step saved again (a resumed run): replace it
            shutil.rmtree(self.final)
        os.rename(self.tmp, self.final)
        _fsync(self.folder)
        for old in list_checkpoints(self.folder)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return self.final


def save_checkpoint(
    folder: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    trainer_state: dict,
    keep_last: int = 2,
) -> Path:
    """Write step `step` atomically into `folder`, then delete all but the newest `keep_last`.
    model_state: name -> tensor, as model_tensors(model) gives."""
    commit = CheckpointCommit(folder, step, str(os.getpid()))
    tmp = commit.begin()
    save_file(model_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    torch.save(optimizer_state, tmp / "optimizer.pt")
    commit.write_state(trainer_state)
    return commit.commit(keep_last)


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint folders in `folder`, oldest first (by step)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def verify_checkpoint(path: str | Path) -> str | None:
    """None when the checkpoint is complete and intact, else what is wrong with it."""
    path = Path(path)
    sums_file = path / "checksums.json"
    if not sums_file.is_file():
        return f"{sums_file} is missing (incomplete checkpoint)"
    try:
        sums = json.loads(sums_file.read_text())
    except json.JSONDecodeError as e:
        return f"{sums_file} is not valid JSON: {e}"
    for name in sorted(set(_FILES) | set(sums)):  # a sharded checkpoint lists its shard files too
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if sums.get(name) != _sha256(f):
            return f"{f} does not match its checksum (damaged)"
    return None


def latest_valid_checkpoint(folder: str | Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint in `folder` (or None) and a message for each newer damaged one."""
    skipped = []
    for path in reversed(list_checkpoints(folder)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, skipped
        skipped.append(f"skipping {path.name}: {problem}")
    return None, skipped


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a folder")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is not usable: {problem}")
    trainer_state = json.loads((path / "trainer.json").read_text())
    return Checkpoint(
        path=path,
        step=int(trainer_state["step"]),
        trainer_state=trainer_state,
        model_state=load_file(str(path / "model.safetensors"), device=str(map_location)),
        optimizer_state=torch.load(path / "optimizer.pt", map_location=map_location, weights_only=False),
        rng_state=torch.load(path / "rng.pt", weights_only=False),
    )
