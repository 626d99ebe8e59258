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


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory) -> None:
    """One persistent XLA compilation cache for this run's JAX processes (both workers, their subprocesses): the
    JAX tests build the same EfficientNet graphs many times. JAX keys each entry on the program, its flags and
    versions, so a hit is the compilation it replaces; the folder is new each run."""
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_run_folder(tmp_path_factory) / "jax-cache"))


def _run_folder(tmp_path_factory) -> Path:
    """This test run's folder, shared by its xdist workers (each has its own basetemp inside it)."""
    in_worker = "PYTEST_XDIST_WORKER" in os.environ
    return tmp_path_factory.getbasetemp().parent if in_worker else tmp_path_factory.getbasetemp()


@pytest.fixture(scope="session")
def pipeline_repo(tmp_path_factory) -> Path:
    """One tiny project (`project.TINY_PIPELINE`: 120 images at 64 px from 3 synthetic sites, split by biopsy) after
    a real `dvc repro`, committed as `baseline` on main. Shared by every test that needs a finished pipeline, in
    every xdist worker (the first builds it, the others wait for it): do not change it; work on
    `project.clone_project(pipeline_repo, tmp_path / "clone")` instead."""
    return _shared_pipeline(tmp_path_factory) / "project"


@pytest.fixture(scope="session")
def pipeline_pristine(tmp_path_factory) -> Path:
    """`pipeline_repo` as it was before its `dvc repro` (the same git commit, nothing run): copy it, never change it."""
    return _shared_pipeline(tmp_path_factory) / "pristine"


def _shared_pipeline(tmp_path_factory) -> Path:
    from filelock import FileLock

    shared = _run_folder(tmp_path_factory)
    folder, built = shared / "pipeline", shared / "pipeline" / "built"
    with FileLock(str(shared / "pipeline.lock")):
        if not built.exists():
            if folder.exists():
                pytest.fail(f"building {folder} failed in another worker: see that worker's first error")
            _build_pipeline_repo(folder)
            built.touch()
    return folder


def _build_pipeline_repo(folder: Path) -> None:
    from project import STAGES, TINY_PIPELINE, dvc, make_project, run, stages_run

    pristine, repo = folder / "pristine", folder / "project"
    make_project(pristine, shipped_params_raw(), n_images=120, seed=1, sites=3, **TINY_PIPELINE)
    shutil.copytree(pristine, repo, symlinks=True)
    output = dvc(repo, "repro").stdout
    assert stages_run(output) == list(STAGES), output[-3000:]
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "baseline")


# Slowest modules first (measured on 2 cores): with two workers taking whole modules in this order, neither is
# left alone with a long module at the end.
SLOWEST_FIRST = ("test_training", "test_robustness", "test_backends", "test_workspace", "test_pipeline",
                 "test_distribute", "test_finetune", "test_evaluate_outputs", "test_review", "test_export")


# A test using one of these runs the real `dvc repro` of the tiny pipeline (or waits for it): slow by definition.
SLOW_FIXTURES = frozenset({"pipeline_repo", "pipeline_pristine"})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("learning") or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__ if item.module else "", len(rank)))
