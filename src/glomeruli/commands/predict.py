"""Predict on a folder of images: same preprocessing as training, decoding overlapped with inference.

The model is a Keras file (models/model.keras, with its model.meta.json) or its ONNX export
(models/export/model.onnx, carrying its own contract), run on onnxruntime: that path imports neither TensorFlow,
JAX nor Keras, so Keras is only ever imported late, inside `KerasModel`.

A folder in the training layout (class folders, and/or a `name,ground truth` labels file) is also
scored: the evaluate stage's metrics and confusion matrix, against the labels ingest would give its images
(`ingest.label_files`, in the layout recorded in the model's metadata).

The runtime follows the model's suffix (`load_predictor`: `OnnxModel` or `KerasModel`, one interface); with an
ONNX file the metadata is the file's own contract, or `--meta` checked against the Keras checksum the contract
records. No params.yaml is read: metadata without `dataset_layout` reads a labelled folder in the CMIL layout,
with a warning naming the file. Decoding runs in its own small pool (`_decoded_batches`), not
`parallel.ordered_map`: whole batches are decoded ahead of the model at lower priority, and unreadable files come
back as skips instead of stopping the run.
"""

from __future__ import annotations

import csv
import math
import os
import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glomeruli.core.atomic import atomic_path, write_json
from glomeruli.evaluation.burden import BiopsyBurden, biopsy_burden
from glomeruli.evaluation.calibration import apply_temperature
from glomeruli.evaluation.outputs import Metric
from glomeruli.core.csvcells import spreadsheet_safe
from glomeruli.core.errors import UserError
from glomeruli.data.images import ImageError, load_model_input
from glomeruli.data.ingest import Labelling, LabelsCsv, compile_group_regex, group_of, label_files, parse_labels_csv
from glomeruli.data.layout import CMIL_GROUP_REGEX, LABELS_CSV, MARKER_FILE, NON_SCLEROTIC_DIR, SCLEROTIC_DIR
from glomeruli.core.logs import progress
from glomeruli.model.metadata import DatasetLayout, ModelMetadata, metadata_path, read_metadata
from glomeruli.model.onnxmodel import OnnxModel, is_onnx
from glomeruli.core.parallel import WorkerDied, process_context, resolve_workers
from glomeruli.data.sources import (RefusedFileError, folder_wrapper, image_max_bytes, junk_reason, list_entries,
                               read_file, read_labels_file)
from glomeruli.data.stain import StainNormalization

log = logging.getLogger(__name__)
_FIRST_SHOWN = 5


class PredictError(UserError, ValueError):
    """The folder cannot be predicted as asked (subfolders without --recursive, nothing predictable)."""


@dataclass(frozen=True)
class Prediction:
    name: str
    label: int
    probability: float


@dataclass(frozen=True)
class Skip:
    name: str
    reason: str


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Every file of `folder` (with `recursive`, of its subfolders too), sorted by `image_name`.

    Hidden files and OS junk (`.DS_Store`, `__MACOSX/`...) are left out, as ingest leaves them out;
    everything else is listed, pipes and devices included, so that `_decode` skips each with its reason.
    Without `recursive`, a folder with subfolders is refused by name.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of images")
    if not recursive:
        subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and not junk_reason(p.name))
        if subfolders:
            shown = ", ".join(f"{name}/" for name in subfolders[:_FIRST_SHOWN])
            more = f" and {len(subfolders) - _FIRST_SHOWN} more" if len(subfolders) > _FIRST_SHOWN else ""
            raise PredictError(f"{folder} has subfolders ({shown}{more}): pass --recursive to predict on the images "
                               f"in them too (named by their path inside {folder}), or point at one of them")
        return sorted(p for p in folder.iterdir() if not p.is_dir() and not junk_reason(p.name))
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not junk_reason(d)]
        files += [Path(dirpath, name) for name in filenames if not junk_reason(name)]
    return sorted(files, key=lambda path: image_name(folder, path))


def image_name(folder: Path, path: Path) -> str:
    """How an image is named in the output: its posix path inside the folder (`x.png`, `class/x.png`)."""
    return path.relative_to(folder).as_posix()


def _init_decoder() -> None:
    # Below the model's priority: where the model runs on the CPU, decoding takes the moments it leaves
    # idle instead of stalling its threads, so the forward pass keeps its pace.
    if hasattr(os, "nice"):  # not on Windows
        os.nice(10)


