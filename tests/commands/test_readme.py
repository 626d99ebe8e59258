"""The README's real-data block, run as written on a fresh clone with a small CMIL-style zip."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from badfiles import write_clean_dataset
from glomeruli.data.layout import LABELS_CSV
from project import ROOT, run

pytestmark = pytest.mark.slow
MARKER = "<!-- tests/commands/test_readme.py runs the next block"
# The only lines not run as written. `dvc repro` trains EfficientNetB3 at the committed GPU size (hours on a CPU,
# ImageNet weights from the network): ingest, the stage that reads data/raw, stands in for it.
REPLACED = {"dvc repro": "dvc repro ingest"}


def readme_block() -> list[str]:
    """The bash block after MARKER in README.md, one command a line."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert MARKER in text, "the marker before the README's real-data block is gone"
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER):], re.DOTALL)
    return block.group(1).splitlines()


def fresh_clone(folder: Path) -> Path:
    """A `git clone` of the project's tracked files as they are now: no data/, nothing ignored or untracked."""
    source = folder.parent / "origin"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for relpath in filter(None, tracked.stdout.split("\0")):
        if (ROOT / relpath).is_file():
            (source / relpath).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / relpath, source / relpath)
    run(source.parent, "git", "init", "-q", "-b", "main", str(source))
    run(source, "git", "add", "-A")
    run(source, "git", "commit", "-qm", "project")
    run(folder.parent, "git", "clone", "-q", str(source), str(folder))
    return folder


def installed_environment(folder: Path) -> Path:
    """What `bash scripts/setup.sh` leaves, without the network: this session's packages, and a `glomeruli` command
    made from pyproject.toml's entry point (the session's own may have been installed from an older checkout)."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["glomeruli"].split(":")
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "activate").write_text(f'source "{Path(sys.executable).parent}/activate"\n'
                                             f'PATH="{folder / "bin"}:$PATH"\n')
    command = folder / "bin" / "glomeruli"
    command.write_text(f'#!/bin/sh\nexec python -c "import sys; from {module} import {function}; '
                       f'sys.exit({function}())" "$@"\n')
    command.chmod(0o755)
    return folder


def cmil_zip(path: Path) -> int:
    """A zip laid out as the CMIL download: one wrapper folder, the two class folders and public.csv."""
    wrapper = path.parent / "zip-contents" / "glomeruli"
    files = write_clean_dataset(wrapper, per_class=4)
    (wrapper / LABELS_CSV).write_text("name,ground truth\n" + "".join(
        f"{Path(relpath).name},{1 if relpath.startswith('globally') else 0}\n" for relpath in files))
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(wrapper.rglob("*")):
            archive.write(file, file.relative_to(wrapper.parent))
    return len(files)


def test_the_real_data_block_runs_as_written_on_a_fresh_clone(tmp_path):
    lines = readme_block()
    assert set(REPLACED) <= {line.strip() for line in lines}, f"a replaced line is no longer in the block: {lines}"
    script = "\n".join(REPLACED.get(line.strip(), line) for line in lines)
    repo = fresh_clone(tmp_path / "project")
    (repo / ".venv").symlink_to(installed_environment(tmp_path / "venv"))  # linked: setup.sh uses it as it is
    n_images = cmil_zip(repo / "glomeruli.zip")

    result = run(repo, "bash", "-euo", "pipefail", "-c", script, check=False)
    assert result.returncode == 0, f"{script}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert "absl::InitializeLog" not in result.stderr and "oneDNN" not in result.stderr  # quiet logs (test_logs.py)

    manifest = (repo / "data" / "interim" / "manifest.csv").read_text().splitlines()
    assert len(manifest) == 1 + n_images  # every image of the zip, found where the block put it
    staged = run(repo, "git", "diff", "--cached", "--name-only").stdout.split()
    assert "data/raw.dvc" in staged
