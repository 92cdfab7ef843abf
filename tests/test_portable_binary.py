"""The native module built for a portable -march (x86-64-v2, the default) runs on any x86-64 CPU: its
AVX2 and AVX-512 code sits only in the paths the run-time dispatch chooses (cpp/cpu/cpu_isa.h), never
in a function every CPU may run. A template or inline function of a system or torch header compiled
inside an AVX-512 body and shared by the linker would break that silently on an AVX2 machine, so the
disassembly of the built module is read: every instruction with a VEX/EVEX encoding (mnemonic v...)
or a ymm/zmm register must lie in a function of namespace ifast::cpu::avx2 or ifast::cpu::avx512."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator

import pytest

from internlm_fast.ops import available

pytestmark = pytest.mark.skipif(not available("cpu"), reason="the cpu backend is not built")

PORTABLE_ARCHS = {"x86-64", "x86-64-v2"}
# functions allowed to hold wide instructions: the dispatched namespaces only
DISPATCHED = re.compile(r"ifast::cpu::(avx2|avx512)::")
FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")


def _instructions(so: str) -> Iterator[tuple[str, str, str]]:
    """(function, mnemonic, line) of every instruction in the disassembly of `so`."""
    dump = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", so], capture_output=True, text=True, check=True)
    fn = None
    for line in dump.stdout.splitlines():
        m = FUNCTION.match(line)
        if m:
            fn = m.group(1)
            continue
        fields = line.split("\t")
        if fn is None or len(fields) < 2 or not fields[1].strip():
            continue
        yield fn, fields[1].split()[0], line


def _wide_code_outside_dispatch(so: str) -> Counter:
    found: Counter = Counter()
    for fn, mnemonic, line in _instructions(so):
        if (mnemonic.startswith("v") or "ymm" in line or "zmm" in line) and not DISPATCHED.search(fn):
            found[fn] += 1
    return found


def test_wide_instructions_only_in_dispatched_paths():
    from internlm_fast import _C

    if platform.machine() != "x86_64":
        pytest.skip("the dispatch covers x86-64")
    if _C.build_info.get("cpu_arch") not in PORTABLE_ARCHS:
        pytest.skip(f"built for -march={_C.build_info.get('cpu_arch')}, not a portable baseline")
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    found = _wide_code_outside_dispatch(_C.__file__)
    shown = "\n".join(f"  {n:5d}  {fn[:160]}" for fn, n in found.most_common(10))
    assert not found, f"AVX instructions outside the dispatched paths (count, function):\n{shown}"


def test_every_level_is_in_the_binary():
    """Each kernel body exists once per level: a cap picks code that is really there."""
    from internlm_fast import _C

    if platform.machine() != "x86_64" or shutil.which("nm") is None:
        pytest.skip("x86-64 with nm only")
    names = subprocess.run(["nm", "-C", _C.__file__], capture_output=True, text=True, check=True).stdout
    for level in ("scalar", "avx2", "avx512"):
        for entry in (
            "flash_attn_fwd",
            "flash_attn_bwd",
            "rms_norm_fwd",
            "swiglu_fwd",
            "cross_entropy_fwd",
            "few_rows_linear_bf16",
            "few_rows_linear_int8",
        ):
            assert f"ifast::cpu::{level}::{entry}(" in names, f"{entry} has no {level} path in {_C.__file__}"


def test_vnni_only_in_the_int8_tiles_of_the_avx512_bf16_level():
    """The int8 decode tiles are compiled with AVX512-VNNI enabled for both of their instantiations
    (kernels/few_rows_linear_int8.h); vpdpwssd must sit in the kVnni ones alone, which only the
    avx512_bf16 level (whose CPUs have VNNI) calls, and in every one of them."""
    from internlm_fast import _C

    if platform.machine() != "x86_64" or shutil.which("objdump") is None:
        pytest.skip("x86-64 with objdump only")
    int8_tile = re.compile(r"avx512::.*block512<\d+, \d+, (true|false)>")
    vnni: Counter = Counter()
    int8_tiles = set()
    for fn, mnemonic, _ in _instructions(_C.__file__):
        if int8_tile.search(fn):
            int8_tiles.add(fn)
        if mnemonic == "vpdpwssd":
            vnni[fn] += 1
    assert int8_tiles, "no int8 block512 instantiations found in the disassembly"
    assert all(", true>" in f for f in vnni), f"vpdpwssd outside the VNNI tiles: {sorted(vnni)[:5]}"
    missing = [t for t in int8_tiles if ", true>" in t and t not in vnni]
    assert not missing, f"VNNI tiles without vpdpwssd: {missing[:5]}"
