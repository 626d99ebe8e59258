"""Ordered, memory-bounded parallel map over a process pool."""

from __future__ import annotations

import math
import mmap
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

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


_slots: np.ndarray | None = None  # in a worker: the shared result slots of the running ordered_map


def _init_worker(slots: np.ndarray | None, initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    global _slots
    _slots = slots
    if initializer:
        initializer(*initargs)


def _apply_chunk(fn: Callable[[T], R], chunk: Sequence[T], first_slot: int | None) -> list[R] | int:
    if first_slot is None:
        return [fn(item) for item in chunk]
    for j, item in enumerate(chunk):
        result = np.asarray(fn(item))
        if result.shape != _slots.shape[1:] or result.dtype != _slots.dtype:
            raise ValueError(f"ordered_map: result of shape {result.shape} {result.dtype}, expected "
                             f"{_slots.shape[1:]} {_slots.dtype}")
        _slots[first_slot + j] = result
    return len(chunk)


def ordered_map(fn: Callable[[T], R], items: Sequence[T], workers: int, *, block: int = 64,
                initializer: Callable[..., Any] | None = None, initargs: tuple = (),
                result_shape: tuple[int, ...] | None = None, result_dtype: Any = None) -> Iterator[R]:
    """Yield fn(item) in input order; at most about `block` results wait in memory at a time.

    Output never depends on the worker count, and memory does not grow with len(items). Work goes
    out in small chunks through a sliding window, so no worker waits at a block boundary. When every
    result is an array of `result_shape` and `result_dtype` (images), workers hand results over in
    shared memory instead of pickling them through a pipe, which on a busy machine stalls a worker
    until the parent gets a core.
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
    window = max(2 * workers, block // chunk)  # chunks in flight, or done and not yet consumed
    slots = None
    if result_shape is not None and ctx.get_start_method() == "fork":
        # Chunk k writes slots (k % window) * chunk ...; chunk k + window is only submitted once chunk
        # k has been consumed, so a slot is never overwritten before its result was copied out.
        dtype = np.dtype(result_dtype)
        shared = mmap.mmap(-1, max(1, window * chunk * math.prod(result_shape) * dtype.itemsize))
        slots = np.frombuffer(shared, dtype).reshape(window * chunk, *result_shape)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(slots, initializer, initargs)) as pool:
        pending: deque = deque()
        for k, start in enumerate(range(0, len(items), chunk)):
            first_slot = None if slots is None else (k % window) * chunk
            pending.append((first_slot, pool.apply_async(_apply_chunk, (fn, items[start:start + chunk], first_slot))))
            if len(pending) >= window:
                yield from _collect(*pending.popleft(), slots)
        while pending:
            yield from _collect(*pending.popleft(), slots)


def _collect(first_slot: int | None, result, slots: np.ndarray | None) -> Iterator:
    done = result.get()
    if slots is None:
        yield from done
    else:
        for j in range(done):
            yield slots[first_slot + j].copy()


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
