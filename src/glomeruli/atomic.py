"""Atomic outputs: write to a temporary sibling, rename into place only when complete."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from glomeruli.errors import UserError


class OutputWriteError(UserError, OSError):
    """Writing an output failed (e.g. disk full); nothing half-written was left behind."""


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


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on failure delete it.

    Works for files and folders. A killed process leaves only a dot-named `.tmp-<pid>` sibling,
    which the next run of the same output removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as err:
        _remove(tmp)
        if isinstance(err, Exception) and not isinstance(err, OutputWriteError) and is_out_of_space(err):
            code = err.errno if getattr(err, "errno", None) in _NO_SPACE_ERRNOS else errno.ENOSPC
            raise OutputWriteError(code, f"no space left while writing {path} (disk, quota or file size limit "
                                   "full): free disk space (or move the DVC cache) and rerun `dvc repro`; "
                                   "nothing was written") from err
        raise


def remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries a killed earlier run left beside `path`."""
    for stale in path.parent.glob(f".{path.stem}.tmp-*{path.suffix}"):
        _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_json(path: Path | str, data: Any) -> None:
    """Write JSON atomically with a stable layout (sorted keys would reorder metrics, so keep insertion order)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
