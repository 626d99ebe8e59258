"""parallel.ordered_map: order, worker-count independence, shared-memory hand-over, dying workers."""

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from glomeruli.core.parallel import WorkerDied, ordered_map

_state: dict = {}


def _init(offset: int) -> None:
    _state["offset"] = offset


def _square_plus_offset(x: int) -> int:
    return x * x + _state.get("offset", 0)


def _image(x: int) -> np.ndarray:
    return np.full((3, 4), x % 251, np.uint8)


def _wrong_shape(x: int) -> np.ndarray:
    return np.zeros((2, 2), np.uint8)


def _die_at_seven(x: int) -> int:
    if x == 7:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def _fail_at_three(x: int) -> int:
    if x == 3:
        raise ValueError("item 3 is bad")
    return x


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_results_in_input_order_whatever_the_worker_count(workers):
    out = list(ordered_map(_square_plus_offset, range(200), workers, block=16, initializer=_init, initargs=(5,)))
    assert out == [x * x + 5 for x in range(200)]


def test_array_results_come_back_through_shared_memory_in_order():
    out = list(ordered_map(_image, list(range(300)), 2, block=8, result_shape=(3, 4), result_dtype=np.uint8))
    assert len(out) == 300
    assert all(a.shape == (3, 4) and a[0, 0] == x % 251 for x, a in enumerate(out))
    assert len({id(a) for a in out}) == 300  # copies, not views of reused slots


def _shared_memory_entries() -> set[Path]:
    """/dev/shm, less other processes' loky semaphores (the other xdist worker's joblib pool may come and go)."""
    ours = f"sem.loky-{os.getpid()}-"
    return {p for p in Path("/dev/shm").glob("*") if not p.name.startswith("sem.loky-") or p.name.startswith(ours)}


def test_shared_memory_is_released():
    before = _shared_memory_entries()
    list(ordered_map(_image, range(50), 2, block=8, result_shape=(3, 4), result_dtype=np.uint8))
    assert _shared_memory_entries() <= before


def test_a_result_of_the_wrong_shape_is_an_error():
    with pytest.raises(ValueError, match=r"result of shape \(2, 2\)"):
        list(ordered_map(_wrong_shape, range(10), 2, result_shape=(3, 4), result_dtype=np.uint8))


def test_an_error_in_a_worker_reaches_the_caller():
    with pytest.raises(ValueError, match="item 3 is bad"):
        list(ordered_map(_fail_at_three, range(10), 2))


def test_a_worker_that_dies_stops_the_map_instead_of_hanging():
    with pytest.raises(WorkerDied, match="runtime.workers"):
        list(ordered_map(_die_at_seven, range(50), 2, block=8))