def _decode(args: tuple[Path, int, tuple[int, int, int], int, StainNormalization]) -> np.ndarray | Skip:
    path, size, fill, max_pixels, stain = args
    try:
        # sources' one capped read: a pipe or device is refused unread, a file larger than any image is too
        data = read_file(path, image_max_bytes(max_pixels), name=path.name)
        return load_model_input(data, path.name, size, fill, max_pixels, stain)
    except (ImageError, RefusedFileError, OSError) as err:
        return Skip(path.name, str(err))


def _decoded_batches(pool: ProcessPoolExecutor, files: list[Path], meta: ModelMetadata,
                     batch_size: int) -> Iterator[list]:
    """Batches of decoded images; the pool decodes batch i+1 while the caller runs the model on batch i.

    The first batches are submitted on the call, not on the first `next`: they decode while the caller
    loads the model.
    """
    # The model's own preprocessing, stain normalisation and its reference included (models/model.meta.json).
    jobs = [(p, meta.image_size, meta.fill, meta.max_pixels, meta.stain_normalization) for p in files]
    batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]

    def submit(batch: list) -> list[Future]:
        return [pool.submit(_decode, job) for job in batch]

    ahead = 2  # batches decoded ahead: low-priority decoders get slack to use the model's idle moments
    pending = deque(submit(batch) for batch in batches[:ahead])

    def ready_batches() -> Iterator[list]:
        for i in range(len(batches)):
            ready = [future.result() for future in pending.popleft()]
            if i + ahead < len(batches):
                pending.append(submit(batches[i + ahead]))
            yield ready

    return ready_batches()


class KerasModel:
    """A .keras model behind the interface OnnxModel has (image_size, predict_batch)."""

    def __init__(self, path: Path):
        from glomeruli.model.efficientnet import load_model  # late: predicting with an ONNX export must not import Keras

        self.model = load_model(path)
        self.image_size = tuple(self.model.inputs[0].shape[1:3])

    def predict_batch(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        from glomeruli.model.inference import predict_batch

        return predict_batch(self.model, x, batch_size)


def load_predictor(model_path: Path) -> KerasModel | OnnxModel:
    """The model at `model_path`: an ONNX export (by its suffix, .onnx) on onnxruntime, else a Keras model."""
    return OnnxModel(model_path) if is_onnx(model_path) else KerasModel(model_path)


def model_metadata(model_path: Path, meta_path: Path | None = None) -> ModelMetadata:
    """What to predict `model_path` with: `meta_path` (--meta: e.g. `glomeruli recalibrate`'s, refused when
    written for another model), else the model's own: model.meta.json beside a Keras model, the contract inside
    an ONNX export. Metadata given for an ONNX export must be written for the Keras model it was exported from."""
    if not is_onnx(model_path):
        return read_metadata(model_path, meta_path)
    contract = OnnxModel(model_path).metadata()
    if meta_path is None:
        return contract
    return read_metadata(model_path, meta_path, model_sha256=contract.model_sha256)


def predict_batch(model: KerasModel | OnnxModel, x: np.ndarray, batch_size: int) -> np.ndarray:
    """The model's (uncalibrated) probabilities of one batch."""
    return model.predict_batch(x, batch_size)


def predict_folder(model_path: Path, folder: Path, *, batch_size: int = 32, workers: int = 0,
                   threshold: float | None = None, recursive: bool = False, ignore: frozenset[str] = frozenset(),
                   meta: ModelMetadata | None = None) -> tuple[list[Prediction], list[Skip]]:
    """Predict every file of `folder` but the names in `ignore` (a labels file) and the sample data's marker
    (`layout.MARKER_FILE`, a file we wrote ourselves, not a stray one the user should hear about); unreadable
    files are skipped and returned by name. Nothing predicted is an error: an empty output would pass for a result.

    `model_path`: a .keras model or its .onnx export. `meta`: the metadata to predict with (default: the model's
    own, `model_metadata`), e.g. one written by `glomeruli recalibrate`, or temperature 1 for the model's raw
    probabilities."""
    meta = model_metadata(model_path) if meta is None else meta
    files = [path for path in list_images(folder, recursive)
             if image_name(folder, path) not in ignore and path.name != MARKER_FILE]
    if not files:
        raise PredictError(f"{folder} holds no files to predict: point at a folder of images")
    try:
        with ProcessPoolExecutor(resolve_workers(workers), mp_context=process_context(["glomeruli.data.images"]),
                                 initializer=_init_decoder) as pool:
            decoded = _decoded_batches(pool, files, meta, batch_size)
            model = load_predictor(model_path)
            if model.image_size != (meta.image_size, meta.image_size):
                raise ValueError(f"{model_path} takes {model.image_size} inputs but its metadata "
                                 f"says {meta.image_size}; rerun `dvc repro evaluate`")
            threshold = meta.threshold if threshold is None else threshold
            log.info("predicting %d files in %s with threshold %.4f, temperature %.3f, stain normalisation %s",
                     len(files), folder, threshold, meta.temperature, meta.stain_normalization.method)
            predictions: list[Prediction] = []
            skipped: list[Skip] = []
            names = iter(files)
            n_batches = -(-len(files) // batch_size)
            for batch in progress(decoded, n_batches, "predict"):
                batch_names = [image_name(folder, next(names)) for _ in batch]
                good = [(n, img) for n, img in zip(batch_names, batch) if not isinstance(img, Skip)]
                skipped += [Skip(n, img.reason) for n, img in zip(batch_names, batch) if isinstance(img, Skip)]
                if good:
                    x = np.stack([img for _, img in good]).astype(np.float32)
                    # calibrated as evaluate calibrated them (models/model.meta.json), so they mean what they say
                    probs = apply_temperature(predict_batch(model, x, batch_size).reshape(-1), meta.temperature)
                    predictions += [Prediction(n, int(p >= threshold), float(p)) for (n, _), p in zip(good, probs)]
    except BrokenProcessPool as err:
        raise WorkerDied(f"an image decoding process died ({err}): most often out of memory; use fewer "
                         "--workers") from err
    for skip in skipped:
        log.warning("skipped %s: %s", skip.name, skip.reason)
    if not predictions:
        why = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:_FIRST_SHOWN]) or "it holds no files"
        raise PredictError(f"no image of {folder} could be predicted ({len(skipped)} files skipped; {why}): "
                           "point at a folder of images (with --recursive for images in subfolders)")
    return predictions, skipped


