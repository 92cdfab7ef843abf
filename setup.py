"""Builds internlm_fast and its one native module, internlm_fast._C.

CPU kernels (cpp/cpu/*.cpp) are always built. CUDA kernels (cpp/cuda/*.cu plus their host glue
cpp/cuda/*.cpp) are built when torch is a CUDA build and nvcc is found, or forced with
INTERNLM_FAST_CUDA=1 (INTERNLM_FAST_CUDA=0 turns them off). Build without isolation, against
the torch that will run it:  pip install --no-build-isolation .

Environment:
  INTERNLM_FAST_CUDA      auto (default) | 1 | 0
  INTERNLM_FAST_CPU_ARCH  value for -march (default: x86-64-v2, portable; the kernels carry AVX2 and
                          AVX-512 paths, chosen at run time, whatever it is)
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default: "8.0;9.0")
  CUDA_HOME               CUDA toolkit root (default: found from nvcc, following wrapper scripts)
  MAX_JOBS                parallel compile jobs (ninja)
"""

import glob
import os
import platform
import shutil
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_root() -> str | None:
    """CUDA toolkit root. nvcc on PATH may be a wrapper script or symlink in /usr/local/bin, whose
    parent is not the toolkit, so ask nvcc itself where its binary lives."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    try:
        cmd = [nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull]
        out = subprocess.run(cmd, capture_output=True, text=True).stderr
        for line in out.splitlines():
            if "TOP=" in line:
                return os.path.abspath(line.split("TOP=", 1)[1].strip())
    except OSError:
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _want_cuda(torch_cuda: str | None, cuda_home: str | None) -> bool:
    flag = os.environ.get("INTERNLM_FAST_CUDA", "auto").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return False
    available = torch_cuda is not None and cuda_home is not None
    if flag in ("1", "on", "true", "yes", "force"):
        if torch_cuda is None:
            raise RuntimeError("INTERNLM_FAST_CUDA=1, but the installed torch is a CPU build")
        if cuda_home is None:
            raise RuntimeError("INTERNLM_FAST_CUDA=1, but no CUDA toolkit was found: set CUDA_HOME")
        return True
    if flag != "auto":
        raise RuntimeError(f"INTERNLM_FAST_CUDA={flag!r}: expected auto, 1 or 0")
    return available


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def _extension():
    cuda_home = _toolkit_root()
    if cuda_home is not None:
        os.environ.setdefault("CUDA_HOME", cuda_home)  # read by torch.utils.cpp_extension at import
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = _want_cuda(torch.version.cuda, cuda_home)
    march = os.environ.get("INTERNLM_FAST_CPU_ARCH", "x86-64-v2" if _x86() else "native")
    # CMakeLists.txt compiles with the same flags (tests/test_build_flags.py compares the two)
    cxx = ["-O3", "-fopenmp", f"-march={march}", "-fno-math-errno", "-fno-trapping-math", "-DNDEBUG"]
    cxx += [f"-DIFAST_CPU_ARCH={march}"]  # reported by python -m internlm_fast.info
    sources = ["cpp/bindings.cpp", *sorted(glob.glob("cpp/cpu/*.cpp"))]
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "cpp")],
        extra_link_args=["-fopenmp"],
    )
    if not with_cuda:
        ext = CppExtension("internlm_fast._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
        return ext, BuildExtension
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    archs = ",".join(a.strip() for a in os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";") if a.strip())
    cxx += [f"-DIFAST_CUDA_ARCHS={archs}"]
    sources += sorted(glob.glob("cpp/cuda/*.cpp")) + sorted(glob.glob("cpp/cuda/*.cu"))
    # the CUDA 13 wheels carry headers (cccl, cublas...) that torch's own headers include
    wheel_includes = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*", "include"))
    kwargs["include_dirs"] += [os.path.abspath(p) for p in wheel_includes]
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "-DNDEBUG"]
    ext = CUDAExtension(
        "internlm_fast._C",
        sources,
        extra_compile_args={"cxx": cxx + ["-DIFAST_WITH_CUDA"], "nvcc": nvcc + ["-DIFAST_WITH_CUDA"]},
        **kwargs,
    )
    return ext, BuildExtension


ext, build_ext = _extension()

setup(
    name="internlm_fast",
    version="0.1.0",
    description="InternLM, fast: compiled kernels, trainer and inference for InternLM models",
    python_requires=">=3.11",
    package_dir={"": "python", "internlm_fast.triton_kernels": "triton_kernels"},
    # every package under python/ (a new subpackage cannot be left out of the install)
    packages=[*find_packages("python"), "internlm_fast.triton_kernels"],
    package_data={"internlm_fast.serve": ["static/*"]},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext.with_options(no_python_abi_suffix=False)},
    install_requires=["torch", "numpy"],
)
