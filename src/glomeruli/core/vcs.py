"""git and DVC run as subprocesses, as a user would run them: each call returns the command's standard output
and raises `CommandError` (naming the command, the folder and the end of its message) when it fails.

DVC runs as `python -m dvc` with this interpreter, so it is the DVC installed beside the package even when the
environment's `bin/` is not on PATH.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from glomeruli.core.errors import UserError

log = logging.getLogger(__name__)

MESSAGE_TAIL = 1500  # characters of a failed command's message kept: the end says what went wrong


class CommandError(UserError):
    """A git or dvc command exited with an error."""

    def __init__(self, command: str, cwd: Path, returncode: int, stderr: str):
        self.command, self.cwd, self.returncode, self.stderr = command, cwd, returncode, stderr
        super().__init__(f"`{command}` failed in {cwd} (exit {returncode}): "
                         f"{stderr.strip()[-MESSAGE_TAIL:] or 'no message'}")


def _run(argv: list[str], shown: str, cwd: Path | str, *, capture: bool) -> str:
    log.debug("$ %s  (in %s)", shown, cwd)
    result = subprocess.run(argv, cwd=cwd, capture_output=capture, text=True)
    if result.returncode != 0:
        message = (result.stderr or result.stdout or "") if capture else "its output is above"
        raise CommandError(shown, Path(cwd), result.returncode, message)
    return result.stdout if capture else ""


def run_git(args: Sequence[str], cwd: Path | str = ".") -> str:
    """`git ARGS` in `cwd`; its standard output."""
    return _run(["git", *args], " ".join(["git", *args]), cwd, capture=True)


def run_dvc(args: Sequence[str], cwd: Path | str = ".", *, capture: bool = True) -> str:
    """`dvc ARGS` in `cwd`; its standard output, or "" with `capture=False` (the output goes to the terminal)."""
    return _run([sys.executable, "-m", "dvc", *args], " ".join(["dvc", *args]), cwd, capture=capture)


def git_show(rev: str, path: str, cwd: Path | str = ".") -> str:
    """The text of `path` (relative to the repository root) as committed at `rev`."""
    return run_git(["show", f"{rev}:{path}"], cwd)


def git_show_or_none(rev: str, path: str, cwd: Path | str = ".") -> str | None:
    """`git_show`, or None where `rev` holds no such file (or is no commit, or `cwd` is no git checkout)."""
    try:
        return git_show(rev, path, cwd)
    except CommandError as err:
        log.debug("%s", err)
        return None