def write_predictions(path: Path, predictions: list[Prediction]) -> None:
    """`name,ground truth,probability`: scorable against the lab's public.csv (a name a spreadsheet would run as a
    formula is written inert, see csvcells)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:  # never half a file
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["name", "ground truth", "probability"])
        writer.writerows((spreadsheet_safe(p.name), p.label, f"{p.probability:.6f}") for p in predictions)


# ---------------------------------------------------------------------------------------- self-scoring

CMIL_LAYOUT = DatasetLayout(class_dirs={SCLEROTIC_DIR: 1, NON_SCLEROTIC_DIR: 0}, labels_csv=LABELS_CSV,
                            group_regex=CMIL_GROUP_REGEX)


def dataset_layout(model_path: Path, meta: ModelMetadata, meta_path: Path | None = None) -> DatasetLayout:
    """The layout recorded in the model's metadata (the ingest settings it was trained with; `meta_path`: where
    `meta` was read, default the model's own); for metadata written before it was recorded, the CMIL layout,
    with a warning that names the file."""
    if meta.dataset_layout is not None:
        return meta.dataset_layout
    log.warning("%s records no dataset layout (it was written before the layout travelled with the model): a "
                "labelled folder is read in the CMIL layout (%s/ = 1, %s/ = 0, labels file %s, biopsy id %s); "
                "rerun `dvc repro evaluate` to record the ingest settings the model was trained with",
                meta_path or metadata_path(model_path), SCLEROTIC_DIR, NON_SCLEROTIC_DIR, LABELS_CSV, CMIL_GROUP_REGEX)
    return CMIL_LAYOUT


@dataclass(frozen=True)
class FolderLabels:
    """A folder in the training layout, labelled as ingest would label it: its listing, wrapper folder and
    labelling rule (`ingest.label_files`). Predictions are named by their path inside the folder."""

    labelling: Labelling        # paths inside the dataset root (the folder, or the one wrapper folder in it)
    not_listed: dict[str, str]  # dataset path -> why ingest's listing leaves the file out (hidden, symlink...)
    wrapper: str | None         # the wrapper folder inside the predicted folder, as ingest finds it
    csv: LabelsCsv | None       # the parsed labels file, when there is one

    @property
    def csv_name(self) -> str | None:
        """The labels file's path inside the predicted folder (read, not predicted)."""
        file = self.labelling.labels_file
        if file is None or self.wrapper is None:
            return file
        return f"{self.wrapper}/{file}"

    @property
    def scorable(self) -> bool:
        """Whether any file sits directly inside a class folder, the only files that take a label."""
        return bool(self.labelling.class_files)

    @property
    def origin(self) -> list[str]:
        """Where the labels come from, for messages and the report."""
        return ["class folders"] + ([self.csv_name] if self.csv is not None else [])

    def _dataset_path(self, name: str) -> str | None:
        if self.wrapper is None:
            return name
        return name.removeprefix(self.wrapper + "/") if name.startswith(self.wrapper + "/") else None

    def label_of(self, name: str) -> int | None:
        """The label ingest gives the file `name` (its path inside the predicted folder); None when it gives none."""
        path = self._dataset_path(name)
        return None if path is None else self.labelling.labels.get(path)

    def why_unlabelled(self, name: str) -> str:
        path = self._dataset_path(name)
        if path is None:
            return f"outside the wrapper folder {self.wrapper}/ that holds the class folders"
        return (self.labelling.refused.get(path) or self.not_listed.get(path)
                or "not listed by ingest (it would not read this file)")


