"""One argument list per kernel. cpp/cpu/ops_cpu.h is the contract: every kernel declared there and in
cpp/cuda/ops_cuda.h has the same parameter names and types in both, cpp/bindings.cpp names each
kernel's Python arguments (py::arg) as the header does, and triton_kernels' functions take the same
names, with annotations of the matching Python types. The headers and the bindings are parsed, so
a machine without a GPU checks the CUDA declarations too; where a module is built, its live
functions must carry the same names."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from internlm_fast.ops import available, backend, registry

ROOT = Path(__file__).resolve().parents[1]
HEADERS = {"cpu": ROOT / "cpp" / "cpu" / "ops_cpu.h", "cuda": ROOT / "cpp" / "cuda" / "ops_cuda.h"}
BINDINGS = ROOT / "cpp" / "bindings.cpp"

# C++ parameter type -> the annotation a Triton kernel writes for it
PY_TYPE = {
    "const at::Tensor&": "torch.Tensor",
    "at::Tensor&": "torch.Tensor",
    "const std::optional<at::Tensor>&": "torch.Tensor | None",
    "const std::vector<at::Tensor>&": "list[torch.Tensor]",
    "const std::string&": "str",
    "double": "float",
    "bool": "bool",
    "int64_t": "int",
}
# C++ return type -> the start of the Triton kernel's return annotation (an undefined tensor in a
# returned vector reaches Python as None, so list[torch.Tensor | None] is the same contract)
PY_RETURN = {"void": "None", "at::Tensor": "torch.Tensor", "std::vector<at::Tensor>": "list[torch.Tensor"}


def _split_top(params: str) -> list[str]:
    """Split a parameter list at the commas outside template brackets."""
    out, depth, cur = [], 0, ""
    for ch in params:
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return [p.strip() for p in out]


def _norm_type(t: str) -> str:
    t = re.sub(r"\s+", " ", t).strip()
    return re.sub(r"\s*([&*<>,])\s*", r"\1", t).replace(",", ", ")


def declarations(path: Path) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """name -> (return type, [(parameter type, parameter name)]) of the functions a header declares."""
    text = re.sub(r"//[^\n]*", "", path.read_text())
    text = re.sub(r"^\s*#[^\n]*", "", text, flags=re.M)
    decls = {}
    for ret, name, params in re.findall(r"([A-Za-z_][\w:<>,\s]*?)\s+(\w+)\s*\(([^()]*)\)\s*;", text):
        ret = _norm_type(ret.split("{")[-1].split("}")[-1])
        args = []
        for p in _split_top(params):
            m = re.fullmatch(r"(.*?[\w&*>])\s*\b(\w+)", p, flags=re.S)
            assert m, f"{path.name}: cannot parse parameter {p!r} of {name}"
            args.append((_norm_type(m.group(1)), m.group(2)))
        assert name not in decls, f"{path.name} declares {name} twice"
        decls[name] = (ret, args)
    return decls


def bound_args(submodule: str) -> dict[str, list[str]]:
    """name -> the py::arg names cpp/bindings.cpp gives a function of _C.<submodule>."""
    text = BINDINGS.read_text()
    found = {}
    for name, rest in re.findall(rf'\b{submodule}\.def\("(\w+)",(.*?)\);', text, flags=re.S):
        found[name] = re.findall(r'py::arg\("(\w+)"\)', rest)
    return found


def names(args: list[tuple[str, str]]) -> list[str]:
    return [n for _, n in args]


def test_headers_are_parsed():
    cpu = declarations(HEADERS["cpu"])
    assert cpu["rms_norm_fwd"] == (
        "std::vector<at::Tensor>",
        [
            ("const at::Tensor&", "x"),
            ("const at::Tensor&", "weight"),
            ("const std::optional<at::Tensor>&", "residual"),
            ("double", "eps"),
        ],
    )
    assert names(cpu["flatten_scale_fwd"][1]) == ["tensors", "out", "scale"]
    assert {"rms_norm_fwd", "flatten_scale_fwd", "decode_rotary_append"} <= set(declarations(HEADERS["cuda"]))


def test_the_contract_declares_every_kernel():
    missing = registry.kernel_names() - set(declarations(HEADERS["cpu"]))
    assert not missing, f"cpp/cpu/ops_cpu.h lacks {sorted(missing)}"
    stray = set(declarations(HEADERS["cuda"])) - registry.kernel_names()
    assert not stray, f"cpp/cuda/ops_cuda.h declares kernels no registry op names: {sorted(stray)}"


def test_cpu_and_cuda_declarations_are_one_list():
    cpu, cuda = declarations(HEADERS["cpu"]), declarations(HEADERS["cuda"])
    differ = {k: (cpu[k], cuda[k]) for k in set(cpu) & set(cuda) if cpu[k] != cuda[k]}
    assert not differ, f"ops_cpu.h and ops_cuda.h disagree: {differ}"


@pytest.mark.parametrize("submodule", ["cpu", "cuda"])
def test_bindings_name_every_argument_as_the_header(submodule):
    decls = declarations(HEADERS[submodule])
    bound = bound_args(submodule)
    assert bound, f"no {submodule}.def in cpp/bindings.cpp"
    for name, args in bound.items():
        if name in registry.UTILITIES:
            continue
        assert name in decls, f"_C.{submodule}.{name} is bound but not declared in {HEADERS[submodule].name}"
        assert args == names(decls[name][1]), f"_C.{submodule}.{name}: py::arg {args} != header {decls[name][1]}"


def test_triton_kernels_take_the_contracts_arguments():
    if not available("triton"):
        pytest.skip("triton is not installed")
    decls = declarations(HEADERS["cpu"])
    tk = backend.kernels("triton")
    assert tk.__all__
    for name in tk.__all__:
        ret, args = decls[name]
        sig = inspect.signature(getattr(tk, name))
        assert sig.return_annotation.startswith(PY_RETURN[ret]), f"triton {name} returns {sig.return_annotation}"
        params = list(sig.parameters.values())
        assert [p.name for p in params] == names(args), f"triton {name}{[p.name for p in params]} != {args}"
        for p, (ctype, cname) in zip(params, args):
            assert p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty, f"triton {name}: {p}"
            assert p.annotation == PY_TYPE[ctype], f"triton {name}({cname}): {p.annotation!r} for C++ {ctype}"


def _live_arg_names(fn) -> list[str]:
    """The argument names of a pybind11 function, from the signature line of its docstring."""
    sig = fn.__doc__.strip().splitlines()[0]
    inner = sig[sig.index("(") + 1 : sig.rindex(") ->")]
    return re.findall(r"(?:^|, )(\w+):", inner)


@pytest.mark.parametrize("submodule", ["cpu", "cuda"])
def test_live_modules_take_keyword_arguments(submodule):
    if not available(submodule):
        pytest.skip(f"backend {submodule!r} is not built here")
    module = backend.kernels(submodule)
    decls = declarations(HEADERS[submodule])
    for name in sorted(set(bound_args(submodule)) - registry.UTILITIES):
        got = _live_arg_names(getattr(module, name))
        assert got == names(decls[name][1]), f"_C.{submodule}.{name} takes {got}: rebuild the extension"
