"""The package modules a stage runs, read from the import statements of its script (transitively).

`dvc.yaml` declares each stage's code dependencies and `training.py`'s resume key hashes them; both take
them from here (the test in tests/core/test_stage_deps.py checks dvc.yaml against this walk), so a module a
stage reaches cannot be left out by hand.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "glomeruli"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
PROJECT_ROOT = PACKAGE_DIR.parents[1]  # src layout: <root>/src/glomeruli
STAGES_DIR = PROJECT_ROOT / "stages"

# Modules stages reach that cannot change any output: they name, log or refuse, and compute nothing a stage
# writes. dvc.yaml leaves them out, so editing one reruns nothing. Anything that computes, formats or writes
# output bytes does not belong here: not atomic.py (its write_json lays out the JSON outputs), and not params.py,
# which turns params.yaml into the values stages use (preprocess.fill 0 into (0, 0, 0)) and holds the
# params' bounds.
CANNOT_CHANGE_OUTPUTS = frozenset({
    "core/stagekit.py",  # --params, logging set-up, a user error as one line and exit code 1
    "core/logs.py",  # log format and progress lines (progress() hands every item through unchanged)
    "core/errors.py",  # the UserError base class
    "core/paths.py",  # output paths, repeated as dvc.yaml's outs: a change there fails the stage, it cannot alter an output
})


def stage_script(stage: str) -> Path:
    """stages/<stage>.py of this checkout."""
    return STAGES_DIR / f"{stage}.py"


def package_modules(script: Path) -> list[str]:
    """Every package module `script` imports, directly or through other package modules, as sorted
    `src/glomeruli/<module>.py` paths (relative to the project root, as dvc.yaml writes them).

    Imports anywhere count, late ones inside functions included. The package's `__init__.py` counts only
    when a name is imported from it (`from glomeruli import __version__`); modules loaded by name at run
    time (importlib) are invisible to this walk, and the package loads none.
    """
    seen: set[Path] = set()
    pending = [Path(script).resolve()]
    while pending:
        path = pending.pop()
        for module in _imported_modules(path):
            if module not in seen:
                seen.add(module)
                pending.append(module)
    return sorted(str(m.relative_to(PROJECT_ROOT)) for m in seen)


def output_modules(script: Path) -> list[str]:
    """The package modules that can shape the outputs of `script`: its walk less CANNOT_CHANGE_OUTPUTS.
    dvc.yaml lists exactly these in the stage's deps."""
    package = PACKAGE_DIR.relative_to(PROJECT_ROOT)
    return [m for m in package_modules(script) if str(Path(m).relative_to(package)) not in CANNOT_CHANGE_OUTPUTS]


def stage_code(*stages: str) -> list[Path]:
    """The files whose content can change what `stages` write, as their dvc.yaml deps list them: each stage
    script and its output_modules (for keys that must change whenever DVC would rerun the stage)."""
    files = {stage_script(s) for s in stages}
    files |= {PROJECT_ROOT / m for s in stages for m in output_modules(stage_script(s))}
    return sorted(files)


def _imported_modules(path: Path) -> set[Path]:
    """The package module files one file imports (not their imports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[Path] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found |= _files_of(alias.name, names=())
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, path)
            if base is not None:
                found |= _files_of(base, names=tuple(alias.name for alias in node.names))
    return found


def _absolute(node: ast.ImportFrom, path: Path) -> str | None:
    """The dotted module an ImportFrom reads from, relative imports resolved inside the package."""
    if node.level == 0:
        return node.module
    try:
        parts = list(path.resolve().relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    except ValueError:
        return None  # a relative import outside the package: not ours
    if path.name != "__init__.py":
        parts = parts[:-1]
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _files_of(dotted: str, names: tuple[str, ...]) -> set[Path]:
    """Files of package module `dotted`; with `names` (a from-import), those that are submodules instead of
    the package's `__init__.py` when the module is a package."""
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return set()
    target = PACKAGE_DIR.joinpath(*parts[1:])
    if target.is_dir():
        submodules = {f for f in (_module_file(target / n) for n in names) if f is not None}
        attributes = [n for n in names if _module_file(target / n) is None]
        if names and not attributes:
            return submodules
        return submodules | {target / "__init__.py"}
    module = _module_file(target)
    if module is None:
        raise FileNotFoundError(f"{dotted} is imported but {target}.py does not exist")
    return {module}


def _module_file(target: Path) -> Path | None:
    if target.with_suffix(".py").is_file():
        return target.with_suffix(".py")
    if (target / "__init__.py").is_file():
        return target / "__init__.py"
    return None
