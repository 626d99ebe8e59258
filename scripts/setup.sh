#!/usr/bin/env bash
# Create .venv (Python 3.11) with the pinned dependencies and the package; idempotent.
# Argument: the requirements file (default requirements.txt, CPU builds). A GPU file replaces the CPU
# builds of an existing .venv: TensorFlow's CPU and CUDA wheels must never be installed side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
REQUIREMENTS=${1:-requirements.txt}
if [ -L .venv ]; then  # an environment linked in from elsewhere (e.g. a test's copy of the project): used as it is
  echo "using the linked environment $(readlink .venv) as it is"
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -qq --upgrade pip
case "$REQUIREMENTS" in
  *gpu-tf*)  .venv/bin/python -m pip uninstall -q -y tensorflow-cpu 2>/dev/null || true ;;
  *gpu-jax*) .venv/bin/python -m pip uninstall -q -y tensorflow-cpu tensorflow 2>/dev/null || true ;;
  *)         if .venv/bin/python -m pip show -q tensorflow 2>/dev/null; then
               .venv/bin/python -m pip uninstall -q -y tensorflow  # back from a GPU set-up to the CPU build
             fi ;;
esac
# -qq: errors only (a machine whose pip.conf names index folders it lacks warns once per package otherwise).
# --no-compile, then compileall on every core: pip compiles the installed files one at a time, a third of
# the install; left to first use instead, every stage process of the first run would pay for its own imports.
.venv/bin/python -m pip install -qq --no-compile -r "$REQUIREMENTS"
.venv/bin/python -m compileall -q -j 0 "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
.venv/bin/python -m pip install -qq --no-deps -e .
