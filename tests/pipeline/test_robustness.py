"""Issue 4: never crash on bad input, never lose or corrupt data, resume where it stopped.

The slow tests drive the real `dvc repro`: the kill test reruns the shared tiny pipeline from scratch
(`conftest.pipeline_pristine`: 120 images at 64 px, no pretrained weights, 3 + 2 epochs) and compares it with
`pipeline_repo`, its uninterrupted run; the full-disk and small-split tests use 60 images at 32 px.

* kill-and-rerun: `dvc repro` is SIGKILLed (its whole process group) at 10 points spread over all seven
  stages, each detected by polling the file system or the run's log, never by sleeping a fixed time; a
  plain `dvc repro` then continues. The final outputs must equal those of an uninterrupted run byte for
  byte (models: weight for weight, as `.keras` files embed their save date), no temporary file may remain,
  and killed training stages must resume from their last completed epoch.
* reproducibility, inside the kill test: every output of the killed project was computed by other processes, in
  another folder, than the uninterrupted run's, so its byte-for-byte equality (metrics and plots included) is
  reproducibility; a `dvc repro --force` of the reference, which would run every stage a third time, adds nothing.
* a disk that fills up (RLIMIT_FSIZE, which makes writes fail with EFBIG) stops a stage with one clear
  line and leaves nothing half-written.

Test instrumentation only: in the kill runs a `sitecustomize` slows the package's writers down a little
(each atomic output waits 0.3 s before its rename, each progress loop takes 1 s longer), so that the kill
windows of a tiny project are wide enough to hit by polling. It changes no output.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

import project
from conftest import shipped_params_raw, shipped_params_text
from glomeruli.core.atomic import OutputWriteError, atomic_path, is_out_of_space
from glomeruli.core.params import ParamsError, parse_params, read_yaml

ROOT = Path(__file__).resolve().parents[2]
FROZEN_EPOCHS, FINETUNE_EPOCHS = project.TINY_PIPELINE["train_frozen__epochs"], project.TINY_PIPELINE["finetune__epochs"]
SLOW_S, SLOW_LOOP_S = 0.3, 1.0
# Outputs compared byte for byte between runs: everything but the two .keras models, the metadata that holds their
# hash, and the ONNX export (it carries that hash, and tf2onnx's bytes differ between two exports of one file; its
# parity with the Keras model is tests/model/test_export.py's).
NOT_BYTE_COMPARED = ("models/frozen.keras", "models/model.keras", "models/model.meta.json", "models/export/model.onnx")
MODEL_CARD = "models/MODEL_CARD.md"  # compared with the model's hash masked (output_files)

SLOW_WRITERS = """
import os

if os.environ.get("GLOMERULI_TEST_SLOW"):
    import contextlib
    import time

    import glomeruli.core.atomic
    import glomeruli.core.logs

    _delay, _loop = (float(v) for v in os.environ["GLOMERULI_TEST_SLOW"].split(","))
    _atomic_path, _progress = glomeruli.core.atomic.atomic_path, glomeruli.core.logs.progress

    @contextlib.contextmanager
    def _slow_atomic_path(path):
        with _atomic_path(path) as tmp:
            yield tmp
            time.sleep(_delay)  # written in full under its temporary name, not renamed yet

    def _slow_progress(items, total, description):
        for item in _progress(items, total, description):
            time.sleep(_loop / max(1, total))
            yield item

    glomeruli.core.atomic.atomic_path, glomeruli.core.logs.progress = _slow_atomic_path, _slow_progress