def folder_labels(folder: Path, layout: DatasetLayout) -> FolderLabels | None:
    """The labels of `folder` when it is in the training layout of `layout` (files directly inside its class
    folders, at the top or in one wrapper folder, and/or its labels file), else None."""
    if not folder.is_dir():
        return None  # predict_folder says what is wrong with it
    entries, not_listed = list_entries(folder)
    relpaths = [entry.relpath for entry in entries]
    wrapper = folder_wrapper(folder)
    csv = None
    if layout.labels_csv is not None and layout.labels_csv in relpaths:
        csv_path = folder / wrapper / layout.labels_csv if wrapper else folder / layout.labels_csv
        csv = parse_labels_csv(read_labels_file(folder, layout.labels_csv), str(csv_path))
    labelling = label_files(relpaths, layout.class_dirs, layout.labels_csv, csv)
    if not labelling.class_files and csv is None:
        return None
    labels = FolderLabels(labelling, {s.relpath: s.reason for s in not_listed}, wrapper, csv)
    if not labels.scorable:
        log.warning("%s is not scored: only images directly inside the class folders (%s) take a label, as in "
                    "ingest, and there are none; its labels file %s is not predicted", folder,
                    ", ".join(f"{name}/" for name in sorted(layout.class_dirs)), labels.csv_name)
    return labels


@dataclass(frozen=True)
class Score:
    report: dict          # what <output>.metrics.json holds
    y_true: np.ndarray    # the scored images' labels and predicted labels, for the confusion matrix
    y_pred: np.ndarray


def score_predictions(predictions: list[Prediction], labels: FolderLabels, threshold: float) -> Score:
    """The evaluate stage's metrics (metrics.binary_metrics) on every prediction ingest would label."""
    from glomeruli.evaluation.metrics import binary_metrics  # late: scikit-learn loads slowly, and only scoring needs it

    scored, not_scored = [], []
    for prediction in predictions:
        label = labels.label_of(prediction.name)
        if label is None:
            not_scored.append({"name": prediction.name, "reason": labels.why_unlabelled(prediction.name)})
        else:
            scored.append((label, prediction))
    if not_scored:
        log.warning("%d predicted image(s) left out of the score, as ingest would leave them out of training (the "
                    "metrics file lists each with its reason): %s", len(not_scored),
                    "; ".join(f"{n['name']} ({n['reason']})" for n in not_scored[:_FIRST_SHOWN]))
    if not scored:
        raise PredictError(f"no predicted image has a label in {' or '.join(labels.origin)}, so nothing can be "
                           "scored: only images directly inside a class folder take one (as in ingest); check the "
                           "class folder names (the model's metadata, dataset_layout) and the labels file")
    y_true = np.array([label for label, _ in scored])
    prob = np.array([p.probability for _, p in scored])
    metrics = binary_metrics(y_true, prob, threshold)
    report = {"threshold": threshold, "labels_from": labels.origin, "n_predicted": len(predictions),
              "n_scored": len(scored), "metrics": _json_safe(metrics), "not_scored": not_scored}
    if labels.csv is not None:
        problems = {k: v for k, v in labels.csv.report.items() if k in ("bad_rows", "bad_labels", "conflicting_rows") and v}
        report["labels_file_problems"] = problems
    return Score(report, y_true, np.array([p.label for _, p in scored]))


