"""core.vcs against real git and dvc in a throwaway repository."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glomeruli.core.errors import UserError
from glomeruli.core.vcs import CommandError, git_show, git_show_or_none, run_dvc, run_git


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A git repository with two commits of notes.txt: "first\\n", then "second\\n"."""
    for key in ("GIT_AUTHOR", "GIT_COMMITTER"):
        monkeypatch.setenv(f"{key}_NAME", "ci")
        monkeypatch.setenv(f"{key}_EMAIL", "ci@localhost")
    run_git(["init", "-q", "-b", "main"], tmp_path)
    for text in ("first\n", "second\n"):
        (tmp_path / "notes.txt").write_text(text)
        run_git(["add", "notes.txt"], tmp_path)
        run_git(["commit", "-qm", text.strip()], tmp_path)
    return tmp_path


def test_run_git_returns_its_output(repo):
    assert run_git(["log", "--format=%s"], repo) == "second\nfirst\n"
    assert run_git(["rev-parse", "--abbrev-ref", "HEAD"], repo) == "main\n"


def test_git_show_reads_a_file_at_a_revision(repo):
    assert git_show("HEAD", "notes.txt", repo) == "second\n"
    assert git_show("HEAD~1", "notes.txt", repo) == "first\n"
    assert git_show_or_none("HEAD~1", "notes.txt", repo) == "first\n"


def test_a_failing_command_names_itself_its_folder_and_its_message(repo):
    with pytest.raises(CommandError) as caught:
        git_show("HEAD", "absent.txt", repo)
    err = caught.value
    assert isinstance(err, UserError) and err.returncode == 128 and err.cwd == repo
    assert err.command == "git show HEAD:absent.txt"
    assert "absent.txt" in err.stderr and "does not exist" in err.stderr
    assert str(err).startswith(f"`git show HEAD:absent.txt` failed in {repo} (exit 128): fatal: ")


def test_git_show_or_none_is_none_for_a_missing_file_revision_or_repository(repo, tmp_path_factory):
    assert git_show_or_none("HEAD", "absent.txt", repo) is None
    assert git_show_or_none("no-such-branch", "notes.txt", repo) is None
    assert git_show_or_none("HEAD", "notes.txt", tmp_path_factory.mktemp("not_a_repo")) is None


def test_run_dvc_runs_this_environments_dvc(repo, monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    run_dvc(["init", "-q"], repo)
    assert (repo / ".dvc").is_dir()
    assert json.loads(run_dvc(["params", "diff", "--json"], repo) or "{}") == {}
    with pytest.raises(CommandError, match=r"^`dvc repro no_such_stage` failed in .* \(exit [1-9]\d*\): "):
        run_dvc(["repro", "no_such_stage"], repo)