"""


# ------------------------------------------------------------------------------------------- helpers

def _env(repo: Path, **extra: str) -> dict:
    return project.project_env(repo, **{"GLOMERULI_LOG_LEVEL": "INFO", **extra})


def run(repo: Path, *args: str, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    return project.run(repo, *args, check=check, **{"GLOMERULI_LOG_LEVEL": "INFO", **extra_env})


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(repo, sys.executable, "-m", "dvc", *args, check=check)


def make_project(folder: Path, *, n_images: int = 60, commit: bool = True, **settings) -> Path:
    """A git + DVC project with this pipeline, tiny data settings and synthetic data (nothing run yet), for the
    tests that stop at the data stages."""
    tiny = dict(preprocess__image_size=32, model__weights="none", split__val_fraction=0.2, split__folds=5,
                split__group_by="image", runtime__workers=1, runtime__memory_budget_gb=1)
    return project.make_project(folder, shipped_params_raw(), n_images=n_images, seed=1, commit=commit,
                                **{**tiny, **settings})


def declared_outputs(repo: Path) -> list[str]:
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    return [out if isinstance(out, str) else next(iter(out)) for stage in pipeline["stages"].values()
            for out in stage["outs"]]


def output_files(repo: Path) -> dict[str, bytes]:
    """Every file of every declared output (folders walked), by path relative to the project; the model card with
    the model's sha256 masked (the .keras file's bytes differ between runs, its weights do not)."""
    files = {}
    for out in declared_outputs(repo):
        path = repo / out
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                files[file.relative_to(repo).as_posix()] = file.read_bytes()
    model = repo / "models" / "model.keras"
    if MODEL_CARD in files and model.is_file():
        model_sha = hashlib.sha256(model.read_bytes()).hexdigest().encode()
        files[MODEL_CARD] = files[MODEL_CARD].replace(model_sha, b"<model sha256>")
    return files


def project_files(repo: Path) -> set[str]:
    """Every file of the project outside git's and DVC's own folders."""
    return {p.relative_to(repo).as_posix() for p in repo.rglob("*")
            if p.is_file() and p.relative_to(repo).parts[0] not in (".git", ".dvc") and "__pycache__" not in p.parts}


def leftovers(repo: Path) -> list[str]:
    """Temporaries and resume state anywhere in the project except DVC's own .dvc/tmp."""
    found = []
    for path in repo.rglob("*"):
        rel = path.relative_to(repo).as_posix()
        if rel.startswith((".git/", ".dvc/tmp/")):
            continue
        if re.search(r"\.tmp-\d+", path.name) or rel.startswith(".glomeruli-tmp"):
            found.append(rel)
    return sorted(found)


def keras_weights(path: Path) -> dict[str, np.ndarray]:
    """Every array saved in a `.keras` file, by its path in the weights file (no Keras needed to read them)."""
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as h5:
        h5.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def same_weights(model_a: Path, model_b: Path) -> bool:
    a, b = keras_weights(model_a), keras_weights(model_b)
    return len(a) > 0 and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------- params refused up front

def shipped() -> dict:
    return shipped_params_raw()


@pytest.mark.parametrize("changes, key", [
    ({("split", "val_fraction"): 0.0}, "split.val_fraction"),
    ({("split", "val_fraction"): -0.1}, "split.val_fraction"),
    ({("split", "folds"): 1}, "split.folds"),
    ({("split", "fold"): 5}, "split.fold"),
    ({("split", "val_fraction"): 0.5, ("split", "folds"): 2}, "split.val_fraction"),
    ({("split", "val_fraction"): 0.85}, "split.val_fraction"),
    ({("preprocess", "image_size"): 31}, "preprocess.image_size"),
    ({("train_frozen", "epochs"): 0}, "train_frozen.epochs"),
    ({("finetune", "epochs"): -2}, "finetune.epochs"),
    ({("finetune", "unfreeze_blocks"): 0}, "finetune.unfreeze_blocks"),
    ({("finetune", "unfreeze_blocks"): 12}, "finetune.unfreeze_blocks"),
    ({("model", "weights"): "weights/does-not-exist.weights.h5"}, "model.weights"),
])
def test_more_bad_values_are_refused_naming_the_key(changes, key):
    raw = shipped()
    for (section, name), value in changes.items():
        raw[section][name] = value
    with pytest.raises(ParamsError, match=re.escape(f"`{key}`")):
        parse_params(raw)


