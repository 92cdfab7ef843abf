"""The op registry against every backend: each kernel a backend module exposes belongs to an op of
the table, each op listed for a backend has all its kernels there, and on CUDA tensors every op
resolves to a kernel of ours (or, for decode-only GEMM/argmax, the library's): never to the reference
or to nothing. The CUDA module is read from cpp/bindings.cpp, so a machine without a GPU (CI) checks
it too; where the module is built, the live module must match the source."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from internlm_fast.ops import BackendUnavailable, available, backend, registry, use_backend

from .test_kernel_signatures import bound_args

OPS_DIR = Path(__file__).resolve().parents[1] / "python" / "internlm_fast" / "ops"


def bound(submodule: str) -> set[str]:
    """The names cpp/bindings.cpp binds on _C.<submodule>."""
    return set(bound_args(submodule))


def triton_names() -> set[str]:
    return set(backend.kernels("triton").__all__)


def module_names(name: str) -> set[str]:
    """Kernel names of a backend, from the source of truth that exists on every machine."""
    if name in ("cpu", "cuda"):
        return bound(name)
    if name == "triton":
        return triton_names()
    raise ValueError(name)


def test_bindings_are_parsed():
    assert {"rms_norm_fwd", "flash_attn_fwd", "few_rows_linear"} <= bound("cpu")
    assert {"rms_norm_fwd", "flatten_scale_fwd"} <= bound("cuda")


@pytest.mark.parametrize("name", ["cpu", "cuda", "triton"])
def test_every_backend_kernel_belongs_to_an_op(name):
    if name == "triton" and not available("triton"):
        pytest.skip("triton is not installed")
    stray = module_names(name) - registry.kernel_names() - registry.UTILITIES
    assert not stray, f"backend {name!r} exposes kernels no registry op names: {sorted(stray)}"


@pytest.mark.parametrize("op", list(registry.OPS))
def test_every_listed_backend_has_the_ops_kernels(op):
    entry = registry.OPS[op]
    for device in ("cpu", "cuda"):
        for name in entry.order(device):
            if name == "aten":
                assert entry.inference_only, f"{op}: only decode-only ops may list the library kernel (aten)"
                continue
            if name == "triton" and not available("triton"):
                continue
            missing = set(entry.kernels) - module_names(name)
            assert not missing, f"{op} lists backend {name!r} on {device}, which lacks {sorted(missing)}"


def test_no_op_resolves_to_the_reference_or_nothing_on_cuda():
    """Statically, from the sources: the first backend of each op's CUDA order that has the kernels."""
    unresolved = []
    for op, entry in registry.OPS.items():
        found = [b for b in entry.cuda if b == "aten" or set(entry.kernels) <= module_names(b)]
        if not found:
            unresolved.append(op)
        assert "ref" not in entry.cuda and "ref" not in entry.cpu, f"{op}: the reference is never chosen automatically"
    assert not unresolved, f"ops without a GPU kernel: {unresolved}"


def test_every_op_has_a_cpu_kernel():
    missing = [
        op for op, e in registry.OPS.items() if not any(b == "aten" or set(e.kernels) <= bound(b) for b in e.cpu)
    ]
    assert not missing


def test_live_modules_match_the_bindings():
    if available("cpu"):
        live = {n for n in dir(backend.kernels("cpu")) if not n.startswith("_")}
        assert live == bound("cpu"), f"_C.cpu differs from cpp/bindings.cpp: {sorted(live ^ bound('cpu'))}"
    if available("cuda"):
        live = {n for n in dir(backend.kernels("cuda")) if not n.startswith("_")}
        assert live == bound("cuda"), f"_C.cuda differs from cpp/bindings.cpp: {sorted(live ^ bound('cuda'))}"


def test_ops_select_only_registered_names():
    asked = set()
    for path in OPS_DIR.glob("*.py"):
        asked |= set(re.findall(r'select\("(\w+)"', path.read_text()))
    assert asked and asked <= set(registry.OPS), sorted(asked - set(registry.OPS))


def test_select_on_cpu_tensors():
    x = torch.empty(1)
    if available("cpu"):
        assert {op: backend.select(op, x) for op in registry.OPS} == {op: "cpu" for op in registry.OPS}
    with use_backend("ref"):
        assert backend.select("flash_attn", x) == "ref"


def test_a_forced_backend_is_never_replaced():
    x = torch.empty(1)
    with use_backend("cuda"), pytest.raises(BackendUnavailable, match="'cuda'"):
        backend.select("rms_norm", x)
    # the decode GEMM has no kernel of triton's own: under a forced triton it is the library's, as on a GPU
    if available("triton") and backend._cannot_run("triton", registry.OPS["rms_norm"], "cpu") is None:
        with use_backend("triton"):
            assert backend.select("few_rows_linear", x) == "aten"
            assert backend.select("rms_norm", x) == "triton"


def test_unknown_op_is_named():
    with pytest.raises(KeyError, match="no_such_op"):
        backend.select("no_such_op", torch.empty(1))


def test_info_lists_every_op(capsys):
    from internlm_fast import info

    assert info.main([]) == 0
    out = capsys.readouterr().out
    for op in registry.OPS:
        assert op in out
    assert "torch:" in out and "features:" in out
