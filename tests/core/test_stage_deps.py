"""dvc.yaml against the code: every package module a stage's script reaches through its imports is one of the
stage's deps (or cannot change outputs), and every package module a stage lists is one it reaches."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from glomeruli.core.stage_deps import CANNOT_CHANGE_OUTPUTS, PACKAGE_DIR, package_modules

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _script(stage: dict) -> Path:
    command = stage["cmd"].split()
    assert command[:1] == ["python"] and command[1].startswith("stages/"), stage["cmd"]
    return ROOT / command[1]


def _declared_modules(stage: dict) -> set[str]:
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]]
    return {d for d in deps if d.startswith("src/glomeruli/")}


@pytest.mark.parametrize("name", list(PIPELINE))
def test_every_module_a_stage_runs_is_a_declared_dep(name):
    stage = PIPELINE[name]
    reached = package_modules(_script(stage))
    missing = [m for m in reached if m not in _declared_modules(stage) and m.removeprefix("src/glomeruli/") not in CANNOT_CHANGE_OUTPUTS]
    assert not missing, (f"stage {name}: {_script(stage).relative_to(ROOT)} imports {', '.join(missing)} "
                         "(directly or through other package modules): list each in the stage's deps in dvc.yaml")


@pytest.mark.parametrize("name", list(PIPELINE))
def test_every_declared_module_is_one_the_stage_runs(name):
    stage = PIPELINE[name]
    reached = set(package_modules(_script(stage)))
    unused = sorted(_declared_modules(stage) - reached)
    assert not unused, (f"stage {name}: dvc.yaml lists {', '.join(unused)}, which "
                        f"{_script(stage).relative_to(ROOT)} never imports; drop it from the stage's deps")


@pytest.mark.parametrize("name", list(PIPELINE))
def test_a_stage_lists_its_own_script(name):
    stage = PIPELINE[name]
    assert str(_script(stage).relative_to(ROOT)) in stage["deps"]


def test_the_allow_list_names_modules_that_exist():
    assert CANNOT_CHANGE_OUTPUTS == {"core/stagekit.py", "core/logs.py", "core/errors.py", "core/paths.py"}
    for name in CANNOT_CHANGE_OUTPUTS:
        assert (PACKAGE_DIR / name).is_file(), name


def test_the_walk_follows_late_package_and_transitive_imports(tmp_path):
    """Written-out expectation: backend.py imports errors.py and nothing else of the package; paths.py and
    logs.py import nothing of it."""
    script = tmp_path / "stage.py"
    script.write_text("import os\n"
                      "import glomeruli.core.paths as where\n"
                      "from glomeruli.core import logs\nfrom glomeruli import __version__\n\n"
                      "def main():\n"
                      "    from glomeruli.model.backend import configure\n")
    assert package_modules(script) == ["src/glomeruli/__init__.py", "src/glomeruli/core/errors.py", "src/glomeruli/core/logs.py",
                                       "src/glomeruli/core/paths.py", "src/glomeruli/model/backend.py"]


def test_the_walk_refuses_a_package_module_that_does_not_exist(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text("from glomeruli.no_such_module import thing\n")
    with pytest.raises(FileNotFoundError, match="glomeruli.no_such_module"):
        package_modules(script)


def test_no_stage_reaches_the_sample_data_generator():
    """Editing the synthetic image generator must rerun nothing of a pipeline over real data."""
    for name, stage in PIPELINE.items():
        assert "src/glomeruli/data/sample_data.py" not in package_modules(_script(stage)), name
