"""The training path on both Keras backends; JAX runs with TensorFlow made unimportable, as on our GPU boxes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxrun import NO_TENSORFLOW, jax_env, pytest_under_jax

ROOT = Path(__file__).resolve().parents[2]


def test_tensorflow_is_imported_only_by_the_backend_adapter():
    offenders = []
    for path in sorted((ROOT / "src" / "glomeruli").rglob("*.py")) + sorted((ROOT / "stages").glob("*.py")):
        text = path.read_text()
        if re.search(r"^\s*(import tensorflow|from tensorflow)", text, re.M) and path.name != "backend.py":
            offenders.append(path.name)
        if "dvclive.keras" in text:
            offenders.append(f"{path.name} (dvclive.keras imports TensorFlow)")
    assert offenders == []


# Tests of those modules whose checks do not depend on the backend (input order, hashing, which files predict reads
# and the pixels it feeds, refusals before a model runs): the TensorFlow run covers them.
BACKEND_INDEPENDENT = ("batches_reshuffle", "sample_weights", "resume_key", "arbitrary_code", "corrupt_or_missing",
                       "offline_imagenet", "refuses", "over_its_cap", "without_recursive", "bad_files", "pads_with",
                       "cli_writes")


@pytest.mark.slow
def test_training_path_under_jax_without_tensorflow(tmp_path):
    """Training, the model and prediction on JAX. The learning tests and the top-block twin of the never-beats
    test run on TensorFlow only, for time."""
    skipped = " and ".join(f"not {name}" for name in BACKEND_INDEPENDENT)
    result = pytest_under_jax(tmp_path, "tests/model/test_training.py", "tests/model/test_efficientnet.py", "tests/commands/test_predict.py",
                              "-k", f"not learns and not (never_beats and top) and {skipped}")
    assert " passed" in result.stdout and "failed" not in result.stdout
    probe = subprocess.run([sys.executable, "-c", "import keras, glomeruli.model.training, glomeruli.model.efficientnet, sys; "
                            "print(keras.backend.backend(), 'tensorflow' in sys.modules)"],
                           cwd=ROOT, env=jax_env(tmp_path), capture_output=True, text=True)
    assert probe.stdout.split() == ["jax", "False"], probe.stderr[-2000:]


_DETERMINISM_PROBE = """
import os
from glomeruli.model.backend import configure
from tensorflow.python.framework import config as tf_config
for setting in ("false", "auto", "false"):
    configure(0, "float32", setting if setting == "auto" else setting == "true")
    print(setting, tf_config.is_op_determinism_enabled())
"""


@pytest.mark.slow
def test_op_determinism_follows_the_param_on_tensorflow():
    """auto turns TensorFlow op determinism on for a CPU run; false leaves it off (and turns it off again)."""
    env = dict(os.environ, KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", _DETERMINISM_PROBE], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:3] == ["false False", "auto True", "false False"], result.stdout


@pytest.mark.slow
def test_deterministic_true_on_jax_sets_the_xla_flag_before_jax_starts(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(NO_TENSORFLOW)  # as on our JAX boxes (and faster to start)
    probe = ("import os; from glomeruli.model.backend import configure; configure(0, 'float32', True); import jax; "
             "print(jax.default_backend(), os.environ['XLA_FLAGS'])")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT / 'src'}")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["cpu", "--xla_gpu_deterministic_ops=true"], result.stdout
