"""Logging set-up and progress reporting shared by stages and commands.

Quiet by default: stages and commands call `quiet_startup` before anything imports TensorFlow or JAX, so the
user sees our own lines, warnings and errors, not the libraries' start-up chatter. `GLOMERULI_VERBOSE=1` (or
`glomeruli -v`) shows everything.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import select
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

VERBOSE_ENV = "GLOMERULI_VERBOSE"
# Defaults only: a user's own setting wins. 2 hides TensorFlow's and XLA's C++ INFO and WARNING lines, not errors.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}
# What the native libraries write to fd 2 through absl, which TF_CPP_MIN_LOG_LEVEL does not reach: absl's notice
# that nobody initialised it, and its INFO lines (TensorFlow's oneDNN notice at import, the tf.data "Memory patch
# applied" at the first epoch). absl's WARNING and ERROR lines pass.
NATIVE_NOISE = re.compile(rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
                          rb"|I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] ")
_stderr_filter: subprocess.Popen | None = None
_stderr_was_terminal = False


def verbose_requested() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_startup(verbose: bool = False) -> None:
    """Silence TensorFlow's, XLA's and absl's start-up lines; call before anything imports them.

    `verbose` (or GLOMERULI_VERBOSE=1, which `verbose` sets for child processes too) leaves everything as it is.
    """
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    if verbose_requested():
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    if sys.stderr is sys.__stderr__:  # our own stderr, not one a test harness or a host program replaced
        filter_native_stderr()


def filter_native_stderr() -> None:
    """Send fd 2 through a child process that drops NATIVE_NOISE lines (C++ writes there directly, so Python's
    logging cannot). A child, not a thread: it outlives a crash of this process, so a fatal error still arrives."""
    global _stderr_filter, _stderr_was_terminal
    if _stderr_filter is not None:
        return
    src = str(Path(__file__).resolve().parents[2])
    code = f"import sys; sys.path.insert(0, {src!r}); from glomeruli.core.logs import forward_stderr; forward_stderr()"
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    try:
        _stderr_filter = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", code], stdin=read_end, stdout=2)
    except OSError:
        os.close(write_end)
        return
    finally:
        os.close(read_end)
    _stderr_was_terminal = sys.stderr.isatty()
    original = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)
    atexit.register(_close_stderr_filter, original)


def _close_stderr_filter(original: int) -> None:
    """At exit: hand fd 2 back and give the filter a moment to pass on the last lines (a traceback)."""
    sys.stderr.flush()
    os.dup2(original, 2)
    try:
        _stderr_filter.wait(timeout=0.5)  # longer only while a child of ours still holds the pipe
    except subprocess.TimeoutExpired:
        pass


def forward_stderr(source: int = 0, sink: int = 1) -> None:
    """The filter process: copy `source` to `sink` less NATIVE_NOISE lines, until `source` ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the program; we end when its stderr closes
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    held = b""
    while True:
        # a partial line is held only while it may be the start of an absl line, and briefly
        if held and (held[:1] not in b"IW" or not select.select([source], [], [], 0.2)[0]):
            _write_all(sink, held)
            held = b""
            continue
        chunk = os.read(source, 1 << 16)
        if not chunk:
            break
        *lines, held = (held + chunk).split(b"\n")
        _write_all(sink, b"".join(line + b"\n" for line in lines if not NATIVE_NOISE.match(line)))
    _write_all(sink, held)


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:  # the reader went away: keep draining, so the program never blocks on a full pipe
        pass


def stderr_is_terminal() -> bool:
    """Whether the user's stderr is a terminal (also when it runs through the filter's pipe)."""
    return _stderr_was_terminal if _stderr_filter is not None else sys.stderr.isatty()


def setup_logging(level: str | None = None) -> None:
    """Our loggers (`glomeruli.*`) at GLOMERULI_LOG_LEVEL (INFO); other libraries' at WARNING unless verbose."""
    level = level or os.environ.get("GLOMERULI_LOG_LEVEL") or "INFO"
    logging.basicConfig(level=level if verbose_requested() else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("glomeruli").setLevel(level)


def progress(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """A tqdm bar on a terminal; in logs (DVC, CI) a line roughly every 10 %."""
    if stderr_is_terminal():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=description, unit="img", dynamic_ncols=True)
        return
    step = max(1, total // 10)
    for i, item in enumerate(items, 1):
        yield item
        if i % step == 0 or i == total:
            log.info("%s: %d/%d", description, i, total)
