#!/usr/bin/env bash
# The test suite (about 19 minutes on 2 cores): unit tests, both Keras backends, a real `dvc repro` and the
# learning test on the hard set. Two worker processes (GLOMERULI_TEST_WORKERS, 0 for one process): most of
# the suite is single-threaded Python (imports, tracing, DVC), so a second process uses the second core.
# `bash scripts/test.sh -m learning` runs the learning test alone.
# `bash scripts/test.sh -m "not slow"` is the quick loop: everything but training, `dvc repro` and Keras subprocesses.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -c "import pytest, xdist" 2>/dev/null || bash scripts/setup.sh requirements-dev.txt
export DVC_NO_ANALYTICS=1 TF_CPP_MIN_LOG_LEVEL=2
# loadscope: a module's tests share one worker, so module fixtures are built once; the conftest orders the
# slowest modules first so that neither worker is left with a long tail.
exec .venv/bin/python -m pytest -q -n "${GLOMERULI_TEST_WORKERS:-2}" --dist loadscope --no-loadscope-reorder "$@"
