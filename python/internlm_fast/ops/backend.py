"""Which backend runs an op: chosen by device, or forced for tests and benchmarks.

    ref     the pure-torch reference (the oracle; autograd through torch)
    cpu     C++ kernels in internlm_fast._C.cpu
    cuda    CUDA kernels in internlm_fast._C.cuda
    triton  Triton kernels in internlm_fast.triton_kernels (on CPU tensors only under
            TRITON_INTERPRET=1, Triton's interpreter)

Default ("auto"): the first backend of the op's registry entry (ops/registry.py) that can run it:
cuda then triton for CUDA tensors, cpu for CPU tensors. Force one with the environment
variable INTERNLM_FAST_BACKEND or, in code, ``with use_backend("ref"): ...``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from . import registry

BACKENDS = ("ref", "cpu", "cuda", "triton")
ENV_VAR = "INTERNLM_FAST_BACKEND"


class BackendUnavailable(RuntimeError):
    """The requested backend is not built, not installed, or cannot run these tensors."""


def _from_env() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r}: expected auto or one of {', '.join(BACKENDS)}")
    return value


# A plain module global (not thread-local) so torch.compile can guard on it.
_forced: list[str] = [_from_env()]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every op inside the block onto one backend ("auto" restores device-based choice)."""
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend {name!r}: expected auto or one of {', '.join(BACKENDS)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def forced_backend() -> str:
    return _forced[-1]


_loaded: dict[str, ModuleType | BackendUnavailable] = {}


def _load(name: str) -> ModuleType:
    if name not in _loaded:
        try:
            _loaded[name] = _import_backend(name)
        except BackendUnavailable as err:
            _loaded[name] = err
    found = _loaded[name]
    if isinstance(found, BackendUnavailable):
        raise found
    return found


def _import_backend(name: str) -> ModuleType:
    if name in ("cpu", "cuda"):
        try:
            from internlm_fast import _C
        except ImportError as err:
            raise BackendUnavailable(
                f"backend {name!r}: the native extension internlm_fast._C is not built or does not "
                f"load ({err}). Build it with `pip install --no-build-isolation .` against the "
                "installed torch."
            ) from err
        if name == "cuda" and not _C.with_cuda:
            raise BackendUnavailable(
                "backend 'cuda': internlm_fast._C was built without CUDA (CPU torch or no nvcc); "
                "rebuild with a CUDA torch and INTERNLM_FAST_CUDA=1"
            )
        return getattr(_C, name)
    try:
        return _import_triton_kernels()
    except ImportError as err:
        raise BackendUnavailable(f"backend 'triton': Triton is not installed ({err}); pip install triton") from err


TRITON_PACKAGE = "internlm_fast.triton_kernels"


def _import_triton_kernels() -> ModuleType:
    """The Triton kernels as the package internlm_fast.triton_kernels.

    Installed, setup.py puts the repository's triton_kernels/ folder there. In a source checkout
    run with PYTHONPATH=python that package does not exist, so the folder (two levels above this
    package) is loaded under the same name: its relative imports, pickling and error messages then
    read the same in both layouts, and nothing is symlinked or added to sys.path.
    """
    try:
        return importlib.import_module(TRITON_PACKAGE)
    except ModuleNotFoundError as err:
        if err.name != TRITON_PACKAGE:
            raise  # the package exists but something it imports (triton itself) is missing
    source = Path(__file__).resolve().parents[3] / "triton_kernels"
    init = source / "__init__.py"
    if not init.is_file():
        raise ModuleNotFoundError(f"{TRITON_PACKAGE} is not installed and no source folder {source} exists")
    spec = importlib.util.spec_from_file_location(TRITON_PACKAGE, init, submodule_search_locations=[str(source)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[TRITON_PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[TRITON_PACKAGE]
        raise
    import internlm_fast

    internlm_fast.triton_kernels = module
    return module


def available(name: str) -> bool:
    """Whether backend `name` is built and importable (not whether it suits a given device)."""
    if name == "ref":
        return True
    try:
        _load(name)
    except BackendUnavailable:
        return False
    return True


def _cannot_run(name: str, entry: registry.Op, device: str) -> str | None:
    """Why backend `name` cannot run `entry` on tensors of `device`, or None when it can."""
    if name in ("ref", "aten"):
        return None
    if name == "cpu" and device != "cpu":
        return f"backend 'cpu' runs CPU tensors, and the inputs are on {device}"
    if name == "cuda" and device != "cuda":
        return f"backend 'cuda' runs CUDA tensors, and the inputs are on {device}"
    if name == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "backend 'triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before Python starts"
    if name == "triton" and device not in ("cpu", "cuda"):
        return f"backend 'triton' runs CUDA tensors, and the inputs are on {device}"
    try:
        module = _load(name)
    except BackendUnavailable as err:
        return str(err)
    missing = [k for k in entry.kernels if not hasattr(module, k)]
    return f"backend {name!r} has no kernel {', '.join(missing)}" if missing else None


def select(op: str, x: torch.Tensor) -> str:
    """The backend that runs `op` on tensors living where `x` lives (see `select_for`)."""
    return select_for(op, x.device.type)


def select_for(op: str, device: str) -> str:
    """The backend that runs `op` on tensors of device type `device`: the first backend of the op's
    registry entry for that device that can run it, or the forced one. A forced backend is never
    replaced, except by "aten" for a decode-only op that this backend has no kernel for and whose
    entry lists the library kernel for that device (the decode GEMM under a forced triton runs on
    cuBLAS, as it does on the GPU)."""
    entry = registry.op(op)
    forced = _forced[-1]
    if forced == "ref":
        return "ref"
    order = entry.order(device)
    if forced == "auto":
        reasons = []
        for name in order:
            why = _cannot_run(name, entry, device)
            if why is None:
                return name
            reasons.append(why)
        if not order:
            raise BackendUnavailable(f"{op}: no backend runs tensors on device {device}")
        raise BackendUnavailable(f"{op} on {device} tensors: no backend can run it ({'; '.join(reasons)})")
    why = _cannot_run(forced, entry, device)
    if why is None:
        return forced
    if entry.inference_only and "aten" in order and forced not in order:
        return "aten"
    raise BackendUnavailable(f"{op}: backend {forced!r} was forced, but {why}")


def resolution(device: str) -> dict[str, str]:
    """For every op in the registry, the backend that would run it on `device` tensors now, or
    "unavailable: <why>"."""
    out = {}
    for name in registry.OPS:
        try:
            out[name] = select_for(name, device)
        except BackendUnavailable as err:
            out[name] = f"unavailable: {err}"
    return out


def kernels(name: str) -> ModuleType:
    """The module holding backend `name`'s kernels (same function names in every backend)."""
    return _load(name)
