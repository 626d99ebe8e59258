"""`glomeruli doctor`: what this machine will run with, told before a long run starts.

The backend, devices and dtype policy the run will use (`backend.local_devices`, `backend.dtype_policy`), the
weights, and the data; where ImageNet weights cannot be had, the offline recipe (`recipes.from_scratch_command`).
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

from glomeruli.core.errors import UserError
from glomeruli.data.layout import MARKER_FILE
from glomeruli.core.params import load_params
from glomeruli.model.recipes import FROM_SCRATCH_MIN_IMAGE_SIZE, from_scratch_command

IMAGENET_WEIGHTS_FILE = "efficientnetb3_notop.h5"


@dataclass(frozen=True)
class Finding:
    topic: str
    value: str
    problem: bool = False  # True: a run with these settings would stop or not do what the user expects


def keras_cache_dir() -> Path:
    """Where Keras downloads weights: $KERAS_HOME/models, else ~/.keras/models."""
    home = os.environ.get("KERAS_HOME") or str(Path("~/.keras").expanduser())
    return Path(home) / "models"


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def diagnose(params_path: Path = Path("params.yaml")) -> list[Finding]:
    findings = [Finding("python", f"{platform.python_version()} ({platform.machine()}, {os.cpu_count()} cores)")]
    try:
        from glomeruli.model import backend
    except UserError as err:
        return findings + [Finding("keras backend", str(err), problem=True)]
    keras = backend.keras
    name = keras.backend.backend()
    library = backend.backend_library_version()
    versions = f"keras {keras.__version__}, {name} {library}"
    if name == "tensorflow":
        builds = [p for p in ("tensorflow", "tensorflow-cpu") if _package_version(p) != "not installed"]
        if len(builds) > 1:
            findings.append(Finding("tensorflow builds", f"both {' and '.join(builds)} are installed: uninstall "
                                    "tensorflow-cpu (pip uninstall tensorflow-cpu)", problem=True))
    findings.append(Finding("keras backend", f"{name} ({versions}); set KERAS_BACKEND to change it"))
    device = backend.accelerator()
    devices = backend.local_devices()
    findings.append(Finding("devices", f"{device}: {', '.join(devices)}"))

    try:
        params = load_params(params_path)
    except UserError as err:
        return findings + [Finding("params", str(err), problem=True)]
    findings.append(Finding("dtype policy", f"{backend.dtype_policy(params.runtime.mixed_precision, device)} "
                            f"(runtime.mixed_precision: {params.runtime.mixed_precision})"))
    deterministic = params.runtime.deterministic
    on = device == "cpu" if deterministic == "auto" else bool(deterministic)
    findings.append(Finding("deterministic ops", f"{'on' if on else 'off'} (runtime.deterministic: {deterministic})"))
    findings.append(Finding("image size", f"{params.preprocess.image_size} px, batch {params.train_frozen.batch_size}"
                            f" / {params.finetune.batch_size} (frozen / fine-tune)"))
    if device == "cpu" and params.preprocess.image_size >= 224:
        findings.append(Finding("speed", f"{params.preprocess.image_size} px on a CPU trains at about 1.5 images/s: "
                                "a full run takes days; use a GPU, or the CPU recipe (README)", problem=True))

    weights = params.model.weights
    cached = keras_cache_dir() / IMAGENET_WEIGHTS_FILE
    if weights == "imagenet":
        if cached.is_file():
            findings.append(Finding("ImageNet weights", f"cached: {cached} ({cached.stat().st_size / 2**20:.0f} MB)"))
        else:
            findings.append(Finding("ImageNet weights", f"not cached ({cached} missing): the first training run "
                                    "downloads them (43 MB); offline, copy the file there by hand, set "
                                    "model.weights to a weights file, or train from scratch with the recipe the "
                                    f"benchmark supports: `{from_scratch_command()}`", problem=True))
    elif weights == "none" and params.preprocess.image_size < FROM_SCRATCH_MIN_IMAGE_SIZE:
        findings.append(Finding("model weights", f"none at {params.preprocess.image_size} px: from scratch below "
                                f"{FROM_SCRATCH_MIN_IMAGE_SIZE} px EfficientNetB3 memorises its training images "
                                f"instead of learning them; the recipe the benchmark supports: `{from_scratch_command()}`",
                                problem=True))
    else:
        findings.append(Finding("model weights", f"{weights} (model.weights)"))

    source = Path(params.data.source)
    if not source.exists():
        findings.append(Finding("data", f"data.source = {source} does not exist: unzip your images there, or "
                                "run `glomeruli use-data PATH`", problem=True))
    elif source.is_dir() and (source / MARKER_FILE).is_file():
        findings.append(Finding("data", f"{source}: synthetic sample data (the demo's); `glomeruli use-data PATH` "
                                "switches to yours"))
    else:
        findings.append(Finding("data", f"{source}"))
    for tool in ("git", "dvc"):
        if shutil.which(tool) is None:
            findings.append(Finding(tool, "not on PATH: activate the project's environment "
                                    "(source .venv/bin/activate)", problem=True))
    return findings


def format_findings(findings: list[Finding]) -> str:
    width = max(len(f.topic) for f in findings)
    return "\n".join(f"{'!!' if f.problem else 'ok'}  {f.topic:<{width}}  {f.value}" for f in findings)
