#!/usr/bin/env bash
# Sets up .venv (Python 3.11), builds and installs internlm_fast into it, runs the whole test suite.
# Extra arguments go to pytest. Exit status is pytest's (5, "no tests collected", fails too).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q -r requirements-dev.txt
.venv/bin/pip install -q --no-build-isolation .
exec .venv/bin/python -m pytest tests -q "$@"
