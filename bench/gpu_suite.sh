#!/usr/bin/env bash
# The GPU suite, one command on a machine with an NVIDIA GPU:
#
#   bash bench/gpu_suite.sh
#
# 1. builds internlm_fast with its CUDA kernels, for this GPU's architecture only, into a venv that
#    sees the machine's CUDA torch (pip install --no-build-isolation ., INTERNLM_FAST_CUDA=1, ninja with
#    MAX_JOBS = nproc); the build is most of the time;
# 2. runs the op, kernel and model tests, the cuda and triton backends included (pytest -x);
# 3. prints bench/gpu_suite.py's table: the elementwise kernels' bandwidth against a device copy,
#    attention TFLOP/s against torch's flash SDPA, training tokens/s and MFU of the 1b preset, and
#    decoding tokens/s against transformers.
# Exits non-zero when the build or a test failed or a measurement raised. Budget: under 8 minutes.
# On a machine without a GPU, `python bench/gpu_suite.py --smoke` checks the script on the CPU.
#
# Environment (all optional):
#   PYTHON                 interpreter whose packages (torch, triton, transformers, pytest) the venv
#                          sees (default python3)
#   IFAST_GPU_TORCH        torch requirement to install into the venv (e.g. torch==2.14.1); default:
#                          the interpreter's torch when it is a CUDA build, else torch==2.14.1
#   IFAST_GPU_VENV         the venv (default $TMPDIR/ifast-gpu-venv; kept, so a rerun rebuilds only
#                          what changed)
#   TORCH_CUDA_ARCH_LIST   architectures to compile (default: the present GPU's, e.g. 9.0)
#   MAX_JOBS               parallel compile jobs (default: nproc)
#   IFAST_GPU_SKIP_BUILD=1 use the venv's installed build as it is
#   IFAST_GPU_SKIP_TESTS=1 build and measure only
#   IFAST_GPU_SECTIONS     gpu_suite.py's --sections (default: all)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${IFAST_GPU_VENV:-${TMPDIR:-/tmp}/ifast-gpu-venv}"
VPY="$VENV/bin/python"
T0=$(date +%s)
LAST=$T0
log() { echo "[gpu_suite] $*"; }
lap() {  # lap "what": seconds since the previous lap
  local now
  now=$(date +%s)
  log "$1: $((now - LAST)) s"
  LAST=$now
}
fail() { log "FAILED: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || fail "$PYTHON not found"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.memory --format=csv,noheader |
    sed 's/^/[gpu_suite] GPU: /'
fi
# the interpreter's own bin (ninja, nvcc wrappers) stays on PATH inside the venv
PYBIN="$("$PYTHON" -c 'import os, sys; print(os.path.dirname(os.path.abspath(sys.executable)))')"
export PATH="$VENV/bin:$PYBIN:$PATH"
if ! command -v nvcc >/dev/null && [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="$PATH:/usr/local/cuda/bin"
fi

# ---- venv --------------------------------------------------------------------------------------
# Without a pip of its own: ensurepip's old setuptools would shadow the interpreter's for the build.
if [[ ! -x "$VPY" ]]; then
  "$PYTHON" -m venv --system-site-packages --without-pip "$VENV" || fail "could not make a venv at $VENV"
fi
# A venv made from a venv sees the base interpreter's packages, not the parent venv's: a .pth file
# puts the parent's site-packages after the venv's own, so what is installed here still wins.
VSITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))' >"$VSITE/_ifast_parent_site.pth"
{ "$VPY" -c 'import setuptools' && "$VPY" -m pip --version; } >/dev/null 2>&1 || fail "$PYTHON has no pip or setuptools for the venv to use"

have_cuda_torch="$("$VPY" -c 'import torch; print(torch.__version__ if torch.version.cuda else "")' 2>/dev/null)"
if [[ -n "${IFAST_GPU_TORCH:-}" || -z "$have_cuda_torch" ]]; then
  req="${IFAST_GPU_TORCH:-torch==2.14.1}"
  log "installing $req into $VENV"
  "$VPY" -m pip install --quiet --disable-pip-version-check "$req" || fail "pip install $req"
