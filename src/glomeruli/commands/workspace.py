"""The user's project as a whole: the CPU demo on synthetic data, and the one step from the demo to real data.

The demo keeps its images in `data/sample/` (never in `data/raw/`, which is only ever the user's data),
tracks them with DVC and stages what a queued experiment needs (`dvc exp run --queue` copies the git
HEAD plus staged and modified files, nothing untracked). `use_data` undoes all of it: committed params
and lock, no pipeline outputs, the sample data untracked, `data.source` pointing at the user's images.

`run_demo` (`scripts/demo.sh`) runs all stages with `dvc exp run -S` and `CPU_OVERRIDES`, visibly in
`git diff params.yaml`. The offline from-scratch recipe lives in `model.recipes`.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from glomeruli.core.errors import UserError
from glomeruli.core.vcs import CommandError, git_show_or_none, run_dvc, run_git
from glomeruli.data.layout import MARKER_FILE, SYNTHETIC_SITE_REGEX
from glomeruli.core.params import load_params
from glomeruli.core.paths import CHECKPOINTS
from glomeruli.data.sample_data import generate_sample_dataset

log = logging.getLogger(__name__)

SAMPLE_DIR = Path("data/sample")
# The demo's sample comes from three synthetic hospitals (own stain, scanner and share of sclerotic glomeruli), so
# evaluate.json shows `by_site` and metrics/plots/by_site.png the per-site ROC curves, as a multi-site cohort would.
DEMO_SITES = 3
# What the demo changes in params.yaml so that all eight stages finish in minutes on a 2-core CPU.
# The GPU defaults in params.yaml stay what a real run wants.
CPU_OVERRIDES = {
    "data.source": str(SAMPLE_DIR),
    "ingest.site_regex": f"'{SYNTHETIC_SITE_REGEX}'",  # quoted: `dvc exp run -S` parses the value (Hydra grammar)
    "preprocess.image_size": 128,
    "model.weights": "none",
    "train_frozen.epochs": 30,
    "train_frozen.lr": 0.003,
    "train_frozen.patience": 6,
    # No fine-tuning: on a random base at 128 px no epoch beats the frozen model, which the stage then hands back.
    "finetune.epochs": 0,
    "runtime.memory_budget_gb": 2,
}
# What a queued experiment needs from the demo's run, staged so that DVC's copy carries it: the lock,
# the .dvc file of the sample data, the small git-kept outputs (metrics, plots, model metadata) and the
# .gitignore files DVC wrote (the large outputs themselves are DVC-cached and ignored by git).
DEMO_STAGED = ("dvc.lock", "data", "metrics", "models")


class WorkspaceError(UserError, RuntimeError):
    """The project is not in a state where this step can run (no git, no DVC, wrong folder)."""


@dataclass(frozen=True)
class DemoSettings:
    n_images: int = 400
    seed: int = 0
    difficulty: float = 0.3
    n_sites: int = DEMO_SITES
    overrides: tuple[tuple[str, object], ...] = tuple(CPU_OVERRIDES.items())


def _require_project(root: Path) -> None:
    if not (root / "dvc.yaml").is_file() or not (root / "params.yaml").is_file():
        raise WorkspaceError(f"{root.resolve()} holds no dvc.yaml and params.yaml: run this from the project root")
    try:
        run_git(["rev-parse", "--verify", "-q", "HEAD"], root)
    except CommandError:
        raise WorkspaceError("this folder is not a git checkout with a commit: clone the project with git "
                             "(DVC experiments are git commits)") from None
    if not (root / ".dvc").is_dir():
        raise WorkspaceError("no .dvc folder here: run `dvc init` (or clone the project again)")


def run_demo(settings: DemoSettings = DemoSettings(), *, root: Path = Path(".")) -> None:
    """Synthetic data in data/sample, all eight stages with the CPU overrides, ready for the queue."""
    _require_project(root)
    generate_sample_dataset(root / SAMPLE_DIR, settings.n_images, seed=settings.seed,
                            difficulty=settings.difficulty, n_sites=settings.n_sites, workers=0)
    # Tracked by DVC and staged: a queued experiment then finds the images in its copy of the project.
    run_dvc(["add", "-q", str(SAMPLE_DIR)], root)
    run_git(["add", "data/sample.dvc", "data/.gitignore"], root)
    name = f"cpu-demo-{time.strftime('%Y%m%d-%H%M%S')}"
    args = ["exp", "run", "--name", name]
    for key, value in settings.overrides:
        args += ["-S", f"{key}={value}"]
    log.info("running all eight stages on the CPU: dvc %s", " ".join(args))
    run_dvc(args, root, capture=False)  # the stages' log goes to the terminal as it comes
    present = [p for p in DEMO_STAGED if (root / p).exists()]
    run_git(["add", *present], root)
    log.info("staged for queued experiments (not committed): %s", ", ".join(present))


def _declared_outputs(root: Path) -> list[Path]:
    """The `outs:` of dvc.yaml, each refused unless it lies inside the project: they are about to be deleted.

    Where an output is a symlink (DVC's `cache.type: symlink`, perhaps into a cache outside the project), the
    link lies inside and is what gets deleted, never its target; a symlinked folder above it is resolved.
    """
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    project = root.resolve()
    outs = []
    for stage_name, stage in pipeline["stages"].items():
        for out in stage.get("outs", []):
            declared = out if isinstance(out, str) else next(iter(out))
            path = root / declared
            where = path.parent.resolve() / path.name
            if path.name in ("", ".", "..") or where == project or not where.is_relative_to(project):
                raise WorkspaceError(f"dvc.yaml: stage {stage_name}'s output {declared!r} lies outside the project "
                                     f"({where}); use-data deletes the outputs it declares and deletes nothing "
                                     "outside the project: declare outputs inside it, then rerun")
            outs.append(path)
    return outs


def set_data_source(params_path: Path, source: str) -> None:
    """Rewrite `data.source` in place, keeping every comment and the layout of params.yaml."""
    text = params_path.read_text(encoding="utf-8")
    pattern = re.compile(r"^(data:\s*\n(?:[ \t]*#.*\n)*[ \t]+source:[ \t]*)(\S+|'[^']*'|\"[^\"]*\")", re.M)
    if not pattern.search(text):
        raise WorkspaceError(f"{params_path}: no `data:` section with a `source:` line to set; add one")
    params_path.write_text(pattern.sub(lambda m: m.group(1) + yaml.safe_dump(source).splitlines()[0], text, count=1),
                           encoding="utf-8")


def use_data(source: Path, *, root: Path = Path(".")) -> list[str]:
    """Reset what the demo changed and point the pipeline at the user's images; returns what was done."""
    _require_project(root)
    if not source.exists():
        raise WorkspaceError(f"{source} does not exist: unzip your images there first (the class folders and "
                             "public.csv), or give the path of your .zip")
    if source.is_dir() and (source / MARKER_FILE).is_file():
        raise WorkspaceError(f"{source} holds {MARKER_FILE}: it is synthetic sample data, not yours. Put your "
                             "own images in their own folder (e.g. data/raw) and name that folder")
    outputs = _declared_outputs(root)  # all checked before anything changes
    done = []
    params_text = git_show_or_none("HEAD", "params.yaml", root)
    if params_text is None:
        raise WorkspaceError("params.yaml is not committed: commit the project's params.yaml first")
    if (root / "params.yaml").read_text(encoding="utf-8") != params_text:
        (root / "params.yaml").write_text(params_text, encoding="utf-8")
        done.append("params.yaml restored to the committed defaults (the demo's CPU overrides removed)")
    try:
        run_git(["reset", "-q", "--", *DEMO_STAGED], root)  # unstage what the demo staged
    except CommandError as err:  # unstaging only tidies the index: the files themselves are reset below
        log.debug("%s", err)
    lock_text = git_show_or_none("HEAD", "dvc.lock", root)
    if lock_text is not None:
        (root / "dvc.lock").write_text(lock_text, encoding="utf-8")
        done.append("dvc.lock restored to the committed one")
    elif (root / "dvc.lock").exists():
        (root / "dvc.lock").unlink()
        done.append("dvc.lock removed (the demo's run)")
    removed = []
    for out in outputs:
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
            removed.append(str(out.relative_to(root)))
        elif out.is_symlink() or out.exists():
            out.unlink()  # a symlink goes, its target stays
            removed.append(str(out.relative_to(root)))
    shutil.rmtree(root / CHECKPOINTS.parent, ignore_errors=True)
    if removed:
        done.append(f"pipeline outputs removed: {', '.join(removed)}")
    if (root / "data" / "sample.dvc").exists():
        run_dvc(["remove", "-q", "data/sample.dvc"], root)
        done.append("data/sample untracked by DVC")
    if (root / SAMPLE_DIR).exists():
        shutil.rmtree(root / SAMPLE_DIR)
        done.append("data/sample (synthetic images) deleted; `bash scripts/demo.sh` makes it again")
    relative = source.resolve().relative_to(root.resolve()) if source.resolve().is_relative_to(root.resolve()) else source
    if load_params(root / "params.yaml").data.source != str(relative):
        set_data_source(root / "params.yaml", str(relative))
        done.append(f"data.source set to {relative}")
    return done
