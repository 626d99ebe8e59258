"""Run code or tests on JAX with TensorFlow made unimportable, as on our GPU boxes (a sitecustomize in a folder)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_TENSORFLOW = """
import sys


class HideTensorFlow:
    \"\"\"Wraps a finder so that it finds no `tensorflow`: imports fail with ModuleNotFoundError and
    importlib.util.find_spec returns None, as when it is not installed (JAX's cache asks find_spec).\"\"\"

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, name):
        return getattr(self.finder, name)


sys.meta_path[:] = [HideTensorFlow(finder) for finder in sys.meta_path]
"""


def jax_env(tmp_path: Path) -> dict:
    """Environment of a process on JAX with TensorFlow made unimportable (a sitecustomize in tmp_path)."""
    (tmp_path / "sitecustomize.py").write_text(NO_TENSORFLOW)
    return dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT / 'src'}",
                JAX_PLATFORMS="cpu")


def pytest_under_jax(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run this suite's tests `args` on JAX with TensorFlow made unimportable; asserts they pass."""
    env = jax_env(tmp_path)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args,
                             "-W", "ignore::DeprecationWarning"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return result
