"""Tiny git + DVC projects holding this pipeline, for tests that run the real `dvc`.

`conftest.pipeline_repo` builds one such project and runs `dvc repro` once per test session;
tests that change it work on `clone_project(...)`, which shares its DVC cache (nothing reruns).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from glomeruli.data.layout import SYNTHETIC_SITE_REGEX

ROOT = Path(__file__).resolve().parents[1]
# dvc.yaml's stages in pipeline order; export reruns whenever evaluate rewrites models/model.meta.json (its dep).
STAGES = ("ingest", "preprocess", "augment", "split", "train_frozen", "finetune", "evaluate", "export")
PROJECT_FILES = ("dvc.yaml", "params.yaml", "stages", "src", "pyproject.toml", ".dvcignore")
# conftest.pipeline_repo's settings (with 120 images from 3 sites, seed 1). The kill test reruns this project from
# scratch and compares with pipeline_repo, so it needs two fine-tuning epochs (a kill between them) and patience
# at least the epochs (early stopping never shortens a run).
TINY_PIPELINE = dict(ingest__site_regex=SYNTHETIC_SITE_REGEX, preprocess__image_size=64, model__weights="none",
                     split__group_by="biopsy", split__val_fraction=0.2, split__folds=5, train_frozen__epochs=3,
                     train_frozen__batch_size=16, train_frozen__patience=3, finetune__epochs=2, finetune__batch_size=16,
                     finetune__unfreeze_blocks=1, finetune__patience=2, evaluate__bootstrap_resamples=200,
                     runtime__workers=2, runtime__memory_budget_gb=1)


def project_env(repo: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env.pop("KERAS_BACKEND", None)
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", PYTHONPATH=str(repo / "src"),
               DVC_NO_ANALYTICS="1", TF_CPP_MIN_LOG_LEVEL="2", GIT_AUTHOR_NAME="ci", GIT_AUTHOR_EMAIL="ci@localhost",
               GIT_COMMITTER_NAME="ci", GIT_COMMITTER_EMAIL="ci@localhost", GLOMERULI_LOG_LEVEL="WARNING")
    env.update(extra)
    return env


def run(repo: Path, *args: str, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=repo, env=project_env(repo, **extra_env), capture_output=True, text=True,
                            timeout=1200)
    if check:
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def dvc(repo: Path, *args: str, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    return run(repo, sys.executable, "-m", "dvc", *args, check=check, **extra_env)


def glomeruli(repo: Path, *args: str, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    return run(repo, sys.executable, "-m", "glomeruli.commands.cli", *args, check=check, **extra_env)


def stages_run(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def set_params(repo: Path, **settings) -> None:
    """set_params(repo, evaluate__threshold_rule="youden"): edit params.yaml as a user would."""
    path = repo / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    for key, value in settings.items():
        section, name = key.split("__")
        raw[section][name] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def make_project(folder: Path, params_raw: dict, *, n_images: int = 120, seed: int = 1, commit: bool = True,
                 sites: int = 1, **settings) -> Path:
    """Copy the pipeline into `folder` with tiny settings and synthetic data in data/raw (nothing run yet)."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in PROJECT_FILES:
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, folder / item, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, folder / item)
    (folder / "params.yaml").write_text(yaml.safe_dump(params_raw, sort_keys=False))
    set_params(folder, **settings)
    run(folder, sys.executable, "-m", "glomeruli.commands.cli", "sample-data", "data/raw", "-n", str(n_images),
        "--seed", str(seed), "--size-range", "48", "96", "--workers", "1", "--sites", str(sites))
    (folder / ".gitignore").write_text("/data/raw/\n")
    if commit:
        run(folder, "git", "init", "-q", "-b", "main")
        dvc(folder, "init", "-q")
        run(folder, "git", "add", "-A")
        run(folder, "git", "commit", "-qm", "pipeline")
    return folder


def clone_project(source: Path, folder: Path) -> Path:
    """A git clone of a finished project sharing its DVC cache, with its outputs checked out (nothing reruns)."""
    run(source, "git", "clone", "-q", str(source), str(folder))
    shutil.copytree(source / "data" / "raw", folder / "data" / "raw")
    dvc(folder, "cache", "dir", "--local", str(source / ".dvc" / "cache"))
    dvc(folder, "checkout", "-q")
    return folder
