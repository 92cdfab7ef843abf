"""Weight files of Hugging Face folders: read lazily (memory-mapped), write streamed and sharded.

Reading: `model.safetensors`, `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`,
`pytorch_model.bin`, `pytorch_model-0000i-of-0000n.bin` + `pytorch_model.bin.index.json`. Tensors come
back backed by a private memory map of the file (safetensors' safe_open, torch.load(mmap=True)):
nothing is read until a page is touched, and a 7B checkpoint never sits in RAM twice. UnmappedReader
reads single tensors by rows with plain file reads instead, for a load that converts every weight.

Writing: safetensors files written tensor by tensor (safetensors' own save_file first copies every
tensor of a shard into Python bytes, which would hold a whole shard a second time), into a temporary
name and renamed, so a model memory-mapped from the same file stays intact while it is replaced.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of "5GB" (10^9, as Hugging Face counts), "512MiB" (2^20) or an int."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = _SIZE_RE.match(str(size))
        if not m:
            raise ValueError(f"max_shard_size {size!r} is not a size like 5GB, 500MB, 2GiB or a number of bytes")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def check_names_and_shapes(
    expected: dict[str, tuple[int, ...]],
    tensors: dict[str, torch.Tensor],
    origin: dict[str, Path],
    name_error: type[Exception] = KeyError,
    prefix: str = "",
) -> None:
    """That `tensors` holds exactly the names of `expected`, each of its shape: a missing or unexpected
    tensor raises name_error, a wrong shape ValueError, each naming the file(s) and the tensor."""
    missing = [k for k in expected if k not in tensors]
    if missing:
        files = ", ".join(sorted({str(p) for p in origin.values()}))
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise name_error(f"{prefix}missing tensor(s) {shown} in {files}")
    for name, t in tensors.items():
        if name not in expected:
            raise name_error(f"{origin[name]}: unexpected tensor {name!r} for this model config")
        if tuple(t.shape) != tuple(expected[name]):
            raise ValueError(
                f"{origin[name]}: tensor {name!r} has shape {tuple(t.shape)} but the config "
                f"expects {tuple(expected[name])}"
            )


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder, safetensors preferred over .bin; [] if there are none."""
    for index_name, single in ((SAFETENSORS_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a valid weight index ({e})") from None
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shard files that do not exist: {', '.join(missing)}")
            return files
        if (folder / single).is_file():
            return [folder / single]
    return []


def read_tensors(files: Iterable[Path]) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """name -> memory-mapped CPU tensor over all `files`, and name -> the file it came from."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    part = {k: f.get_tensor(k) for k in f.keys()}
            except Exception as e:  # safetensors raises its own error types for damaged headers
                raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        else:
            part = _torch_load(path)
        for name, t in part.items():
            if name in tensors:
                raise ValueError(f"tensor {name!r} is in both {origin[name]} and {path}")
            tensors[name] = t
            origin[name] = path
    return tensors, origin


class FileRows:
    """A tensor of a safetensors file, read on demand: rows[a:b] reads rows a..b-1 with plain file
    reads into fresh memory (rows[:] the whole tensor)."""

    def __init__(self, path: Path, offset: int, dtype: torch.dtype, shape: list[int]) -> None:
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, torch.Size(shape)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice):
            raise TypeError("FileRows reads a slice of rows: rows[a:b]")
        a, b, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("FileRows reads consecutive rows")
        b = max(a, b)
        row_bytes = self.shape[1:].numel() * self.dtype.itemsize
        nbytes = (b - a) * row_bytes
        if nbytes == 0:
            return torch.empty(b - a, *self.shape[1:], dtype=self.dtype)
        # an anonymous mapping of its own, unmapped when the tensor goes: from malloc, a freed buffer
        # below glibc's (adaptive) mmap threshold stays in the heap, resident
        buf = mmap.mmap(-1, nbytes)
        with open(self.path, "rb", buffering=0) as f, memoryview(buf) as view:
            f.seek(self.offset + a * row_bytes)
            done = 0
            while done < nbytes:  # one read() returns at most ~2 GiB on Linux
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{self.path}: truncated")
                done += n
        return torch.frombuffer(buf, dtype=torch.uint8).view(self.dtype).view(b - a, *self.shape[1:])


class UnmappedReader:
    """Reads tensors of safetensors files with plain file reads, not through a mapping.

    Touched pages of a live file mapping count in the process's resident set until the whole file is
    unmapped, and safetensors maps each file once for all its tensors: converting every tensor of a
    memory-mapped 7B checkpoint would leave the whole checkpoint resident beside the result. Read
    this way, the bytes pass through the page cache, which the kernel reclaims, and only the rows
    asked for are held twice."""

    def __init__(self) -> None:
        self._headers: dict[Path, tuple[int, dict]] = {}

    def rows(self, path: Path, name: str) -> FileRows | None:
        """The tensor `name` of the safetensors file `path`, to read by rows; None if `path` is not a
        safetensors file or does not hold it."""
        if path.suffix != ".safetensors":
            return None
        start, entries = self._header(path)
        entry = entries.get(name)
        if not isinstance(entry, dict) or entry.get("dtype") not in _ST_NAMES or not entry.get("shape"):
            return None
        return FileRows(path, start + entry["data_offsets"][0], _ST_NAMES[entry["dtype"]], entry["shape"])

    def _header(self, path: Path) -> tuple[int, dict]:
        if path not in self._headers:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                self._headers[path] = (8 + n, json.loads(f.read(n)))
        return self._headers[path]


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # the legacy (pre-zip) format cannot be memory-mapped: read it whole
            raise ValueError(f"{path}: cannot load ({e})") from None
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot load ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict), got {type(state).__name__}")
    return state


def stored_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype `t` is written in: `dtype` for floating-point tensors when given, else its own."""
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None, bar=None) -> None:
    """One safetensors file, written (and cast to `dtype`, if given) one tensor at a time, so at most
    one tensor is ever copied; bar (tqdm or None) advances per tensor."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        dt = stored_dtype(t, dtype)
        if dt not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dt} cannot be stored in safetensors")
        nbytes = t.numel() * dt.itemsize
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                t = t.detach().to(device="cpu", dtype=stored_dtype(t, dtype)).contiguous()
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            if bar is not None:
                bar.update(1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_sharded(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    max_shard_size: int | str,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> list[Path]:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` + index when the total exceeds
    max_shard_size (a tensor larger than the limit gets a shard of its own). Stale weight files of
    an earlier save in `folder` are removed. Returns the files written."""
    from tqdm import tqdm

    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * stored_dtype(t, dtype).itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    stale = [p for p in folder.glob("model*.safetensors") if p.name not in names]
    stale += [p for p in (folder / SAFETENSORS_INDEX, folder / BIN_INDEX) if p.exists()]
    stale += list(folder.glob("pytorch_model*.bin"))
    bar = tqdm(total=len(tensors), desc="writing", unit="tensor", disable=not (progress and _tty()))
    try:
        for name, shard in zip(names, shards):
            write_safetensors(folder / name, shard, dtype, bar)
    finally:
        bar.close()
    if n > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * stored_dtype(t, dtype).itemsize for t in tensors.values())},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
        }
        tmp = folder / f".{SAFETENSORS_INDEX}.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, folder / SAFETENSORS_INDEX)
    for p in stale:
        if p.name != SAFETENSORS_INDEX or n == 1:
            p.unlink(missing_ok=True)
    return [folder / name for name in names]


def _tty() -> bool:
    import sys

    return sys.stderr.isatty()
