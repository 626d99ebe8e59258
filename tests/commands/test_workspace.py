"""The README's path on one checkout: the demo, the tests, a queued experiment, then the step to real data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from conftest import shipped_params_raw, shipped_params_text
from glomeruli.core.errors import UserError
from glomeruli.data.layout import BIOPSY_PREFIX, MARKER_FILE
from glomeruli.core.params import parse_params
from glomeruli.commands.workspace import set_data_source
from glomeruli.model.recipes import FROM_SCRATCH_OVERRIDES, from_scratch_command
from project import ROOT, dvc, glomeruli, run

pytestmark = pytest.mark.slow
DEMO_SMALLEST = ["-n", "120", "-S", "preprocess.image_size=32", "-S", "train_frozen.epochs=2", "-S", "runtime.workers=1"]


def _checkout(folder: Path) -> Path:
    """A fresh clone of the project as committed (tests included), with this session's environment linked in."""
    folder.mkdir(parents=True)
    for item in ("dvc.yaml", "stages", "src", "tests", "scripts", "pyproject.toml", ".dvcignore", ".gitignore",
                 "requirements.txt", "requirements-common.txt", "requirements-dev.txt"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, folder / item, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            shutil.copy(src, folder / item)
    (folder / "params.yaml").write_text(shipped_params_text())
    run(folder, "git", "init", "-q", "-b", "main")
    dvc(folder, "init", "-q")
    run(folder, "git", "add", "-A")
    run(folder, "git", "commit", "-qm", "project")
    (folder / ".venv").symlink_to(Path(sys.executable).parents[1])  # scripts/setup.sh leaves a linked venv as it is
    return folder


def _real_looking_images(folder: Path, n_per_class: int = 12) -> None:
    """Images with real-looking CMIL names (no SYNTH- ids, no marker), in the class folders."""
    rng = np.random.default_rng(5)
    for label, name in ((1, "globally_sclerotic_glomeruli"), (0, "non_globally_sclerotic_glomeruli")):
        (folder / name).mkdir(parents=True)
        for i in range(n_per_class):
            image = rng.integers(0, 255, (40 + i, 48, 3), dtype=np.uint8)
            image[..., 1] = 60 if label else 200
            cv2.imwrite(str(folder / name / f"S-2024-{i % 6:04d}_PAS_1of1_{label}{i:023x}.png"), image)


def _wait_for_queue(repo: Path, timeout_s: float = 600) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = dvc(repo, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(3)
    raise AssertionError(f"the queue did not finish in {timeout_s} s:\n{status}")


def test_demo_tests_queue_then_real_data_on_one_checkout(tmp_path):
    repo = _checkout(tmp_path / "project")

    # 1. The README's main job, smallest size.
    demo = run(repo, "bash", "scripts/demo.sh", *DEMO_SMALLEST)
    assert "Done. Test-set metrics" in demo.stdout
    assert not (repo / "data" / "raw").exists(), "the demo must keep data/raw for the user's own images"
    assert (repo / "data" / "sample" / MARKER_FILE).is_file() and (repo / "data" / "sample.dvc").is_file()
    assert yaml.safe_load((repo / "params.yaml").read_text())["data"]["source"] == "data/sample"

    # 2. The README's test command's parameter tests, on the same checkout, after the demo.
    tests = run(repo, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/core/test_params.py")
    assert " passed" in tests.stdout and "failed" not in tests.stdout

    # 3. The README's queue recipe: one experiment runs to Success and shows its metrics.
    dvc(repo, "exp", "run", "--queue", "-S", "evaluate.threshold_rule=youden")
    dvc(repo, "queue", "start", "-j", "1")
    status = _wait_for_queue(repo)
    if "Success" not in status or "Failed" in status:
        name = status.splitlines()[1].split()[1] if len(status.splitlines()) > 1 else ""
        raise AssertionError(status + dvc(repo, "queue", "logs", name, check=False).stdout[-3000:])
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    queued = [exp for commit in shown for exp in (commit.get("experiments") or [])
              for rev in exp.get("revs", []) if rev.get("data", {}).get("params", {}).get("params.yaml", {})
              .get("data", {}).get("evaluate", {}).get("threshold_rule") == "youden"]
    assert queued, json.dumps(shown)[:3000]
    metrics = queued[0]["revs"][0]["data"]["metrics"]["metrics/evaluate.json"]["data"]
    assert 0.0 <= metrics["threshold"] <= 1.0 and "f1" in metrics["test"]

    # 4. The one step to real data: nothing of the demo is left.
    _real_looking_images(repo / "data" / "raw")
    glomeruli(repo, "use-data", "data/raw")
    assert (repo / "params.yaml").read_text() == shipped_params_text(), "a CPU override of the demo is left"
    assert not (repo / "dvc.lock").exists() and not (repo / "data" / "sample").exists()
    assert not (repo / "data" / "sample.dvc").exists() and not (repo / "metrics" / "evaluate.json").exists()
    assert not (repo / "models" / "model.keras").exists() and not (repo / "data" / "interim" / "manifest.csv").exists()
    assert run(repo, "git", "diff", "--cached", "--name-only").stdout.strip() == ""
    dvc(repo, "repro", "ingest")
    manifest = (repo / "data" / "interim" / "manifest.csv").read_text()
    assert manifest.count("\n") - 1 == 24 and BIOPSY_PREFIX not in manifest


def test_use_data_refuses_the_sample_data_and_a_missing_folder(tmp_path):
    repo = _checkout(tmp_path / "project")
    glomeruli(repo, "sample-data", "data/sample", "-n", "20", "--size-range", "48", "64", "--workers", "1")
    refused = glomeruli(repo, "use-data", "data/sample", check=False)
    assert refused.returncode == 1 and MARKER_FILE in refused.stderr and "Traceback" not in refused.stderr
    missing = glomeruli(repo, "use-data", "data/nowhere", check=False)
    assert missing.returncode == 1 and "data/nowhere does not exist" in missing.stderr


def test_set_data_source_keeps_comments_and_layout(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(shipped_params_text())
    set_data_source(params, "/mnt/lab/cohort 2.zip")
    text = params.read_text()
    assert yaml.safe_load(text)["data"]["source"] == "/mnt/lab/cohort 2.zip"
    assert text.replace("/mnt/lab/cohort 2.zip", "data/raw") == shipped_params_text()
    assert shipped_params_raw()["data"]["source"] == "data/raw"


def test_doctor_says_what_it_sees(tmp_path):
    (tmp_path / "params.yaml").write_text(shipped_params_text())
    result = subprocess.run([sys.executable, "-m", "glomeruli.commands.cli", "doctor"], cwd=tmp_path, capture_output=True,
                            text=True, env={**__import__("os").environ, "KERAS_HOME": str(tmp_path / "keras")})
    assert result.returncode == 0, result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines()}
    assert "tensorflow" in lines["keras"] and "cpu" in lines["devices"]
    assert "float32" in lines["dtype"] and "not cached" in lines["ImageNet"] and lines["ImageNet"].startswith("!!")
    assert "data/raw does not exist" in lines["data"]
    assert "dvc exp run -S preprocess.image_size=128 -S model.weights=none" in lines["ImageNet"]


def test_doctor_flags_training_from_scratch_below_128_px(tmp_path):
    raw = shipped_params_raw()
    raw["model"]["weights"], raw["preprocess"]["image_size"] = "none", 64
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, "-m", "glomeruli.commands.cli", "doctor"], cwd=tmp_path, capture_output=True,
                            text=True)
    line = next(line for line in result.stdout.splitlines() if "model weights" in line)
    assert line.startswith("!!") and "none at 64 px" in line and "memorises" in line, result.stdout
    assert FROM_SCRATCH_RECIPE in line


# Recipe (c) of bench/RESULTS.md, written out: what doctor prints, the README shows and a user pastes.
FROM_SCRATCH_RECIPE = (
    "dvc exp run -S preprocess.image_size=128 -S model.weights=none -S train_frozen.epochs=30 -S train_frozen.lr=0.003"
    " -S train_frozen.patience=6 -S finetune.unfreeze_blocks=all -S finetune.lr=0.001 -S finetune.lr_schedule=cosine"
    " -S finetune.warmup_epochs=0 -S finetune.epochs=12 -S finetune.patience=12")


def test_from_scratch_recipe_is_valid_params_and_the_readme_shows_it():
    """The recipe's `-S key=value` overrides, applied to the shipped params.yaml as DVC applies them (the value
    read as YAML), load with the strict loader and give exactly those settings; the README shows the line."""
    assert from_scratch_command() == FROM_SCRATCH_RECIPE
    assert FROM_SCRATCH_RECIPE in (ROOT / "README.md").read_text(encoding="utf-8")
    overrides = dict(option.split("=", 1) for option in FROM_SCRATCH_RECIPE.split(" -S ")[1:])
    assert set(overrides) == set(FROM_SCRATCH_OVERRIDES)
    raw = shipped_params_raw()
    for key, value in overrides.items():
        section, name = key.split(".")
        assert name in raw[section], key  # overrides an existing key (a new one would need `-S +key=value`)
        raw[section][name] = yaml.safe_load(value)
    params = parse_params(raw)  # the strict loader refuses any unknown key or bad value
    assert (params.preprocess.image_size, params.model.weights) == (128, "none")
    assert (params.train_frozen.epochs, params.train_frozen.lr, params.train_frozen.patience) == (30, 0.003, 6)
    assert (params.finetune.unfreeze_blocks, params.finetune.lr, params.finetune.lr_schedule) == ("all", 0.001, "cosine")
    assert (params.finetune.warmup_epochs, params.finetune.epochs, params.finetune.patience) == (0, 12, 12)


def _project_with_outs(folder: Path, outs: list[str]) -> Path:
    """A committed git + DVC project whose one stage declares `outs`, and the user's data in data/raw."""
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(shipped_params_text())
    (folder / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {"cmd": "true", "outs": outs}}}))
    (folder / ".dvc").mkdir()
    run(folder, "git", "init", "-q", "-b", "main")
    run(folder, "git", "add", "-A")
    run(folder, "git", "commit", "-qm", "project")
    (folder / "data" / "raw").mkdir(parents=True)
    return folder