def test_a_bad_value_stops_the_stage_with_one_line(tmp_path):
    raw = shipped()
    raw["split"].update(val_fraction=0.5, folds=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    result = run(tmp_path, sys.executable, str(ROOT / "stages" / "split.py"), check=False, PYTHONPATH=str(ROOT / "src"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "split.val_fraction" in errors[0], result.stderr


@pytest.mark.parametrize("backend", ["foo", "Tensorflow"])
def test_unknown_keras_backend_is_one_clear_line(tmp_path, backend):
    """KERAS_BACKEND=foo: Keras itself raises a bare ValueError from deep inside its import."""
    (tmp_path / "params.yaml").write_text(shipped_params_text())
    for command in ([str(ROOT / "stages" / "train_frozen.py")],
                    ["-m", "glomeruli.commands.cli", "predict", str(tmp_path), "-o", str(tmp_path / "out.csv")]):
        result = run(tmp_path, sys.executable, *command, check=False, KERAS_BACKEND=backend,
                     PYTHONPATH=str(ROOT / "src"))
        assert result.returncode == 1, result.stderr[-3000:]
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and f"KERAS_BACKEND={backend!r}" in errors[0], result.stderr[-3000:]
        assert "tensorflow" in errors[0] and "jax" in errors[0]
    assert not (tmp_path / "out.csv").exists()


# ------------------------------------------------------------------- atomic outputs, out of space

@pytest.mark.parametrize("err", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    OSError(errno.EFBIG, "File too large"),
    # h5py on a failed flush: no errno attribute, HDF5's own text
    RuntimeError("Unable to synchronously flush file (file write failed: time = ..., filename = 'x.h5', "
                 "file descriptor = 3, errno = 28, error message = 'No space left on device', buf = 0x1)"),
    OSError("Can't decrement id ref count (unable to extend file properly, errno = 27, error message = 'File too large')"),
])
def test_out_of_space_is_recognised_in_every_form(err):
    assert is_out_of_space(err)
    try:  # raised from another error: still recognised
        try:
            raise err
        except Exception as inner:
            raise ValueError("saving failed") from inner
    except ValueError as outer:
        assert is_out_of_space(outer)


@pytest.mark.parametrize("err", [OSError(errno.EACCES, "Permission denied"), ValueError("image too large: 9e9 pixels"),
                                 RuntimeError("store incomplete: 3 of 4 images written")])
def test_other_errors_are_not_mistaken_for_a_full_disk(err):
    assert not is_out_of_space(err)


def test_full_disk_inside_atomic_path_keeps_the_previous_output(tmp_path):
    out = tmp_path / "data" / "store.h5"
    out.parent.mkdir()
    out.write_bytes(b"previous complete output")
    with pytest.raises(OutputWriteError) as caught:
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("Can't write data (file write failed: errno = 28, error message = 'No space left')")
    assert caught.value.errno == errno.ENOSPC and str(out) in str(caught.value) and "free disk space" in str(caught.value)
    assert out.read_bytes() == b"previous complete output"
    assert sorted(p.name for p in out.parent.iterdir()) == ["store.h5"]


def test_nested_outputs_report_the_file_that_failed(tmp_path):
    with pytest.raises(OutputWriteError) as caught:
        with atomic_path(tmp_path / "outer") as outer:
            outer.mkdir()
            with atomic_path(outer / "inner.json") as inner:
                raise OSError(errno.ENOSPC, "No space left on device", str(inner))
    assert re.search(r"no space left while writing \S+/inner\.json ", str(caught.value)), str(caught.value)
    assert not isinstance(caught.value.__cause__, OutputWriteError)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def data_project(tmp_path_factory) -> Path:
    """The four data stages run once (stage scripts, without DVC) on the tiny project."""
    repo = make_project(tmp_path_factory.mktemp("diskfull") / "project", commit=False)
    for stage in ("ingest", "preprocess", "augment", "split"):
        run(repo, sys.executable, f"stages/{stage}.py")
    return repo


def _limited(limit: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that writes fail with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
@pytest.mark.parametrize("stage, output, writer", [
    ("preprocess", "data/interim/preprocessed.h5", "HDF5 (h5py)"),
    ("augment", "data/processed/augmented.h5", "HDF5 (h5py)"),
    ("ingest", "data/interim/manifest.csv", "CSV"),
    ("split", "data/processed/split.json", "JSON"),
])
def test_full_disk_stops_the_stage_with_one_line_and_nothing_half_written(data_project, stage, output, writer):
    repo = data_project
    before = output_files(repo)
    # Small enough that the output cannot be written; for ingest larger than the report written first.
    limit = {"ingest": (len(before["data/interim/ingest_report.json"]) + len(before[output])) // 2}.get(
        stage, len(before[output]) // 4)
    assert limit < len(before[output])
    result = subprocess.run([sys.executable, f"stages/{stage}.py"], cwd=repo, env=_env(repo), capture_output=True,
                            text=True, timeout=300, preexec_fn=_limited(limit))
    assert result.returncode == 1, f"{writer} writer: exit {result.returncode} (a negative one is a crash)\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr and "Segmentation" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert f"stage {stage} failed" in errors[0] and f"no space left while writing {output}" in errors[0]
    assert "free disk space" in errors[0]
    assert leftovers(repo) == []
    assert output_files(repo) == before, "a failed write changed an earlier complete output"


PREDICTIONS_UNDER_LIMIT = """
import sys
from glomeruli.core.atomic import OutputWriteError
from glomeruli.commands.predict import Prediction, write_predictions
try:
    write_predictions(sys.argv[1], [Prediction(f"image-{i:05d}.png", i % 2, 0.5) for i in range(2000)])
except OutputWriteError as err:
    print("refused:", err)
"""


@pytest.mark.slow
def test_full_disk_while_writing_predictions_keeps_the_previous_file(tmp_path):
    out = tmp_path / "evaluation.csv"
    out.write_text("name,ground truth,probability\nolder.png,1,0.900000\n")
    result = subprocess.run([sys.executable, "-c", PREDICTIONS_UNDER_LIMIT, str(out)], cwd=tmp_path,
                            env=_env(ROOT), capture_output=True, text=True, timeout=300, preexec_fn=_limited(20_000))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"no space left while writing {out}" in result.stdout
    assert out.read_text() == "name,ground truth,probability\nolder.png,1,0.900000\n"
    assert [p.name for p in tmp_path.iterdir()] == ["evaluation.csv"]


# --------------------------------------------------------------- a split too small for both classes

@pytest.mark.slow
def test_split_too_small_for_both_classes_is_refused_before_training(tmp_path):
    repo = make_project(tmp_path / "project", n_images=12, split__val_fraction=0.1, split__folds=10)
    result = dvc(repo, "repro", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Running stage 'split'" in output and "Running stage 'train_frozen'" not in output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "stage split failed" in line]
    assert len(errors) == 1, output[-3000:]
    assert re.search(r"split\.(val_fraction|folds)", errors[0]), errors[0]
    assert not (repo / "data/processed/split.json").exists() and leftovers(repo) == []


# ------------------------------------------------------------------- kill, rerun, resume, repeat

@pytest.fixture(scope="module")
def reference(pipeline_repo) -> tuple[Path, dict[str, bytes]]:
    """An uninterrupted `dvc repro` of `pipeline_pristine` (the shared tiny pipeline) and its outputs."""
    files = output_files(pipeline_repo)
    assert leftovers(pipeline_repo) == []
    return pipeline_repo, files


def _snapshots(repo: Path, phase: str) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in repo.glob(f".glomeruli-tmp/checkpoints/{phase}-*/epoch-*"))


def _exists(pattern: str) -> Callable[[Path, str], bool]:
    return lambda repo, log: any(repo.glob(pattern))


def _halfway(stage: str) -> Callable[[Path, str], bool]:
    def reached(repo: Path, log: str) -> bool:
        return any(2 * int(done) >= int(total) for done, total in re.findall(rf"{stage}: (\d+)/(\d+)", log))
    return reached


def _epoch_done(phase: str, epoch: int) -> Callable[[Path, str], bool]:
    return lambda repo, log: epoch in _snapshots(repo, phase)


# (stage, what the kill interrupts, condition polled on the project and the run's log)
KILL_POINTS = [
    ("ingest", "manifest written, not renamed yet", _exists("data/interim/.manifest.tmp-*.csv")),
    ("preprocess", "temporary HDF5 just created", _exists("data/interim/.preprocessed.tmp-*.h5")),
    ("preprocess", "half the images written", _halfway("preprocess")),
    ("augment", "half the records written", _halfway("augment")),
    ("split", "split.json written, not renamed yet", _exists("data/processed/.split.tmp-*.json")),
    ("train_frozen", "first epoch completed", _epoch_done("train_frozen", 1)),
    ("train_frozen", "resume state of epoch 2 being written", _exists(".glomeruli-tmp/checkpoints/train_frozen-*/.epoch-0002.tmp-*")),
    ("finetune", "first epoch completed", _epoch_done("finetune", 1)),
    ("finetune", "all epochs done, model being saved", _exists("models/.model.tmp-*.keras")),
    ("evaluate", "plots renamed, metrics written, not renamed yet", _exists("metrics/.evaluate.tmp-*.json")),
]


def repro_until(repo: Path, log_path: Path, condition: Callable[[Path, str], bool] | None,
                timeout: float = 300) -> tuple[bool, int | None, str]:
    """Run `dvc repro`; SIGKILL its whole process group as soon as `condition` holds. (killed, rc, log)"""
    env = _env(repo, GLOMERULI_TEST_SLOW=f"{SLOW_S},{SLOW_LOOP_S}",
               PYTHONPATH=f"{log_path.parent / 'hook'}{os.pathsep}{repo / 'src'}")
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if condition is not None and condition(repo, log_path.read_text(errors="replace")):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                _wait_group_gone(proc.pid)
                return True, None, log_path.read_text(errors="replace")
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return False, proc.returncode, log_path.read_text(errors="replace")


def _wait_group_gone(pgid: int) -> None:
    for _ in range(500):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise AssertionError(f"processes of group {pgid} survived SIGKILL")


def _check_no_half_written_output(repo: Path, reference_files: dict[str, bytes], where: str) -> None:
    """After a kill, whatever sits under an output's final name is complete (the same bytes as the reference)."""
    for path, data in output_files(repo).items():
        if path not in NOT_BYTE_COMPARED:
            assert data == reference_files.get(path), f"{where}: {path} is under its final name but incomplete or wrong"
        elif path.endswith(".onnx"):
            import onnx

            onnx.checker.check_model(onnx.load_from_string(data))  # a truncated file does not parse


@pytest.mark.slow
def test_killed_at_any_point_a_plain_rerun_finishes_with_identical_outputs(pipeline_pristine, reference, tmp_path):
    """10 SIGKILLs of `dvc repro` across all seven stages; after each, a plain `dvc repro` goes on. The outputs are
    the uninterrupted run's, byte for byte: every stage was rerun in other processes, so this is also the test that
    the same seed on the same CPU reproduces every output and metric."""
    ref_repo, ref_files = reference
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(SLOW_WRITERS)
    repo = tmp_path / "project"
    shutil.copytree(pipeline_pristine, repo, symlinks=True)

    outcomes, resumed_from = [], {}
    for i, (stage, moment, condition) in enumerate(KILL_POINTS):
        killed, rc, log = repro_until(repo, tmp_path / f"run-{i:02d}.log", condition)
        where = f"kill point {i} ({stage}: {moment})"
        assert killed, f"{where} was never reached (dvc repro exited {rc}):\n{log[-3000:]}"
        assert f"Running stage '{stage}'" in log and f"stage {stage} done" not in log, f"{where}:\n{log[-3000:]}"
        _check_no_half_written_output(repo, ref_files, where)
        if stage in ("train_frozen", "finetune"):
            snapshots = _snapshots(repo, stage)  # the next run must resume after the latest complete one
            resumed_from[i + 1] = (stage, max(snapshots, default=0))
        outcomes.append(f"{where}: killed, outputs sound")
        if i in resumed_from:  # this run followed a kill of a training stage that had completed epochs
            _check_resumed(log, *resumed_from[i], where=f"run after kill point {i - 1}")

    killed, rc, log = repro_until(repo, tmp_path / "run-final.log", None)
    assert rc == 0, log[-4000:]
    last = len(KILL_POINTS)
    if last in resumed_from:
        _check_resumed(log, *resumed_from[last], where="final run")

    # Same bytes as the uninterrupted run, same models weight for weight, nothing left over, and DVC agrees.
    files = output_files(repo)
    assert sorted(files) == sorted(ref_files)
    for path, data in ref_files.items():
        if path not in NOT_BYTE_COMPARED:
            assert files[path] == data, f"{path} differs from the uninterrupted run's"
    for metric in ("metrics/evaluate.json", "metrics/split.json"):
        assert json.loads(files[metric]) == json.loads(ref_files[metric])
    for model in ("models/frozen.keras", "models/model.keras"):
        assert same_weights(ref_repo / model, repo / model), f"{model}: other weights than the uninterrupted run's"
    assert leftovers(repo) == []
    assert project_files(repo) == project_files(ref_repo)
    assert "up to date" in dvc(repo, "status").stdout
    for phase, epochs in (("train_frozen", FROZEN_EPOCHS), ("finetune", FINETUNE_EPOCHS)):
        for split in ("train", "val"):
            rows = (repo / "metrics" / phase / "plots" / "metrics" / split / "loss.tsv").read_text().splitlines()
            assert [r.split("\t")[0] for r in rows] == ["step", *map(str, range(epochs))], f"{phase} {split} curve"
    print("\n".join(outcomes))


def _check_resumed(log: str, phase: str, completed: int, *, where: str) -> None:
    """The run after a kill of `phase` with `completed` epochs saved trains only the epochs left."""
    epochs = FROZEN_EPOCHS if phase == "train_frozen" else FINETUNE_EPOCHS
    trained = [int(n) for n in re.findall(rf"^Epoch (\d+)/{epochs}$", log, re.M)]
    resumed = re.findall(rf"resuming after epoch (\d+) of {epochs} from \S+/checkpoints/{phase}-", log)
    assert resumed == ([str(completed)] if completed else []), f"{where}: {phase} resumed after {resumed}, " \
        f"expected after {completed}:\n{log[-3000:]}"
    assert trained[:1] == ([completed + 1] if completed < epochs else []), \
        f"{where}: {phase} trained epochs {trained} after a kill with {completed} completed"


# ----------------------------------------------------------- resume, early stopping included

class _Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_continues_early_stopping_and_ends_like_an_uninterrupted_run(tmp_path):
    """Killed before an epoch or after the stopping one, a rerun ends with the same epochs and weights."""
    import keras

    from glomeruli.model.backend import configure
    from glomeruli.core.params import TrainParams
    from glomeruli.model.inference import ArrayRows
    from glomeruli.model.checkpoints import Resume
    from glomeruli.model.training import PhaseData, fit

    rng = np.random.default_rng(0)
    data = PhaseData(ArrayRows(rng.normal(size=(64, 8)).astype(np.float32)), rng.integers(0, 2, 64),
                     ArrayRows(rng.normal(size=(32, 8)).astype(np.float32)), rng.integers(0, 2, 32))
    params = TrainParams(epochs=20, batch_size=8, lr=0.05, class_weight="balanced", patience=2)

    class Kill(keras.callbacks.Callback):
        def __init__(self, at):
            super().__init__()
            self.at = at

        def on_epoch_begin(self, epoch, logs=None):
            if epoch == self.at:
                raise _Killed

        def on_train_end(self, logs=None):
            if self.at == "end":
                raise _Killed

    class Epochs(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seen: list[int] = []

        def on_epoch_end(self, epoch, logs=None):
            self.seen.append(epoch)

    def train(folder: Path, kill=None):
        configure(3, "float32", "auto")
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dropout(0.3),
                                  keras.layers.Dense(1, activation="sigmoid")])
        epochs = Epochs()
        try:
            fit(model, data, params, seed=3, callbacks=[epochs, Resume(folder), *([Kill(kill)] if kill else [])])
        except _Killed:
            return None, epochs.seen
        return model.get_weights(), epochs.seen

    expected, all_epochs = train(tmp_path / "uninterrupted")
    assert 2 < len(all_epochs) < params.epochs, "early stopping should end this run after a few epochs"
    for kill in (1, len(all_epochs) - 1, "end"):
        folder = tmp_path / f"killed-{kill}"
        _, before = train(folder, kill)
        weights, after = train(folder)
        assert before + after == all_epochs, f"killed at {kill}: epochs {before} then {after}"
        assert all(np.array_equal(a, b) for a, b in zip(weights, expected)), f"killed at {kill}: other weights"


