#!/usr/bin/env bash
# Create .venv (Python 3.11) with the pinned dependencies and the package; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r "${1:-requirements.txt}"
.venv/bin/python -m pip install -q --no-deps -e .
