"""Atomic outputs never destroy what stands at their path: a file output refuses a folder, and a symlink
at its path is replaced itself, never written through."""

from __future__ import annotations

import os

import pytest

from glomeruli.commands import cli
from glomeruli.core.atomic import OutputPathError, atomic_path, write_json, write_text
from glomeruli.core.errors import UserError


def _precious_folder(path):
    path.mkdir()
    (path / "years_of_work.txt").write_text("irreplaceable")
    return path


@pytest.mark.parametrize("writer", [lambda p: write_json(p, {"a": 1}), lambda p: write_text(p, "x")],
                         ids=["write_json", "write_text"])
def test_a_file_output_refuses_a_folder_at_its_path(tmp_path, writer):
    precious = _precious_folder(tmp_path / "precious")
    with pytest.raises(OutputPathError) as refused:
        writer(precious)
    message = str(refused.value)
    assert isinstance(refused.value, UserError) and "\n" not in message
    assert str(precious) in message and "folder" in message and "another" in message
    assert (precious / "years_of_work.txt").read_text() == "irreplaceable"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]  # no temporary left behind


def test_a_file_output_refuses_a_symlink_to_a_folder(tmp_path):
    precious = _precious_folder(tmp_path / "precious")
    (tmp_path / "link").symlink_to(precious, target_is_directory=True)
    with pytest.raises(OutputPathError, match="link"):
        write_json(tmp_path / "link", {"a": 1})
    assert (tmp_path / "link").is_symlink() and (precious / "years_of_work.txt").read_text() == "irreplaceable"


def test_a_file_written_in_atomic_path_refuses_a_folder_before_the_rename(tmp_path):
    precious = _precious_folder(tmp_path / "precious")
    with pytest.raises(OutputPathError):
        with atomic_path(precious) as tmp:
            tmp.write_text("result")
    assert (precious / "years_of_work.txt").read_text() == "irreplaceable"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_a_symlink_at_a_file_output_is_replaced_never_written_through(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "victim.json"
    target.write_text("keep me")
    project = tmp_path / "project"
    project.mkdir()
    (project / "out.json").symlink_to(target)
    write_json(project / "out.json", {"a": 1})
    assert target.read_text() == "keep me"
    assert not (project / "out.json").is_symlink() and (project / "out.json").read_text() == '{\n  "a": 1\n}\n'


def test_a_folder_output_replaces_its_own_folder(tmp_path):
    out = tmp_path / "plots"
    out.mkdir()
    (out / "old.csv").write_text("old")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "new.csv").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.csv"]


def test_a_folder_output_replaces_a_symlink_not_its_target(tmp_path):
    elsewhere = _precious_folder(tmp_path / "elsewhere")
    (tmp_path / "plots").symlink_to(elsewhere, target_is_directory=True)
    with atomic_path(tmp_path / "plots") as tmp:
        tmp.mkdir()
        (tmp / "new.csv").write_text("new")
    assert not (tmp_path / "plots").is_symlink() and (tmp_path / "plots" / "new.csv").read_text() == "new"
    assert (elsewhere / "years_of_work.txt").read_text() == "irreplaceable"


def test_a_folder_output_refuses_a_file_at_its_path(tmp_path):
    (tmp_path / "plots").write_text("a file of the user's")
    with pytest.raises(OutputPathError, match="plots"):
        with atomic_path(tmp_path / "plots") as tmp:
            tmp.mkdir()
    assert (tmp_path / "plots").read_text() == "a file of the user's"


def test_only_our_own_temporaries_are_cleaned_up(tmp_path):
    out = tmp_path / "summary.json"
    ours = tmp_path / f".summary.tmp-{os.getpid() + 1}.json"
    ours.write_text("left by a killed run")
    theirs = tmp_path / ".summary.tmp-notes.json"
    theirs.write_text("a user's file that only looks like one")
    write_json(out, {})
    assert not ours.exists() and theirs.read_text() == "a user's file that only looks like one"


def test_cv_summary_into_an_existing_folder_keeps_it(tmp_path, monkeypatch, capfd):
    from cvruns import write_run

    monkeypatch.chdir(tmp_path)
    folds = [str(write_run(tmp_path / f"f{k}", k)) for k in range(3)]
    precious = _precious_folder(tmp_path / "precious")
    assert cli.main(["cv-summary", *folds, "-o", str(precious)]) == 1
    err = capfd.readouterr().err
    assert [line for line in err.splitlines() if "precious" in line and "folder" in line], err
    assert "Traceback" not in err and (precious / "years_of_work.txt").read_text() == "irreplaceable"
