"""The training path on both Keras backends; JAX runs with TensorFlow made unimportable, as on our GPU boxes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NO_TENSORFLOW = """
import sys


class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ModuleNotFoundError(f"No module named {name!r}")


sys.meta_path.insert(0, NoTensorFlow())
"""


def test_tensorflow_is_imported_only_by_the_backend_adapter():
    offenders = []
    for path in sorted((ROOT / "src" / "glomeruli").glob("*.py")) + sorted((ROOT / "stages").glob("*.py")):
        text = path.read_text()
        if re.search(r"^\s*(import tensorflow|from tensorflow)", text, re.M) and path.name != "backend.py":
            offenders.append(path.name)
        if "dvclive.keras" in text:
            offenders.append(f"{path.name} (dvclive.keras imports TensorFlow)")
    assert offenders == []


@pytest.mark.slow
def test_training_path_under_jax_without_tensorflow(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(NO_TENSORFLOW)
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT / 'src'}",
               JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_training.py", "tests/test_model.py",
         "tests/test_predict.py", "-k", "not learns", "-W", "ignore::DeprecationWarning"],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
    probe = subprocess.run([sys.executable, "-c", "import keras, glomeruli.training, glomeruli.model, sys; "
                            "print(keras.backend.backend(), 'tensorflow' in sys.modules)"],
                           cwd=ROOT, env=env, capture_output=True, text=True)
    assert probe.stdout.split() == ["jax", "False"], probe.stderr[-2000:]
