"""Data parallelism (glomeruli.model.distribute): 2 devices train to the same weights as 1, on both backends.

The CPU is split into virtual devices (JAX: XLA_FLAGS; TensorFlow: logical CPU devices), which must
happen before the backend starts, so every run is a fresh interpreter (tests/distributed_job.py).
The backbone there is a tiny stand-in named like EfficientNetB3: the package's freezing, splitting,
caching, padding and sharding run on it unchanged.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from glomeruli.model.distribute import DistributeError, Engine, check_batch_size, nearest_valid_sizes

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "tests" / "distributed_job.py"
BATCH = 8          # the tiny split's train set leaves a short last batch of odd size: padding is exercised
PREDICT_BATCH = 7  # odd: the prediction batch is padded to a multiple of the device count
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def test_engine_shares_and_pads_every_batch():
    two_hosts = [Engine("jax", 4, p, 2) for p in range(2)]
    shares = [e.share(13) for e in two_hosts]  # 13 rows -> 16 (multiple of 4): 8 per process, 3 padded on the last
    assert shares == [(slice(0, 8), 0), (slice(8, 13), 3)]
    assert Engine("jax", 2).share(7, 8) == (slice(0, 7), 1)
    assert Engine().share(5) == (slice(0, 5), 0)


def test_each_process_reads_its_share_padded_with_zero_rows():
    rows = np.arange(1, 14, dtype=np.float32)[:, None] * 10  # a global batch of 13 rows, read by index
    first, last = (Engine("jax", 4, p, 2).read_share(lambda i: rows[i], np.arange(13)) for p in range(2))
    np.testing.assert_array_equal(first, rows[:8])
    np.testing.assert_array_equal(last, np.concatenate([rows[8:], np.zeros((3, 1), np.float32)]))
    # a process whose share is all padding still gets rows of the right shape (3 rows padded to 8: 4 per process)
    empty = Engine("jax", 8, 1, 2).read_share(lambda i: rows[i], np.arange(3))
    assert empty.shape == (4, 1) and empty.dtype == np.float32 and not empty.any()
    # one device: the batch as it is, or padded up to a given size
    np.testing.assert_array_equal(Engine().read_share(lambda i: rows[i], np.arange(5)), rows[:5])
    assert Engine().read_share(lambda i: rows[i], np.arange(5), 8).shape == (8, 1)


def test_batch_size_that_does_not_divide_is_refused_naming_key_and_sizes():
    assert nearest_valid_sizes(30, 4) == [28, 32] and nearest_valid_sizes(3, 4) == [4]
    check_batch_size("finetune.batch_size", 32, Engine("jax", 4))
    with pytest.raises(DistributeError, match=r"`finetune.batch_size` = 30 .* 4 devices .*use 28 or 32"):
        check_batch_size("finetune.batch_size", 30, Engine("jax", 4))


def test_launchers_that_ask_for_several_processes(monkeypatch):
    from glomeruli.model.distribute import KERAS_MULTIPROCESS_VARS, _multiprocess_requested

    for name in (*KERAS_MULTIPROCESS_VARS, "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    assert _multiprocess_requested() is None
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "2")  # the batch script of a 2-task job: runs once, no job to join
    assert _multiprocess_requested() is None
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")  # inside `srun`: one of 2 tasks
    assert _multiprocess_requested() == "slurm"
    for name, value in zip(KERAS_MULTIPROCESS_VARS, ("10.0.0.1:1234", "2", "1")):
        monkeypatch.setenv(name, value)
    assert _multiprocess_requested() == "keras"


def test_more_devices_than_the_machine_has_is_refused():
    from glomeruli.model.distribute import current, start

    with pytest.raises(DistributeError, match=r"`runtime.devices` = 64 but this machine has 1 "):
        start(64)
    assert not current().distributed


def test_several_processes_on_tensorflow_stop_with_one_line(monkeypatch):
    import keras

    from glomeruli.model.distribute import start

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the TensorFlow engine's refusal")
    monkeypatch.setenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", "127.0.0.1:1")
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "2")
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "0")
    with pytest.raises(DistributeError, match="supported on JAX only"):
        start("auto")


@pytest.fixture(scope="module")
def job_inputs(tiny_data, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("distribute")
    split_path = folder / "split.json"
    split_path.write_text(json.dumps(tiny_data.split.to_json()))
    assert len(tiny_data.split.train) % BATCH % 2 == 1, "the test needs a short, odd last training batch"
    return {"image_size": 32, "memory_gb": 1.0, "batch_size": BATCH, "predict_batch": PREDICT_BATCH,
            "store": str(tiny_data.augmented), "split": str(split_path), "folder": folder}


def _run_job(inputs: dict, name: str, env: dict | None = None, **cfg) -> subprocess.Popen:
    config = {k: v for k, v in inputs.items() if k != "folder"} | cfg | {"out": str(inputs["folder"] / name)}
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    return subprocess.Popen([sys.executable, str(JOB), json.dumps(config)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(*jobs: subprocess.Popen) -> None:
    for job in jobs:
        output, _ = job.communicate(timeout=600)
        assert job.returncode == 0, output[-6000:]


def _load(inputs: dict, name: str, devices, process: int = 0) -> dict:
    with np.load(inputs["folder"] / name / f"results-{devices}-{process}.npz") as f:
        return {k: f[k] for k in f.files}


def _assert_same_training(one: dict, many: dict,
                          runs=("frozen_cached", "frozen_full", "finetune_cached", "finetune_full")) -> None:
    keys = [k for k in one if k.startswith(tuple(f"{run}_" for run in runs))]
    for run in runs:
        assert any(k.startswith(run) for k in keys), run
    for key in [*keys, "predict_rows", "predict_batch"]:
        np.testing.assert_allclose(many[key], one[key], **TOLERANCE, err_msg=key)
    assert one["predict_rows"].shape == (len(one["predict_rows"]), 1) and one["predict_batch"].shape == (3, 1)
    assert np.ptp(one["predict_rows"]) > 0.01, "predictions are saturated: the comparison would say nothing"


def _bn_by_hand(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Moving statistics after one step at momentum 0.5 from (mean 0, variance 1): batch mean and
    (biased) variance of `x`."""
    return 0.5 * x.mean(axis=0), 0.5 + 0.5 * x.var(axis=0)


