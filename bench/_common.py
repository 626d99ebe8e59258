"""What the bench scripts share (not a public entry point): the repository root with its src/ on sys.path
and TensorFlow's C++ start-up lines lowered (import this before the package), a timestamped progress line,
the committed params.yaml and the machine's one-line description."""

from __future__ import annotations

import io
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from glomeruli.core.params import read_yaml  # noqa: E402
from glomeruli.core.vcs import git_show_or_none  # noqa: E402


def log(message: str) -> None:
    """A progress line on stdout with the time of day, flushed: a long run shows where it is."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def shipped_params() -> dict:
    """params.yaml as committed (a demo's `dvc exp run -S` overrides may sit in the working copy), as raw YAML."""
    text = git_show_or_none("HEAD", "params.yaml", ROOT) or (ROOT / "params.yaml").read_text(encoding="utf-8")
    return read_yaml(io.StringIO(text))


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
