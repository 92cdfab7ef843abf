#!/usr/bin/env bash
# CI check that the CUDA backend compiles, links and imports, on a machine without a GPU.
# Makes a fresh venv in a temp dir with the CUDA torch, builds internlm_fast._C from a copy of
# this checkout with INTERNLM_FAST_CUDA=1 for sm_80 and sm_90, imports it and asserts with_cuda.
# First, .ci/cuda_emu/run.sh runs the kernels' logic on the CPU (g++ + a thread-per-CUDA-thread
# emulation, seconds to a minute). Exits non-zero on any failure. The real kernel tests need a GPU:
#   PYTHONPATH=python python -m pytest tests/   (the cuda backend joins when a GPU exists)
#
# Environment (all optional):
#   PYTHON                 interpreter for the venv (default python3.11)
#   IFAST_CI_TORCH         torch requirement (default torch==2.14.1, the CUDA 13.0 build)
#   TORCH_CUDA_ARCH_LIST   architectures (default "8.0;9.0")
#   MAX_JOBS               parallel compile jobs (default: number of cores)
#   IFAST_CI_KEEP=1        keep the temp dir (venv, build log) for inspection
#   IFAST_CI_EMU=0         skip the CPU emulation of the kernels
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
TORCH_REQ="${IFAST_CI_TORCH:-torch==2.14.1}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export INTERNLM_FAST_CUDA=1

WORK="$(mktemp -d "${TMPDIR:-/tmp}/ifast-compile-cuda.XXXXXX")"
cleanup() {
  if [[ "${IFAST_CI_KEEP:-0}" == 1 ]]; then echo "[compile_cuda] kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

T0=$(date +%s)
LAST=$T0
log() { echo "[compile_cuda] $*"; }
lap() {  # lap "what": seconds since the previous lap
  local now
  now=$(date +%s)
  log "$1: $((now - LAST)) s"
  LAST=$now
}
fail() { log "FAILED: $*" >&2; exit 1; }

command -v nvcc >/dev/null || fail "nvcc not on PATH (the CUDA toolkit is needed to compile the .cu files)"
command -v "$PYTHON" >/dev/null || fail "$PYTHON not found"
log "nvcc: $(nvcc --version | tail -n 2 | head -n 1)"
log "archs: $TORCH_CUDA_ARCH_LIST, jobs: $MAX_JOBS, work dir: $WORK"

if [[ "${IFAST_CI_EMU:-1}" != 0 ]]; then
  bash "$ROOT/.ci/cuda_emu/run.sh" || fail "CUDA kernels' CPU emulation (.ci/cuda_emu)"
  lap "kernel emulation"
fi

"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
# (pip's notes about index locations it skips are noise here; its exit status still counts)
"$VPY" -m pip install --quiet --disable-pip-version-check "$TORCH_REQ" ninja numpy "setuptools>=64" 2>&1 |
  { grep -v "^WARNING: Location '.*' is ignored" || true; }
"$VPY" -c "import torch; assert torch.version.cuda, 'torch ' + torch.__version__ + ' is a CPU build'; \
print('[compile_cuda] torch', torch.__version__, 'CUDA', torch.version.cuda)"
lap "venv + torch install"

# Build from a copy, so nothing compiled against this torch lands in the checkout (the main CI
# builds the CPU extension there against another torch).
mkdir -p "$WORK/src"
tar -C "$ROOT" --exclude=./.git --exclude=./build --exclude='*.so' --exclude=./.venv -cf - . |
  tar -C "$WORK/src" -xf -
cd "$WORK/src"
if ! "$VPY" setup.py build_ext --inplace >"$WORK/build.log" 2>&1; then
  tail -n 60 "$WORK/build.log" >&2
  fail "build (full log above, last 60 lines)"
fi
lap "build (INTERNLM_FAST_CUDA=1)"

for arch in ${TORCH_CUDA_ARCH_LIST//;/ }; do
  sm="${arch/./}"
  grep -q -- "code=sm_${sm}" "$WORK/build.log" || fail "no nvcc command compiled for sm_${sm}"
done
ls python/internlm_fast/_C*.so >/dev/null 2>&1 || fail "no internlm_fast/_C*.so was built"

PYTHONPATH="$WORK/src/python" "$VPY" - <<'PY'
import torch  # loads libc10/libtorch, which _C links against

from internlm_fast import _C
from internlm_fast.ops import available

from internlm_fast.ops import registry

assert _C.with_cuda, "internlm_fast._C was built without CUDA"
assert available("cuda"), "backend 'cuda' is not available"
# every op whose registry entry lists the cuda backend finds all its kernels in the built module
for op in registry.OPS.values():
    if "cuda" in op.cuda:
        missing = [k for k in op.kernels if not hasattr(_C.cuda, k)]
        assert not missing, f"_C.cuda lacks {missing}, kernels of {op.name}"
print("[compile_cuda] _C.cuda:", ", ".join(sorted(n for n in dir(_C.cuda) if not n.startswith("_"))))
print("[compile_cuda] build_info:", _C.build_info)
print("[compile_cuda] import ok: _C.with_cuda =", _C.with_cuda, "| GPU present:", torch.cuda.is_available())
PY
lap "import check"
log "total: $(($(date +%s) - T0)) s"
