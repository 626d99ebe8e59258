"""Ordered, memory-bounded parallel map over a process pool: the pool of the data stages.

Ingest, preprocess and augment decode and write images through `ordered_map`: results come back in input
order, at most about a block of them in memory, and the output does not depend on the worker count (so the
stores are byte-identical whatever `runtime.workers` is). Workers come from a fork server, image results
come back through shared memory, and a worker that dies raises `WorkerDied` (a UserError naming the likely
cause) instead of hanging. Prediction keeps its own small pool (`commands.predict._decoded_batches`): it decodes whole
batches ahead of the model, at lower priority, and hands unreadable files back as skips.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from glomeruli.core.errors import UserError

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


def process_context(preload: list[str]) -> mp.context.BaseContext:
    """Worker processes started by a fork server that has imported `preload` once.

    Not plain fork: a forked child whose parent had already run OpenCV's thread pool deadlocks in
    cv2.setNumThreads (seen with OpenCV 4.14), and a forked child maps everything its parent holds, so
    its resident memory would grow with the dataset the parent describes.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(preload)  # import OpenCV, h5py... once, not in every worker
    return context


class WorkerDied(UserError):
    """A worker process died (out of memory, or killed) before finishing its work."""


_slots: np.ndarray | None = None  # in a worker: the shared result slots of the running ordered_map


def _init_worker(slots: tuple[str, tuple[int, ...], str] | None, initializer: Callable[..., Any] | None,
                 initargs: tuple) -> None:
    global _slots
    if slots is not None:
        name, shape, dtype = slots
        memory = shared_memory.SharedMemory(name=name)
        _slots = np.ndarray(shape, dtype, buffer=memory.buf)
        _init_worker.memory = memory  # keep the mapping alive as long as the worker
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

    Output never depends on the worker count, and memory does not grow with len(items): workers come
    from a fork server, so they share nothing with this process but what they are sent. Work goes out
    in small chunks through a sliding window, so no worker waits at a block boundary. When every result
    is an array of `result_shape` and `result_dtype` (images), workers hand results over in shared
    memory instead of pickling them through a pipe, which on a busy machine stalls a worker until the
    parent gets a core. `fn` and `initializer` must be module-level functions; a worker that dies
    raises WorkerDied.
    """
    workers = resolve_workers(workers)
    if workers == 1:
        if initializer:
            initializer(*initargs)
        yield from map(fn, items)
        return
    chunk = max(1, block // (workers * 4))
    window = max(2 * workers, block // chunk)  # chunks in flight, or done and not yet consumed
    memory = slots = None
    if result_shape is not None:
        # Chunk k writes slots (k % window) * chunk ...; chunk k + window is only submitted once chunk
        # k has been consumed, so a slot is never overwritten before its result was copied out.
        shape, dtype = (window * chunk, *result_shape), np.dtype(result_dtype)
        memory = shared_memory.SharedMemory(create=True, size=max(1, math.prod(shape) * dtype.itemsize))
        slots = np.ndarray(shape, dtype, buffer=memory.buf)
    context = process_context([fn.__module__])
    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(None if memory is None else (memory.name, shape, dtype.str),
                                           initializer, initargs)) as pool:
            pending: deque = deque()
            for k, start in enumerate(range(0, len(items), chunk)):
                first_slot = None if slots is None else (k % window) * chunk
                pending.append((first_slot, pool.submit(_apply_chunk, fn, items[start:start + chunk], first_slot)))
                if len(pending) >= window:
                    yield from _collect(*pending.popleft(), slots)
            while pending:
                yield from _collect(*pending.popleft(), slots)
    except BrokenProcessPool as err:
        raise WorkerDied(f"a worker process died ({err}): most often out of memory, or the calling script cannot be "
                         "re-imported by a new process (code piped to stdin); lower runtime.workers, or set it to 1 "
                         "to do the work in this process") from err
    finally:
        if memory is not None:
            del slots
            with contextlib.suppress(BufferError):  # a view still alive: the mapping goes with the process
                memory.close()
            memory.unlink()


def _collect(first_slot: int | None, result: Future, slots: np.ndarray | None) -> Iterator:
    done = result.result()
    if slots is None:
        yield from done
    else:
        for j in range(done):
            yield slots[first_slot + j].copy()
