"""`python -m internlm_fast.info`: versions, build flags, CPU features, GPUs, and which backend
runs each op on each device (read from the op registry, as the ops choose). `--json` prints the
same as one JSON object."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys

import torch

from internlm_fast.ops import backend, registry

# CPU flags (as /proc/cpuinfo spells them) that decide which vector paths can run
CPU_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
                "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")  # fmt: skip


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_features() -> list[str]:
    """The flags above that this CPU reports (Linux), else an empty list."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in CPU_FEATURES if flag in have]
    except OSError:
        pass
    return []


def _build() -> dict[str, object]:
    try:
        from internlm_fast import _C
    except ImportError as err:
        return {"native extension": f"not built ({err})"}
    info = dict(getattr(_C, "build_info", {}))
    info["with_cuda"] = bool(_C.with_cuda)
    if hasattr(_C.cpu, "isa"):  # every C++ CPU kernel carries scalar/avx2/avx512 paths, chosen at run time
        info["cpu kernels isa"] = (
            f"{_C.cpu.isa()}: the path the C++ cpu kernels run here (IFAST_CPU_ISA="
            f"{os.environ.get('IFAST_CPU_ISA', 'unset')} caps it: scalar, avx2, avx512, avx512_bf16)"
        )
    if hasattr(_C.cpu, "attn_bf16_gemm"):  # oneDNN's brgemm (AMX) or our AVX512-BF16 tiles
        info["attention bf16 products"] = (
            f"{_C.cpu.attn_bf16_gemm()} at the avx512_bf16 level (IFAST_ATTN_BF16_GEMM="
            f"{os.environ.get('IFAST_ATTN_BF16_GEMM', 'unset')}: brgemm, tiles or auto, brgemm where the CPU has AMX)"
        )
    if hasattr(_C.cpu, "fp32_gemm"):  # oneDNN where torch's MKL would run AVX2 code on an AVX-512 CPU
        info["fp32 gemm"] = (
            f"{_C.cpu.fp32_gemm()}: the library fp32 linear layers and the fused cross-entropy multiply "
            f"on (IFAST_FP32_GEMM={os.environ.get('IFAST_FP32_GEMM', 'unset')}: onednn or aten)"
        )
    if hasattr(_C.cpu, "bf16_gemm"):  # fp32 GEMMs on widened operands where ATen's bf16 GEMM is a slow loop
        info["bf16 gemm"] = (
            f"{_C.cpu.bf16_gemm()}: the route of the library bf16 linear layers and the fused cross-entropy "
            f"(IFAST_BF16_GEMM={os.environ.get('IFAST_BF16_GEMM', 'unset')}: widen to fp32 or native, "
            "widen where the CPU lacks AVX-512)"
        )
    if not info["with_cuda"]:
        info["cuda_archs"] = "none (built without CUDA)"
    return info


def _gpus() -> list[str]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(
            f"{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
        )
    return out


def collect() -> dict[str, object]:
    return {
        "versions": {
            "python": platform.python_version(),
            "internlm_fast": _version("internlm_fast"),
            "torch": torch.__version__,
            "torch CUDA": torch.version.cuda or "none (CPU build)",
            "triton": _version("triton"),
            "transformers": _version("transformers"),
        },
        "build": _build(),
        "cpu": {
            "machine": platform.machine(),
            "processor": platform.processor() or "unknown",
            "threads": torch.get_num_threads(),
            "features": " ".join(cpu_features()) or "unknown",
            # ATen's own dispatch level: what torch's GEMMs (oneDNN, AMX for bf16 where present) use
            "torch capability": torch.backends.cpu.get_cpu_capability(),
        },
        "gpus": _gpus() or ["none"],
        "backend forced": f"{backend.forced_backend()} ({backend.ENV_VAR}={os.environ.get(backend.ENV_VAR, 'unset')})",
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "unset"),
        "ops": {device: backend.resolution(device) for device in ("cpu", "cuda")},
    }


# The ops whose cpu kernels have a path of their own at the avx512_bf16 level (AVX512-BF16 and
# AVX512-VNNI): attention on bf16 inputs multiplies with the bf16 dot product, the int8 decode GEMM
# multiply-adds with vpdpwssd. The other kernels run their AVX-512 path there.
AVX512_BF16_OPS = frozenset({"flash_attn", "flash_attn_kvcache", "few_rows_linear_int8"})


def cpu_path(op: str, isa: str) -> str:
    """The cpu backend's path for `op` at run-time level `isa`, as the table prints it."""
    if isa == "avx512_bf16" and op not in AVX512_BF16_OPS:
        return "cpu/avx512"
    return f"cpu/{isa}"


def _cpu_isa() -> str | None:
    try:
        from internlm_fast import _C
    except ImportError:
        return None
    return _C.cpu.isa() if hasattr(_C.cpu, "isa") else None


def _table(ops: dict[str, dict[str, str]]) -> list[str]:
    width = max(len(name) for name in registry.OPS)
    gpu = "cuda tensors" if torch.cuda.is_available() else "cuda tensors (no GPU here: what would run on one)"
    lines = [f"  {'op':<{width}}  {'cpu tensors':<15}  {gpu}"]
    isa = _cpu_isa()
    for name, entry in registry.OPS.items():
        cells = []
        for device in ("cpu", "cuda"):
            got = ops[device][name]
            if got == "cpu" and isa:
                got = cpu_path(name, isa)
            cells.append(got if not got.startswith("unavailable") else "-")
        lines.append(
            f"  {name:<{width}}  {cells[0]:<15}  {cells[1]:<8}  (tries {'/'.join(entry.cpu)} | {'/'.join(entry.cuda)})"
        )
    why = {f"{name} on {device}": ops[device][name] for device in ops for name in ops[device]
           if ops[device][name].startswith("unavailable")}  # fmt: skip
    if why:
        lines.append("  unavailable:")
        lines += [f"    {key}: {reason.removeprefix('unavailable: ')}" for key, reason in why.items()]
    return lines


def render(info: dict[str, object]) -> str:
    lines = []
    for section in ("versions", "build", "cpu"):
        lines.append(f"{section}:")
        lines += [f"  {k}: {v}" for k, v in info[section].items()]
    lines.append("gpus:")
    lines += [f"  {g}" for g in info["gpus"]]
    lines.append(f"backend forced: {info['backend forced']}")
    lines.append(f"TRITON_INTERPRET: {info['TRITON_INTERPRET']}")
    lines.append("ops (backend that runs each op, by the tensors' device):")
    lines += _table(info["ops"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m internlm_fast.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
