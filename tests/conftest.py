"""Shared fixtures: tiny synthetic datasets and the stores built from them by the real package code."""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from glomeruli.data.augment import augment_store  # noqa: E402
from glomeruli.data.h5store import ImageStore  # noqa: E402
from glomeruli.data.ingest import IngestConfig, ingest_dataset  # noqa: E402
from glomeruli.core.params import Params, load_params, parse_params, read_yaml  # noqa: E402
from glomeruli.data.preprocess import preprocess_images  # noqa: E402
from glomeruli.data.sample_data import generate_sample_dataset  # noqa: E402
from glomeruli.data.split import Split, split_records  # noqa: E402
from glomeruli.core.vcs import git_show_or_none  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def shipped_params_text() -> str:
    """params.yaml as committed: the demo's `dvc exp run -S` overrides stay in the working copy, and tests
    must not depend on whether the demo ran first (outside a git checkout: the file itself)."""
    return git_show_or_none("HEAD", "params.yaml", ROOT) or (ROOT / "params.yaml").read_text()


def shipped_params_raw() -> dict:
    return read_yaml(io.StringIO(shipped_params_text()))


def small_params(**overrides) -> Params:
    """The shipped params.yaml with CPU-test sizes (64 px, no pretrained weights, few epochs)."""
    raw = shipped_params_raw()
    raw["preprocess"]["image_size"] = 64
    raw["model"]["weights"] = "none"
    raw["runtime"]["workers"] = 1
    for section in ("train_frozen", "finetune"):
        raw[section].update(epochs=2, batch_size=16)
    for key, value in overrides.items():
        section, name = key.split(".")
        raw[section][name] = value
    return parse_params(raw)


@dataclass(frozen=True)
class TinyData:
    raw: Path
    preprocessed: Path
    augmented: Path
    split: Split
    params: Params

    def store(self) -> ImageStore:
        return ImageStore(self.augmented)


def build_tiny_data(folder: Path, *, n_images: int, size: int, seed: int = 0, difficulty: float = 0.3,
                    group_by: str = "image", structure_only: bool = False, sclerotic_fraction: float = 0.18,
                    n_biopsies: int | None = None, size_range: tuple[int, int] = (48, 128),
                    **param_overrides) -> TinyData:
    """Sample data -> ingest -> preprocess -> augment -> split, with the package's own functions."""
    raw = folder / "raw"
    generate_sample_dataset(raw, n_images, seed=seed, difficulty=difficulty, size_range=size_range, progress=False,
                            structure_only=structure_only, sclerotic_fraction=sclerotic_fraction, n_biopsies=n_biopsies)
    params = small_params(**{"preprocess.image_size": size, "split.group_by": group_by, **param_overrides})
    config = IngestConfig(class_dirs=params.ingest.class_dirs, labels_csv=params.ingest.labels_csv,
                          group_regex=params.ingest.group_regex, max_pixels=params.ingest.max_pixels,
                          max_unreadable_fraction=params.ingest.max_unreadable_fraction, workers=1)
    rows = ingest_dataset(raw, config).rows
    preprocessed, augmented = folder / "preprocessed.h5", folder / "augmented.h5"
    preprocess_images(raw, rows, preprocessed, size=size, fill=params.preprocess.fill,
                      max_pixels=params.ingest.max_pixels, workers=1)
    meta = augment_store(preprocessed, augmented, params.augment, seed=params.seed, workers=1)
    return TinyData(raw, preprocessed, augmented, split_records(meta, params.split, params.seed), params)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> TinyData:
    """60 images at 32 px: enough for every stage's mechanics, not for learning."""
    return build_tiny_data(tmp_path_factory.mktemp("tiny"), n_images=60, size=32)


@pytest.fixture(scope="session")
def pipeline_repo(tmp_path_factory) -> Path:
    """One tiny project (120 images at 64 px from 3 synthetic sites, split by biopsy) after a real `dvc repro`, committed as
    `baseline` on main. Shared by every test that needs a finished pipeline, in every xdist worker (the
    first builds it, the others wait for it): do not change it; work on
    `project.clone_project(pipeline_repo, tmp_path / "clone")` instead."""
    from filelock import FileLock

    # Each xdist worker has its own basetemp inside this run's folder; without xdist that folder is ours.
    in_worker = "PYTEST_XDIST_WORKER" in os.environ
    shared = tmp_path_factory.getbasetemp().parent if in_worker else tmp_path_factory.getbasetemp()
    repo, built = shared / "pipeline" / "project", shared / "pipeline" / "built"
    with FileLock(str(shared / "pipeline.lock")):
        if not built.exists():
            if repo.exists():
                pytest.fail(f"building {repo} failed in another worker: see that worker's first error")
            _build_pipeline_repo(repo)
            built.touch()
    return repo


def _build_pipeline_repo(folder: Path) -> None:
    from project import STAGES, dvc, make_project, run, stages_run

    from glomeruli.data.layout import SYNTHETIC_SITE_REGEX

    repo = make_project(folder, shipped_params_raw(), n_images=120, seed=1, sites=3,
                        ingest__site_regex=SYNTHETIC_SITE_REGEX, preprocess__image_size=64, model__weights="none",
                        split__group_by="biopsy",
                        split__val_fraction=0.2, split__folds=5, train_frozen__epochs=2, train_frozen__batch_size=16,
                        finetune__epochs=1, finetune__batch_size=16, finetune__unfreeze_blocks=1,
                        evaluate__bootstrap_resamples=200, runtime__workers=2, runtime__memory_budget_gb=1)
    output = dvc(repo, "repro").stdout
    assert stages_run(output) == list(STAGES), output[-3000:]
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "baseline")


# Slowest modules first (measured on 2 cores): with two workers taking whole modules in this order, neither is
# left alone with a long module at the end.
SLOWEST_FIRST = ("test_training", "test_robustness", "test_backends", "test_workspace", "test_pipeline",
                 "test_distribute", "test_finetune", "test_evaluate_outputs", "test_review", "test_export")


# A test using one of these runs the real `dvc repro` of the tiny pipeline (or waits for it): slow by definition.
SLOW_FIXTURES = frozenset({"pipeline_repo"})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("learning") or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__ if item.module else "", len(rank)))
