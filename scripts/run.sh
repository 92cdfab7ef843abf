#!/usr/bin/env bash
# Sets up .venv (Python 3.11), builds and installs internlm_fast into it, runs the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q -r requirements.txt
.venv/bin/pip install -q --no-build-isolation .
exec .venv/bin/python -m internlm_fast.train "$@"
