"""setup.py (the build of record) and CMakeLists.txt (the IDE build) compile with the same flags.

setup.py's flag lists are read from its syntax tree, CMakeLists.txt's target_compile_options,
target_compile_definitions and target_link_options from its text. Each setup.py flag must appear in
CMake for the same language, under these mappings:
  - a Python variable in an f-string flag is the CMake variable of VARIABLES (-march={march} is
    -march=${IFAST_CPU_ARCH});
  - -DNAME[=VALUE] may be a compile option or NAME[=VALUE] in target_compile_definitions.
And the other way: every CMake flag is one of setup.py's or one that torch.utils.cpp_extension adds
to every extension (TORCH_ADDS, its COMMON_NVCC_FLAGS, torch's own TORCH_CXX_FLAGS).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "setup.py"
CMAKE = ROOT / "CMakeLists.txt"

# setup.py's Python variables in flags -> the CMake variables that hold the same value
VARIABLES = {"{march}": "${IFAST_CPU_ARCH}", "{archs}": "${_ifast_archs_csv}"}
# what torch.utils.cpp_extension defines for every extension, which CMake has to spell out
TORCH_ADDS = {"TORCH_EXTENSION_NAME=_C", "TORCH_API_INCLUDE_EXTENSION_H"}
# CMake's spelling of torch's CXX flags (-D_GLIBCXX_USE_CXX11_ABI=...), from TorchConfig.cmake
TORCH_CXX_FLAGS = "${_ifast_torch_cxx_flags}"


def _flag(node: ast.expr) -> str:
    """A flag of a list literal: a string, or an f-string with its fields written as {expr}."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = (v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}" for v in node.values)
        return "".join(parts)
    raise AssertionError(f"setup.py: a flag that is not a string literal: {ast.unparse(node)}")


def _list_flags(node: ast.expr, lists: dict[str, list[str]]) -> list[str]:
    """The flags of `[...]`, of a list variable, or of `a + b` of those."""
    if isinstance(node, ast.List):
        return [_flag(e) for e in node.elts]
    if isinstance(node, ast.Name):
        return list(lists[node.id])
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _list_flags(node.left, lists) + _list_flags(node.right, lists)
    raise AssertionError(f"setup.py: cannot read flags from {ast.unparse(node)}")


def setup_flags() -> dict[str, set[str]]:
    """{'cxx', 'nvcc', 'link'}: every flag setup.py passes, over both its CPU-only and CUDA builds."""
    tree = ast.parse(SETUP.read_text())
    nodes = sorted(
        (n for n in ast.walk(tree) if isinstance(n, ast.Assign | ast.AugAssign | ast.keyword)),
        key=lambda n: (n.lineno, n.col_offset),
    )
    lists: dict[str, list[str]] = {}
    found = {"cxx": set(), "nvcc": set(), "link": set()}
    for node in nodes:
        if isinstance(node, ast.Assign):
            target = node.targets[0]
            flags = isinstance(node.value, ast.List) and all(
                isinstance(e, ast.Constant | ast.JoinedStr) for e in node.value.elts
            )
            if len(node.targets) == 1 and isinstance(target, ast.Name) and flags:
                lists[target.id] = _list_flags(node.value, lists)
        elif isinstance(node, ast.AugAssign):
            if isinstance(node.target, ast.Name) and node.target.id in lists:
                lists[node.target.id] += _list_flags(node.value, lists)
        elif node.arg == "extra_compile_args":
            assert isinstance(node.value, ast.Dict), "setup.py: extra_compile_args is a {'cxx': ..., 'nvcc': ...}"
            for key, value in zip(node.value.keys, node.value.values):
                found[key.value] |= set(_list_flags(value, lists))
        elif node.arg == "extra_link_args":
            found["link"] |= set(_list_flags(node.value, lists))
    return found


def _generator_bodies(text: str, language: str) -> list[str]:
    """The contents of every $<$<COMPILE_LANGUAGE:language>:...> in text."""
    bodies = []
    opener = f"$<$<COMPILE_LANGUAGE:{language}>:"
    for start in (m.end() for m in re.finditer(re.escape(opener), text)):
        depth, i = 1, start
        while depth:
            if text.startswith("$<", i):
                depth, i = depth + 1, i + 2
                continue
            depth -= text[i] == ">"
            i += 1
        bodies.append(text[start : i - 1])
    return bodies


