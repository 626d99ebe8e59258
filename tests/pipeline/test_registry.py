"""The DVC model registry (dvc.yaml `artifacts:`) with GTO's versions and stages, as README's "Publishing a model"
does it: register and assign in a clone of the tiny pipeline (pipeline_repo, read only), push the model to a folder
remote, and fetch it by name, version and stage through that remote from a git URL, as a colleague would."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from glomeruli.evaluation.model_card import ARTIFACT_NAME
from project import clone_project, dvc, run

pytestmark = pytest.mark.slow


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def published(pipeline_repo, tmp_path_factory):
    """(publisher clone, remote folder): the model pushed, v1.0.0 registered and assigned to prod."""
    base = tmp_path_factory.mktemp("registry")
    repo = clone_project(pipeline_repo, base / "publisher")
    remote = base / "remote"
    dvc(repo, "remote", "add", "-d", "storage", str(remote))
    run(repo, "git", "commit", "-qam", "DVC remote")  # in git: whoever clones the repository finds the remote
    dvc(repo, "push", "-q", "models/model.keras")
    run(repo, "gto", "register", ARTIFACT_NAME, "--version", "v1.0.0", "-m", "first release")
    run(repo, "gto", "assign", ARTIFACT_NAME, "--stage", "prod")
    return repo, remote


def test_gto_tags_name_the_version_and_the_stage(published):
    repo, _ = published
    tags = run(repo, "git", "tag", "--list").stdout.split()
    assert f"{ARTIFACT_NAME}@v1.0.0" in tags and f"{ARTIFACT_NAME}#prod#1" in tags
    head = run(repo, "git", "rev-parse", "HEAD").stdout.strip()
    assert run(repo, "git", "rev-list", "-n", "1", f"{ARTIFACT_NAME}@v1.0.0").stdout.strip() == head
    shown = run(repo, "gto", "show", ARTIFACT_NAME).stdout
    assert "v1.0.0" in shown and "prod" in shown


@pytest.mark.parametrize("selector", [("--rev", "v1.0.0"), ("--stage", "prod")])
def test_dvc_artifacts_get_fetches_the_model_through_the_remote(published, tmp_path, selector):
    """A file:// URL makes DVC clone the repository and read the remote committed in it (a local path would be
    opened in place, with its own cache)."""
    repo, remote = published
    url = repo.resolve().as_uri()
    where = dvc(tmp_path, "artifacts", "get", url, ARTIFACT_NAME, *selector, "--show-url").stdout.strip()
    assert Path(where).resolve().is_relative_to(remote.resolve()), where
    dvc(tmp_path, "artifacts", "get", url, ARTIFACT_NAME, *selector, "-o", "model.keras")
    assert _sha256(tmp_path / "model.keras") == _sha256(repo / "models" / "model.keras")


def test_the_metadata_of_a_version_comes_with_dvc_get_and_matches_the_fetched_model(published, tmp_path):
    """predict needs the model and its metadata: both fetched by the version's tag; the metadata accepts the model."""
    from glomeruli.model.metadata import read_metadata

    repo, _ = published
    url = repo.resolve().as_uri()
    dvc(tmp_path, "artifacts", "get", url, ARTIFACT_NAME, "--rev", "v1.0.0", "-o", "model.keras")
    dvc(tmp_path, "get", url, "models/model.meta.json", "--rev", f"{ARTIFACT_NAME}@v1.0.0", "-o", "model.meta.json")
    assert read_metadata(tmp_path / "model.keras").model_sha256 == _sha256(tmp_path / "model.keras")


def test_an_unregistered_name_is_refused(published, tmp_path):
    repo, _ = published
    result = dvc(tmp_path, "artifacts", "get", repo.resolve().as_uri(), "no-such-model", check=False)
    assert result.returncode != 0 and "no-such-model" in result.stderr + result.stdout
