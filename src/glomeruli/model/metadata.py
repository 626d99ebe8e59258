"""What travels with a trained model: input size, padding, threshold, class names, calibration temperature and
the dataset layout it was trained on (models/model.meta.json).

Written by the evaluate stage (threshold chosen and temperature fitted on validation), beside the model with the
model file's sha256; `glomeruli predict` checks that checksum and applies the rest, and needs nothing else (no
params.yaml). `dataset_layout` holds `ingest.class_dirs`, `ingest.labels_csv` and `ingest.group_regex` (params of
the evaluate stage), so predict reads a labelled folder as ingest read the training data; metadata without it is
read in the CMIL layout, with a warning naming the file. `glomeruli recalibrate` writes new metadata for the
same model (`predict --meta`), and an ONNX export's contract is parsed by the same `parse_metadata` checks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from glomeruli.core.atomic import write_json
from glomeruli.core.errors import UserError
from glomeruli.data.stain import NO_NORMALIZATION, StainNormalization

CLASS_NAMES = ("non_globally_sclerotic", "globally_sclerotic")  # index = label


class MetadataError(UserError, ValueError):
    """Missing or inconsistent model metadata."""


@dataclass(frozen=True)
class DatasetLayout:
    """The ingest settings that say how a labelled folder is laid out (ingest.class_dirs, ingest.labels_csv,
    ingest.group_regex): `glomeruli predict` reads a labelled folder with them, as training read its data."""

    class_dirs: dict[str, int]  # class folder name -> label
    labels_csv: str | None      # the labels file, `name,ground truth`
    group_regex: str            # the biopsy id in a file name (named group `group`)


@dataclass(frozen=True)
class ModelMetadata:
    image_size: int
    fill: tuple[int, int, int]
    threshold: float
    threshold_rule: str
    class_names: tuple[str, str]
    model_sha256: str
    max_pixels: int
    # probabilities = sigmoid(logit / temperature), fitted on validation (1.0: uncalibrated; metadata
    # written before calibration existed reads as 1.0)
    temperature: float = 1.0
    # None: not recorded (metadata written before it travelled); predict then says which layout it assumes
    dataset_layout: DatasetLayout | None = None
    # the stain normalisation of preprocess and its reference: predict applies this one ("none" when written before)
    stain_normalization: StainNormalization = NO_NORMALIZATION
    # None: the temperature and threshold are evaluate's. Else `glomeruli recalibrate`'s record of the labelled
    # folder they were refitted on (date, counts, old and new values, metrics with intervals); JSON as written
    recalibration: dict | None = None


def metadata_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name.removesuffix(".keras") + ".meta.json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_metadata(model_path: Path, meta: ModelMetadata, path: Path | None = None) -> None:
    """Write `meta` to `path` (default: the model's own, `metadata_path`), atomically."""
    write_json(metadata_path(model_path) if path is None else path, asdict(meta))


def read_metadata(model_path: Path, path: Path | None = None, *, model_sha256: str | None = None) -> ModelMetadata:
    """Metadata of `model_path` from `path` (default: `metadata_path`, the evaluate stage's), refused when
    missing, incomplete or written for another model file. `model_sha256`: the Keras model the metadata must
    have been written for, where `model_path` is not that file itself (an ONNX export records the checksum of
    the Keras model it came from)."""
    own = path is None
    path = metadata_path(model_path) if own else path
    # the way out: the evaluate stage writes the model's own metadata, `glomeruli recalibrate` any other
    fix = ("rerun `dvc repro evaluate`" if own else
           f"pass the metadata written for {model_path} (`glomeruli recalibrate ... --model {model_path}` writes one)")
    if not path.is_file():
        if own:
            raise MetadataError(f"{path} not found: the evaluate stage writes it beside {model_path.name} "
                                "(run `dvc repro evaluate`); a model without it has no validated threshold")
        raise MetadataError(f"{path} not found (--meta): {fix}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise MetadataError(f"{path} is incomplete or malformed ({err}); {fix}") from err
    meta = parse_metadata(raw, str(path), fix)
    expected = file_sha256(model_path) if model_sha256 is None else model_sha256
    if meta.model_sha256 != expected:
        raise MetadataError(f"{path} was written for another version of {model_path.name} (checksum differs); "
                            f"{fix} so threshold and model match")
    return meta


def parse_metadata(raw: dict, source: str, fix: str) -> ModelMetadata:
    """ModelMetadata from its JSON form (model.meta.json, or an ONNX export's contract), checked; `source` and
    `fix` name the file and the way out in the error."""
    try:
        meta = ModelMetadata(image_size=int(raw["image_size"]), fill=tuple(int(c) for c in raw["fill"]),
                             threshold=float(raw["threshold"]), threshold_rule=str(raw["threshold_rule"]),
                             class_names=tuple(raw["class_names"]), model_sha256=str(raw["model_sha256"]),
                             max_pixels=int(raw["max_pixels"]), temperature=float(raw.get("temperature", 1.0)),
                             dataset_layout=_dataset_layout(raw.get("dataset_layout")),
                             stain_normalization=StainNormalization.from_json(
                                 raw.get("stain_normalization", NO_NORMALIZATION.to_json())),
                             recalibration=_recalibration(raw.get("recalibration")))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise MetadataError(f"{source} is incomplete or malformed ({err}); {fix}") from err
    if (not 0.0 <= meta.threshold <= 1.0 or len(meta.fill) != 3 or len(meta.class_names) != 2
            or not meta.temperature > 0):
        raise MetadataError(f"{source} holds impossible values (threshold {meta.threshold}, fill {meta.fill}, "
                            f"class names {meta.class_names}, temperature {meta.temperature}); {fix}")
    if meta.class_names != CLASS_NAMES:
        raise MetadataError(f"{source} names classes {meta.class_names}, expected {CLASS_NAMES}")
    return meta


def _recalibration(raw: object) -> dict | None:
    if raw is not None and not isinstance(raw, dict):
        raise ValueError(f"recalibration is {type(raw).__name__}, expected an object or null")
    return raw


def _dataset_layout(raw: dict | None) -> DatasetLayout | None:
    if raw is None:
        return None
    class_dirs = {str(folder): int(label) for folder, label in raw["class_dirs"].items()}
    labels_csv, group_regex = raw["labels_csv"], raw["group_regex"]
    if (sorted(class_dirs.values()) != [0, 1] or not (labels_csv is None or isinstance(labels_csv, str))
            or not isinstance(group_regex, str)):
        raise ValueError(f"dataset_layout {raw} is not two class folders labelled 0 and 1, a labels file name "
                         "or null, and a regular expression")
    return DatasetLayout(class_dirs=class_dirs, labels_csv=labels_csv, group_regex=group_regex)