def _json_safe(metrics: dict) -> dict:
    # ROC/PR AUC are undefined (NaN) with one class only; JSON has no NaN: null says "undefined"
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def score_paths(output_csv: Path) -> tuple[Path, Path]:
    """Where the score goes: beside the predictions (`evaluation.csv` -> `evaluation.metrics.json`, ...)."""
    stem = output_csv.with_suffix("")
    return stem.with_name(stem.name + ".metrics.json"), stem.with_name(stem.name + ".confusion_matrix.png")


def write_score(output_csv: Path, score: Score) -> tuple[Path, Path]:
    """The metrics JSON and the confusion-matrix PNG (plots.plot_confusion_matrix) beside the predictions."""
    from glomeruli.evaluation.plots import plot_confusion_matrix  # late: plain prediction (ONNX) draws nothing

    metrics_path, png_path = score_paths(output_csv)
    write_json(metrics_path, score.report)
    m = score.report["metrics"]
    title = (f"{output_csv.name}: {score.report['n_scored']} labelled images, threshold {score.report['threshold']:.3f}\n"
             f"accuracy {m[Metric.ACCURACY]:.3f}, F1 {m[Metric.F1]:.3f}, recall {m[Metric.RECALL]:.3f}")
    with atomic_path(png_path) as tmp:
        plot_confusion_matrix(tmp, score.y_true, score.y_pred, title)
    return metrics_path, png_path


def format_score(report: dict) -> str:
    """The score as a few lines for the terminal."""
    m, cm = report["metrics"], report["metrics"][Metric.CONFUSION_MATRIX]
    auc = lambda v: "undefined (one class)" if v is None else f"{v:.3f}"  # noqa: E731
    return "\n".join([
        f"score on {report['n_scored']} of {report['n_predicted']} predicted images (labels from "
        f"{' and '.join(report['labels_from'])}), threshold {report['threshold']:.4f}:",
        f"  accuracy {m[Metric.ACCURACY]:.3f}  balanced accuracy {m[Metric.BALANCED_ACCURACY]:.3f}  "
        f"precision {m[Metric.PRECISION]:.3f}  recall {m[Metric.RECALL]:.3f}  F1 {m[Metric.F1]:.3f}  "
        f"ROC AUC {auc(m[Metric.ROC_AUC])}  PR AUC {auc(m[Metric.PR_AUC])}  log loss {m[Metric.LOSS]:.3f}",
        "  confusion matrix     predicted 0  predicted 1",
        f"    actual 0 (non-GS)  {cm['tn']:>11}  {cm['fp']:>11}",
        f"    actual 1 (GS)      {cm['fn']:>11}  {cm['tp']:>11}",
    ])


# ---------------------------------------------------------------------------------------- per-biopsy burden

def burden_by_biopsy(predictions: list[Prediction], group_regex: str,
                     labels: FolderLabels | None = None) -> list[BiopsyBurden]:
    """The evaluate stage's per-biopsy summary (burden.biopsy_burden) of predicted images, the biopsy read
    from each file name with `group_regex` (ingest.group_regex); the true % too when every image is labelled."""
    biopsies = biopsy_ids([p.name for p in predictions], group_regex)
    true = [labels.label_of(p.name) for p in predictions] if labels is not None else None
    if true is not None and None in true:
        log.warning("true %% per biopsy left empty: %d image(s) have no label", true.count(None))
        true = None
    return biopsy_burden(np.array(biopsies, dtype=object), np.array([p.probability for p in predictions]),
                         np.array([p.label for p in predictions]), None if true is None else np.array(true))


def biopsy_ids(names: list[str], group_regex: str) -> list[str]:
    """The biopsy id of every predicted image (its path inside the folder), read from its file name with
    `group_regex` (ingest.group_regex); as in ingest, a name without one is its own biopsy, with a warning."""
    pattern = compile_group_regex(group_regex)
    base_names = [name.rsplit("/", 1)[-1] for name in names]
    biopsies = [group_of(name, pattern) for name in base_names]
    ungrouped = [name for name, b in zip(names, biopsies) if not b]
    if ungrouped:
        log.warning("%d file name(s) carry no biopsy id (ingest.group_regex = %r), each counted as its own biopsy: "
                    "%s", len(ungrouped), group_regex, ", ".join(ungrouped[:_FIRST_SHOWN]))
    return [b or name for b, name in zip(biopsies, base_names)]
