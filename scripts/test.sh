#!/usr/bin/env bash
# The test suite (under 20 minutes on 2 cores): unit tests, both Keras backends, and a real `dvc repro`.
# `bash scripts/test.sh -m learning` runs the learning test on the hard set instead (3-4 min).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] || bash scripts/setup.sh requirements-dev.txt
export DVC_NO_ANALYTICS=1 TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m pytest -q "$@"