def _commands(text: str, command: str) -> list[str]:
    """The argument text of every call of a CMake command (none of ours nests parentheses)."""
    return re.findall(rf"^\s*{command}\((.*?)\)\s*$", text, flags=re.M | re.S)


def cmake_flags() -> dict[str, set[str]]:
    """{'cxx', 'nvcc', 'link', 'defines'} of target _C, comments stripped."""
    text = re.sub(r"#[^\n]*", "", CMAKE.read_text())
    options = " ".join(_commands(text, "target_compile_options"))
    found = {
        "cxx": {f for body in _generator_bodies(options, "CXX") for f in body.split()},
        "nvcc": {f for body in _generator_bodies(options, "CUDA") for f in body.split()},
        "link": set(),
        "defines": set(),
    }
    for args in _commands(text, "target_link_options"):
        found["link"] |= set(args.split()[2:])  # _C PRIVATE ...
    for args in _commands(text, "target_compile_definitions"):
        found["defines"] |= set(args.split()[2:])
    return found


def _map(flag: str) -> str:
    """A setup.py flag with its Python variables written as CMake's."""
    for py, cm in VARIABLES.items():
        flag = flag.replace(py, cm)
    return flag


def _in_cmake(flag: str, options: set[str], defines: set[str]) -> bool:
    flag = _map(flag)
    return flag in options or (flag.startswith("-D") and flag[2:] in defines)


def test_files_are_parsed():
    s, c = setup_flags(), cmake_flags()
    assert {"-O3", "-fopenmp", "-march={march}", "-DNDEBUG"} <= s["cxx"]
    assert {"-O3", "--use_fast_math", "-DIFAST_WITH_CUDA"} <= s["nvcc"]
    assert s["link"] == {"-fopenmp"}
    assert {"-O3", "-march=${IFAST_CPU_ARCH}", TORCH_CXX_FLAGS} <= c["cxx"]
    assert {"--use_fast_math", "--expt-relaxed-constexpr"} <= c["nvcc"]
    assert "IFAST_WITH_CUDA" in c["defines"]


@pytest.mark.parametrize("language", ["cxx", "nvcc", "link"])
def test_every_setup_flag_is_in_cmake(language):
    s, c = setup_flags(), cmake_flags()
    defines = c["defines"] if language != "link" else set()
    missing = sorted(f for f in s[language] if not _in_cmake(f, c[language], defines))
    assert not missing, f"CMakeLists.txt lacks setup.py's {language} flags {missing}"


def test_every_cmake_flag_comes_from_setup_or_torch():
    from torch.utils import cpp_extension

    s, c = setup_flags(), cmake_flags()
    extra_cxx = c["cxx"] - {_map(f) for f in s["cxx"]} - {TORCH_CXX_FLAGS}
    assert not extra_cxx, f"CMakeLists.txt compiles C++ with flags setup.py does not pass: {sorted(extra_cxx)}"
    extra_nvcc = c["nvcc"] - {_map(f) for f in s["nvcc"]} - set(cpp_extension.COMMON_NVCC_FLAGS)
    assert not extra_nvcc, f"CMakeLists.txt compiles CUDA with flags setup.py does not pass: {sorted(extra_nvcc)}"
    setup_defines = {f[2:] for f in s["cxx"] | s["nvcc"] if f.startswith("-D")}
    extra_defines = c["defines"] - setup_defines - TORCH_ADDS
    assert not extra_defines, f"CMakeLists.txt defines what setup.py does not: {sorted(extra_defines)}"
    assert c["link"] == {_map(f) for f in s["link"]}


def test_same_language_standard():
    """cpp_extension compiles C++ and CUDA as C++20; CMake sets the same standard for both."""
    from torch.utils import cpp_extension

    text = CMAKE.read_text()
    assert "'-std=c++20'" in Path(cpp_extension.__file__).read_text(), "torch's cpp_extension changed standard"
    assert re.search(r"\bCXX_STANDARD 20\b", text) and re.search(r"\bCUDA_STANDARD 20\b", text)