fi
ARCH="$("$VPY" - <<'PY'
import torch
assert torch.version.cuda, f"torch {torch.__version__} is a CPU build"
assert torch.cuda.is_available(), f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
print("%d.%d" % torch.cuda.get_device_capability(0))
PY
)" || fail "no usable CUDA torch in $VENV"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
log "torch $("$VPY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)'), arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs"
lap "venv"

# ---- build ---------------------------------------------------------------------------------------
if [[ "${IFAST_GPU_SKIP_BUILD:-0}" != 1 ]]; then
  command -v nvcc >/dev/null || [[ -n "${CUDA_HOME:-}" ]] || fail "nvcc not on PATH and CUDA_HOME unset"
  command -v ninja >/dev/null || log "warning: ninja not on PATH: torch builds one file at a time"
  # Built from a copy beside the venv, so nothing compiled lands in the checkout; the copy keeps the
  # files' times and its build folder, so a rerun recompiles only what changed.
  SRC="$VENV/src"
  rm -rf "$SRC/cpp" "$SRC/python" "$SRC/triton_kernels"
  mkdir -p "$SRC"
  members=()
  for m in setup.py pyproject.toml CMakeLists.txt README.md cpp python triton_kernels; do
    [[ -e "$ROOT/$m" ]] && members+=("$m")
  done
  tar -C "$ROOT" --exclude='*.so' --exclude='__pycache__' --exclude='*.egg-info' -cf - "${members[@]}" |
    tar -C "$SRC" -xf - || fail "copying the sources"
  BUILD_LOG="$VENV/build.log"
  if ! (cd "$SRC" && INTERNLM_FAST_CUDA=1 "$VPY" -m pip install --no-build-isolation --no-deps --no-cache-dir \
      --disable-pip-version-check -v . >"$BUILD_LOG" 2>&1); then
    tail -n 80 "$BUILD_LOG" >&2
    fail "build (last 80 lines above; full log $BUILD_LOG)"
  fi
  lap "build (INTERNLM_FAST_CUDA=1, sm_${TORCH_CUDA_ARCH_LIST//./})"
fi
# from outside the checkout, so the installed package is what is imported
(cd / && "$VPY" -c '
import torch
from internlm_fast import _C
from internlm_fast.ops import available
assert _C.with_cuda, "internlm_fast._C was built without CUDA"
print("[gpu_suite] import ok:", _C.__file__, "| backends cuda:", available("cuda"), "triton:", available("triton"))
') || fail "the installed package does not import with CUDA"

# ---- tests ---------------------------------------------------------------------------------------
unset TRITON_INTERPRET INTERNLM_FAST_BACKEND
TESTS_RC=0
if [[ "${IFAST_GPU_SKIP_TESTS:-0}" != 1 ]]; then
  files=()
  for pattern in test_registry test_flash_attn test_kvcache test_rotary test_swiglu test_rms_norm \
      test_cross_entropy test_flatten_scale test_triton_kernels 'test_flash_attn*_triton' test_model test_model_triton \
      test_generate_kvcache; do
    for f in tests/$pattern.py; do
      [[ -f "$f" ]] && files+=("$f")
    done
  done
  log "pytest ${files[*]}"
  "$VPY" -m pytest "${files[@]}" -q -x -p no:cacheprovider
  TESTS_RC=$?
  lap "tests (exit $TESTS_RC)"
fi

# ---- measurements --------------------------------------------------------------------------------
PYTHONUNBUFFERED=1 "$VPY" bench/gpu_suite.py --sections "${IFAST_GPU_SECTIONS:-memory,elementwise,attention,train,decode}"
BENCH_RC=$?
lap "gpu_suite.py (exit $BENCH_RC)"
log "total: $(($(date +%s) - T0)) s"
if [[ $TESTS_RC != 0 || $BENCH_RC != 0 ]]; then
  log "FAILED: tests exit $TESTS_RC, measurements exit $BENCH_RC"
  exit 1
fi
