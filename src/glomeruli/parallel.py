"""Ordered, memory-bounded parallel map over a process pool."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def resolve_workers(workers: int) -> int:
    """`workers: 0` means every core this process may use."""
    if workers > 0:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ordered_map(fn: Callable[[T], R], items: Sequence[T], workers: int, *, block: int = 64,
                initializer: Callable[..., Any] | None = None, initargs: tuple = ()) -> Iterator[R]:
    """Yield fn(item) in input order; at most `block` results wait in memory at a time.

    Output never depends on the worker count, and memory does not grow with len(items).
    """
    workers = resolve_workers(workers)
    if workers == 1:
        if initializer:
            initializer(*initargs)
        yield from map(fn, items)
        return
    # fork shares the parent's imported modules at no cost; it is the Linux default anyway.
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    chunk = max(1, block // (workers * 4))
    with ctx.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        for start in range(0, len(items), block):
            yield from pool.imap(fn, items[start:start + block], chunksize=chunk)


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