def _precious(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "thesis.txt").write_text("years of work")
    return folder


@pytest.mark.parametrize("out", ["../victim", "data/link/victim"])
def test_use_data_refuses_an_output_outside_the_project(tmp_path, out):
    victim = _precious(tmp_path / "victim")
    repo = _project_with_outs(tmp_path / "project", [out])
    (repo / "data" / "link").symlink_to(tmp_path, target_is_directory=True)  # data/link/victim is ../victim
    (repo / "params.yaml").write_text(shipped_params_text().replace("seed: 42", "seed: 7"))
    refused = glomeruli(repo, "use-data", "data/raw", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"{out}" in refused.stderr and "dvc.yaml" in refused.stderr and "outside the project" in refused.stderr
    assert (victim / "thesis.txt").read_text() == "years of work"
    assert "seed: 7" in (repo / "params.yaml").read_text(), "nothing may change before the refusal"


def test_use_data_removes_a_symlinked_output_never_its_target(tmp_path):
    cache = _precious(tmp_path / "shared-cache")  # as DVC's `cache.type: symlink` with a cache outside the project
    repo = _project_with_outs(tmp_path / "project", ["data/interim/manifest.csv", "metrics/plots"])
    (repo / "data" / "interim").mkdir(parents=True)
    (repo / "data" / "interim" / "manifest.csv").symlink_to(cache / "thesis.txt")
    (repo / "metrics").mkdir()
    (repo / "metrics" / "plots").symlink_to(cache, target_is_directory=True)
    glomeruli(repo, "use-data", "data/raw")
    for out in (repo / "data" / "interim" / "manifest.csv", repo / "metrics" / "plots"):
        assert not out.is_symlink() and not out.exists()
    assert (cache / "thesis.txt").read_text() == "years of work"
