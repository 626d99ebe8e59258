"""End to end: the real `dvc repro` of all seven stages on small synthetic data, then what reviewers rely on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

import project
from glomeruli.data.h5store import ImageStore
from glomeruli.core.params import load_params
from project import STAGES, clone_project, stages_run

TEST_METRICS = ("accuracy", "loss", "precision", "recall", "f1", "roc_auc", "pr_auc", "balanced_accuracy")

pytestmark = pytest.mark.slow


def run(repo: Path, *args: str) -> str:
    result = project.run(repo, *args)
    return result.stdout + result.stderr


def dvc(repo: Path, *args: str) -> str:
    return run(repo, sys.executable, "-m", "dvc", *args)


def set_param(repo: Path, key: str, value) -> None:
    project.set_params(repo, **{key.replace(".", "__"): value})


@pytest.fixture(scope="module")
def repo(pipeline_repo, tmp_path_factory) -> Path:
    """A clone of the session's finished project: these tests change params and run experiments in it."""
    return clone_project(pipeline_repo, tmp_path_factory.mktemp("pipeline-clone") / "project")


def test_every_declared_output_exists(repo):
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    for name, stage in pipeline["stages"].items():
        for out in stage["outs"]:
            path = repo / (out if isinstance(out, str) else next(iter(out)))
            assert path.exists(), f"stage {name} did not write {path}"
    for metric in pipeline["metrics"]:
        assert (repo / metric).is_file()
    no_partial = [p for p in repo.rglob(".*.tmp-*")]
    assert no_partial == []


def test_metrics_are_complete_and_consistent(repo):
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    test = metrics["test"]
    for key in TEST_METRICS:
        assert isinstance(test[key], float), key
    cm = test["confusion_matrix"]
    assert sum(cm.values()) == test["n"]
    split = json.loads((repo / "data/processed/split.json").read_text())
    assert test["n"] == len(split["test"])
    assert 0.0 <= metrics["threshold"] <= 1.0
    confusion = (repo / "metrics/plots/confusion.csv").read_text().splitlines()
    assert confusion[0] == "id,actual,predicted" and len(confusion) - 1 == test["n"]
    meta = json.loads((repo / "models/model.meta.json").read_text())
    assert meta["threshold"] == metrics["threshold"] and meta["image_size"] == 64


def test_partitions_are_disjoint_by_image_and_biopsy(repo):
    split = json.loads((repo / "data/processed/split.json").read_text())
    with ImageStore(repo / "data/processed/augmented.h5") as store:
        meta = store.meta
    for key in ("source_ids", "groups"):
        seen = {p: set(getattr(meta, key)[split[p]]) for p in ("train", "val", "test")}
        assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"] and not seen["val"] & seen["test"]
    assert not meta.is_augmented[split["val"]].any() and not meta.is_augmented[split["test"]].any()
    assert meta.is_augmented[split["train"]].any()
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(
        set(split["train"]) | set(split["val"]) | set(split["test"]))


def test_second_repro_runs_nothing(repo):
    output = dvc(repo, "repro")
    assert stages_run(output) == []
    assert "up to date" in dvc(repo, "status")


def test_evaluate_param_changes_only_evaluate(repo):
    """`dvc status` names the stages whose own inputs changed: evaluate alone (export follows when evaluate
    rewrites models/model.meta.json). The next test's `dvc exp run` runs evaluate with the new rule, so a repro
    here would be thrown away by it."""
    set_param(repo, "evaluate.threshold_rule", "youden")
    assert sorted(json.loads(project.dvc(repo, "status", "--json").stdout)) == ["evaluate"]


def test_exp_run_of_a_finetune_param_reruns_finetune_evaluate_export_records_a_float_and_diffs(repo):
    """One retraining covers three things: `-S` in exponent notation (which YAML 1.1 reads as a string without
    a dot) is recorded as a float, only the stages that depend on `finetune.*` rerun, and `dvc metrics diff`
    against the last commit shows the change."""
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "youden threshold")
    output = dvc(repo, "exp", "run", "-S", "finetune.lr=1e-4")
    assert stages_run(output) == ["finetune", "evaluate", "export"]
    assert load_params(repo / "params.yaml").finetune.lr == pytest.approx(1e-4)
    recorded = yaml.safe_load((repo / "params.yaml").read_text())["finetune"]["lr"]
    assert isinstance(recorded, float), f"dvc wrote {recorded!r}, which YAML reads as a string"
    diff = json.loads(dvc(repo, "metrics", "diff", "HEAD", "--json"))
    assert diff, "dvc metrics diff shows no change after retraining"
    assert any("evaluate.json" in path or "finetune" in path for path in diff)


def test_data_stages_are_byte_identical_on_rerun(repo):
    outputs = ["data/interim/manifest.csv", "data/interim/ingest_report.json", "data/interim/preprocessed.h5",
               "data/processed/augmented.h5", "data/processed/split.json"]
    before = {p: (repo / p).read_bytes() for p in outputs}
    dvc(repo, "repro", "--force", "--single-item", "ingest")
    for stage in ("preprocess", "augment", "split"):
        dvc(repo, "repro", "--force", "--single-item", stage)
    for p in outputs:
        assert (repo / p).read_bytes() == before[p], f"{p} changed on an identical rerun"


def test_misspelt_key_stops_dvc_repro_with_one_line(pipeline_repo, tmp_path):
    clone = clone_project(pipeline_repo, tmp_path / "clone")
    text = (clone / "params.yaml").read_text().replace("train_frozen:\n", "train_frozen:\n  epocs: 3\n", 1)
    (clone / "params.yaml").write_text(text)
    result = project.dvc(clone, "repro", check=False, GLOMERULI_LOG_LEVEL="INFO")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if " ERROR glomeruli" in line]
    assert len(errors) == 1, output[-3000:]
    assert "unknown key `train_frozen.epocs`: did you mean `train_frozen.epochs`?" in errors[0]
    assert "Traceback" not in output and "Running stage 'train_frozen'" in output


def test_editing_inference_marks_training_and_evaluate_changed_and_the_generator_nothing(pipeline_repo, tmp_path):
    """inference.py runs the training caches and evaluate's predictions, so DVC must see those three stages as
    changed; the synthetic image generator is no stage's dependency. `dvc status` only: nothing reruns."""
    clone = clone_project(pipeline_repo, tmp_path / "clone")
    for module in ("model/inference.py", "data/sample_data.py"):
        assert (clone / "src" / "glomeruli" / module).is_file(), module
        with (clone / "src" / "glomeruli" / module).open("a") as f:
            f.write("# an edit\n")
    status = json.loads(project.dvc(clone, "status", "--json").stdout)
    assert sorted(status) == ["evaluate", "finetune", "train_frozen"], status
    for stage, changes in status.items():
        changed = {path for change in changes for path in change.get("changed deps", {})}
        assert changed == {"src/glomeruli/model/inference.py"}, (stage, changes)
