#!/usr/bin/env bash
# Runs the CUDA kernels' logic on the CPU: each cpp/cuda/<op>.cu that has a test_<op>.cpp here is
# rewritten (kernel<<<grid, block, smem, stream>>>(args) -> emu::launch(...)), compiled with g++
# against emu.h and the CUDA headers (no GPU, no torch), and its test run. Needs g++ (C++20),
# python3 and the CUDA toolkit's include dir (CUDA_HOME, else found from nvcc).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
if [[ -z "${CUDA_HOME:-}" ]]; then
  command -v nvcc >/dev/null || { echo "cuda_emu: no CUDA_HOME and no nvcc" >&2; exit 1; }
  CUDA_HOME="$(nvcc -dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
  CUDA_HOME="$(cd "$CUDA_HOME" && pwd)"
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/ifast-cuda-emu.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
status=0
for test in "$HERE"/test_*.cpp; do
  op="$(basename "$test" .cpp)"
  op="${op#test_}"
  src="$ROOT/cpp/cuda/$op.cu"
  [[ -f "$src" ]] || { echo "cuda_emu: $src missing for $test" >&2; exit 1; }
  python3 - "$src" "$WORK/${op}_emu.cpp" <<'PY'
import re, sys
s = open(sys.argv[1]).read()
s = '#include "emu.h"\n' + s
n0 = s.count("<<<")
s, n = re.subn(r"([A-Za-z_][\w:]*<[^<>;]*>|[A-Za-z_][\w:]*)\s*<<<(.*?)>>>\(", r"emu::launch(\2, \1, ", s, flags=re.S)
if n != n0:
    sys.exit(f"cuda_emu: rewrote {n} of {n0} kernel launches in {sys.argv[1]}")
open(sys.argv[2], "w").write(s)
PY
  g++ -std=c++20 -O1 -pthread -w -I"$HERE" -I"$ROOT/cpp/cuda" -I"$CUDA_HOME/include" \
    -o "$WORK/test_$op" "$test" "$WORK/${op}_emu.cpp"
  echo "cuda_emu: $op"
  if ! timeout "${IFAST_EMU_TIMEOUT:-600}" "$WORK/test_$op"; then
    echo "cuda_emu: $op FAILED (or hung at a barrier)" >&2
    status=1
  fi
done
exit $status
