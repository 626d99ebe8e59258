"""Logging set-up and progress reporting shared by stages and commands."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


def setup_logging(level: str | None = None) -> None:
    level = level or os.environ.get("GLOMERULI_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)


def progress(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """A tqdm bar on a terminal; in logs (DVC, CI) a line roughly every 10 %."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=description, unit="img", dynamic_ncols=True)
        return
    step = max(1, total // 10)
    for i, item in enumerate(items, 1):
        yield item
        if i % step == 0 or i == total:
            log.info("%s: %d/%d", description, i, total)
