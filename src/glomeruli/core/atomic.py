"""Atomic outputs: write to a temporary sibling, rename into place only when complete.

Every stage writes its outputs through `atomic_path` (or `write_json`), so a stage killed half-way leaves the
previous output or none, never a truncated file that DVC would cache or a later stage would read.
An output never destroys what it was not meant to replace: a file output refuses a folder (or a symlink
to one) at its path, and a symlink at an output's path is replaced itself, never written through (so a
link into DVC's cache, or to a file outside the project, keeps its target). A folder output replaces the
folder at its path (the stage's own previous output).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from glomeruli.core.errors import UserError


class OutputWriteError(UserError, OSError):
    """Writing an output failed (e.g. disk full); nothing half-written was left behind."""


class OutputPathError(UserError, ValueError):
    """Something that the output must not replace stands at its path (a folder where a file goes)."""


_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Libraries do not always keep the errno (HDF5 reports it inside the message, others re-raise other types).
_NO_SPACE_TEXT = re.compile("|".join([re.escape(os.strerror(e)) for e in _NO_SPACE_ERRNOS]
                                    + [rf"errno = {e}\b" for e in _NO_SPACE_ERRNOS]))


def is_out_of_space(err: BaseException | None) -> bool:
    """True when `err`, or an error it was raised from, says the disk (or a quota or file size limit) is full."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if getattr(err, "errno", None) in _NO_SPACE_ERRNOS or _NO_SPACE_TEXT.search(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


def _tmp_sibling(path: Path) -> Path:
    # Keep the suffix: Keras insists on `.keras`, h5py and readers look at it too.
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def check_file_output(path: Path | str) -> None:
    """Refuse, before any work, to write a file where a folder (or a symlink to one) stands."""
    path = Path(path)
    if path.is_dir():  # follows a symlink: a link to a folder is refused too
        what = "a symlink to a folder" if path.is_symlink() else "a folder"
        raise OutputPathError(f"{path} is {what}, and this output is a file that would replace it: give a file "
                              "path instead (one inside it, or another name); nothing was written")


def _check_folder_output(path: Path) -> None:
    if path.exists() and not path.is_dir() and not path.is_symlink():
        raise OutputPathError(f"{path} is a file; a folder output would replace it: move or delete it yourself")


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on failure delete it.

    Works for files and folders (whichever the caller makes at the temporary path). A killed process
    leaves only a dot-named `.tmp-<pid>` sibling, which the next run of the same output removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException as err:
        _remove(tmp)
        if isinstance(err, Exception) and not isinstance(err, OutputWriteError) and is_out_of_space(err):
            code = err.errno if getattr(err, "errno", None) in _NO_SPACE_ERRNOS else errno.ENOSPC
            raise OutputWriteError(code, f"no space left while writing {path} (disk, quota or file size limit "
                                   "full): free disk space (or move the DVC cache) and rerun `dvc repro`; "
                                   "nothing was written") from err
        raise


def _replace(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`. rename(2) replaces a symlink at `path` itself, never its target."""
    if tmp.is_dir() and not tmp.is_symlink():
        _check_folder_output(path)
        if path.is_symlink():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    else:
        check_file_output(path)
    os.replace(tmp, path)


def remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries a killed earlier run left beside `path` (only names `_tmp_sibling` makes)."""
    ours = re.compile(rf"\.{re.escape(path.stem)}\.tmp-\d+{re.escape(path.suffix)}")
    for stale in path.parent.glob(f".{glob.escape(path.stem)}.tmp-*{glob.escape(path.suffix)}"):
        if ours.fullmatch(stale.name):
            _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_json(path: Path | str, data: Any) -> None:
    """Write JSON atomically with a stable layout (sorted keys would reorder metrics, so keep insertion order)."""
    check_file_output(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_text(path: Path | str, text: str) -> None:
    check_file_output(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