@pytest.fixture(scope="module")
def jax_runs(job_inputs) -> tuple[dict, dict]:
    """(1 device, 2 devices) on JAX, in one process with 2 virtual CPU devices."""
    _finish(_run_job(job_inputs, "jax", backend="jax", local_devices=2, devices=[1, 2], dropout=0.3))
    return _load(job_inputs, "jax", 1), _load(job_inputs, "jax", 2)


@pytest.mark.slow
def test_jax_two_devices_train_and_predict_like_one(jax_runs):
    """Both phases, cached and full graph, dropout on (JAX draws the same masks however the batch is split)."""
    one, two = jax_runs
    assert (int(one["n_devices"]), int(two["n_devices"])) == (1, 2)
    _assert_same_training(one, two)
    # BatchNormalization that trains: JAX normalises over the global batch, as one device does.
    mean, var = _bn_by_hand(two["bn_x"])
    np.testing.assert_allclose(two["bn_moving_mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two["bn_moving_var"], var, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one["bn_moving_var"], var, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_tensorflow_two_devices_train_and_predict_like_one(job_inputs):
    """MirroredStrategy over 2 logical CPUs. Dropout 0: each replica draws its own masks on TensorFlow."""
    _finish(_run_job(job_inputs, "tf", backend="tensorflow", local_devices=2, devices=[1, 2], dropout=0.0))
    one, two = _load(job_inputs, "tf", 1), _load(job_inputs, "tf", 2)
    assert (int(one["n_devices"]), int(two["n_devices"])) == (1, 2)
    _assert_same_training(one, two)
    # BatchNormalization that trains: each replica normalises with its own half of the batch, and the
    # moving statistics keep the first replica's update only (not synchronised, not the global batch).
    x = two["bn_x"]
    mean, var = _bn_by_hand(x[:4])
    np.testing.assert_allclose(two["bn_moving_mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two["bn_moving_var"], var, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one["bn_moving_var"], _bn_by_hand(x)[1], rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_jax_processes_train_like_one(job_inputs, jax_runs):
    """Two processes, one CPU device each, local coordinator (Keras' variables, as a launcher sets them);
    memory budget 0: each process streams only its share of every batch from the HDF5 store (and spills
    the activation cache to HDF5). Both phases on their caches, the stages' default."""
    port = _free_port()
    jobs = [_run_job(job_inputs, "two-processes", backend="jax", local_devices=1, devices=["auto"], dropout=0.3,
                     memory_gb=0.0, caches=[True], env={"KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{port}",
                                         "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
                                         "KERAS_DISTRIBUTION_PROCESS_ID": str(p)})
            for p in range(2)]
    _finish(*jobs)
    one = jax_runs[0]
    processes = [_load(job_inputs, "two-processes", "auto", p) for p in range(2)]
    for result in processes:
        assert int(result["n_devices"]) == 2
        _assert_same_training(one, result, runs=("frozen_cached", "finetune_cached"))
    for key in processes[0]:  # every process holds the same result
        np.testing.assert_array_equal(processes[0][key], processes[1][key], err_msg=key)
