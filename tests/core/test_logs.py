"""Quiet logs: TensorFlow's and absl's start-up lines are hidden in stages and commands, ours and errors are not."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import shipped_params_text
from glomeruli.core.logs import forward_stderr

ROOT = Path(__file__).resolve().parents[2]
# what TensorFlow 2.21 prints at import and at the first epoch, copied from a run before quiet_startup existed
ABSL_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
ONEDNN_LINE = ("I0000 00:00:1796647612.420448   11103 port.cc:153] oneDNN custom operations are on. You may see "
               "slightly different numerical results due to floating-point round-off errors from different "
               "computation orders. To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.")
MEMORY_LINE = ("I0000 00:00:1796644363.559503   18372 generator_dataset_op.cc:213] Memory patch applied: "
               "M_TRIM_THRESHOLD=128 kb was set.")
STARTUP_MARKS = ("absl::InitializeLog", "port.cc", "oneDNN", "cpu_feature_guard", "Memory patch",
                 "Unable to initialize backend")


def clean_env(**extra: str) -> dict:
    """The environment of a user who set nothing: no TF_CPP_MIN_LOG_LEVEL (conftest sets one), no verbosity."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "GLOMERULI_VERBOSE", "GLOMERULI_LOG_LEVEL", "KERAS_BACKEND")}
    env.update(PYTHONPATH=str(ROOT / "src"), CUDA_VISIBLE_DEVICES="", **extra)
    return env


def filtered(data: bytes) -> bytes:
    read_in, write_in = os.pipe()
    read_out, write_out = os.pipe()
    worker = threading.Thread(target=forward_stderr, args=(read_in, write_out))
    worker.start()
    os.write(write_in, data)
    os.close(write_in)
    worker.join(timeout=10)
    os.close(write_out)
    with os.fdopen(read_out, "rb") as out:
        return out.read()


def test_the_filter_drops_absl_startup_lines_and_keeps_everything_else(monkeypatch):
    monkeypatch.setattr("signal.signal", lambda *args: None)  # only the main thread may set handlers
    ours = "12:54:18 INFO glomeruli.stage: stage train_frozen starting\n"
    error = "E0000 00:00:1796644363.559503   18372 cuda_driver.cc:1] failed call to cuInit: out of memory\n"
    traceback = "Traceback (most recent call last):\nValueError: boom\n"
    noisy = f"{ABSL_NOTICE}\n{ONEDNN_LINE}\n{ours}{MEMORY_LINE}\n{error}{traceback}Epoch 1/3 no newline"
    assert filtered(noisy.encode()) == f"{ours}{error}{traceback}Epoch 1/3 no newline".encode()


def test_quiet_startup_keeps_a_users_own_setting():
    code = "from glomeruli.core.logs import quiet_startup; quiet_startup(); import os; print(os.environ[{!r}])"
    for env, expected in ((clean_env(), "2"), (clean_env(TF_CPP_MIN_LOG_LEVEL="0"), "0")):
        result = subprocess.run([sys.executable, "-c", code.format("TF_CPP_MIN_LOG_LEVEL")], env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.stdout.strip() == expected, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_a_stage_shows_our_lines_and_errors_without_the_startup_lines(tmp_path, backend):
    """train_frozen in an empty project: Keras starts (TensorFlow's or JAX's start-up), our lines follow, and the
    stage fails on the missing data; the user sees ours and the failure, not the libraries'."""
    (tmp_path / "params.yaml").write_text(shipped_params_text())
    result = subprocess.run([sys.executable, str(ROOT / "stages/train_frozen.py")], cwd=tmp_path,
                            env=clean_env(KERAS_BACKEND=backend), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "stage train_frozen starting" in result.stderr
    assert f"on {backend} (cpu)" in result.stderr  # the backend's own line, after its start-up
    assert "augmented.h5" in result.stderr  # the error that stopped it
    assert [mark for mark in STARTUP_MARKS if mark in result.stderr] == [], result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", ["GLOMERULI_VERBOSE=1", "-v"])
def test_verbose_shows_everything_again(tmp_path, how):
    args, extra = (["-v"], {}) if how == "-v" else ([], {"GLOMERULI_VERBOSE": "1"})
    command = [sys.executable, "-m", "glomeruli.commands.cli", *args, "doctor"]
    result = subprocess.run(command, cwd=tmp_path, env=clean_env(**extra), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "keras backend" in result.stdout
    assert ABSL_NOTICE in result.stderr and "oneDNN" in result.stderr


@pytest.mark.slow
def test_doctor_is_quiet_by_default(tmp_path):
    command = [sys.executable, "-m", "glomeruli.commands.cli", "doctor"]
    result = subprocess.run(command, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "keras backend" in result.stdout
    assert [mark for mark in STARTUP_MARKS if mark in result.stderr] == [], result.stderr


def test_the_filter_needs_nothing_but_the_standard_library():
    """The filter runs as `python -I -S`: it must start without site-packages or PYTHONPATH."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'src')!r}); from glomeruli.core.logs import forward_stderr;"
            " forward_stderr()")
    result = subprocess.run([sys.executable, "-I", "-S", "-c", code], input=f"{ABSL_NOTICE}\nours\n", capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "ours\n", "")
