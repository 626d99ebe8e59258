"""The model card (models/MODEL_CARD.md): what the model is for and not for, what it was trained on, how good it
is, its limits and how to reproduce it, in words, written by the evaluate stage beside the model.

`build_model_card` is a plain function of the evaluate report, the model's metadata, the params, the ingest report
and the split summary (and the provenance `read_provenance` collects from git and sha256s); it holds no clock, so
the card changes only when what it describes changes. The ingest report's `synthetic` flag is its signal that the
model was trained on the synthetic sample. The card is git-tracked beside the model (so `glomeruli review` diffs it),
and dvc.yaml's `artifacts:` names the model `ARTIFACT_NAME` for `dvc artifacts get` and GTO's version tags.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

from glomeruli.core.atomic import write_text
from glomeruli.core.errors import UserError
from glomeruli.model.metadata import ModelMetadata, file_sha256
from glomeruli.core.params import Params
from glomeruli.evaluation.outputs import (BURDEN_CSV, EVALUATE_JSON, Bootstrap, Burden, Calibration, Metric, Report,
                                          Site, interval_key)
from glomeruli.evaluation.sites import SITE_GAP_WARNING

log = logging.getLogger(__name__)

ARTIFACT_NAME = "glomeruli-classifier"  # the model's name in dvc.yaml `artifacts:` (DVC model registry, GTO tags)
SYNTHETIC_LINE = "> **Trained on synthetic sample data — not for any real use.**"
# What defines the pipeline: uncommitted changes here mean the git revision alone does not reproduce the model.
PIPELINE_PATHS = ("dvc.yaml", "params.yaml", "stages", "src")
# Below this many test biopsies the bootstrap intervals are crude (evaluate warns too).
FEW_TEST_BIOPSIES = 5
SMALL_VALIDATION_IMAGES = 100

_THRESHOLD_RULES = {
    "max_f1": "the threshold with the highest F1 on validation (centred, in logit space, in the gap of validation "
              "scores around the best ones)",
    "youden": "the threshold with the highest Youden index (recall + specificity - 1) on validation (centred, in "
              "logit space, in the gap of validation scores around the best ones)",
    "fixed": "fixed by hand (`evaluate.fixed_threshold`), not chosen on data",
}
_GROUP_BY = {
    "biopsy": "every image of a biopsy in one partition (an honest estimate for new patients)",
    "site": "one site held out per fold (an estimate for a new hospital or scanner)",
    "image": "only copies of one image kept together: images of one biopsy straddle the partitions, so the test "
             "numbers are optimistic",
}
_HEADLINE = ((Metric.BALANCED_ACCURACY, "Balanced accuracy"), (Metric.ROC_AUC, "ROC-AUC"),
             (Metric.PR_AUC, "PR-AUC (average precision)"), (Metric.F1, "F1"), (Metric.PRECISION, "Precision"),
             (Metric.RECALL, "Recall (sensitivity)"), (Metric.ACCURACY, "Accuracy"), (Metric.LOSS, "Log loss"))


class ModelCardError(UserError, ValueError):
    """An input of the model card is missing or malformed: the message names the file and the way out."""


@dataclass(frozen=True)
class Provenance:
    """Where the model came from, as the evaluate stage saw it when it ran."""

    git_revision: str | None  # None: not a git checkout (or git unavailable); `git_note` says why
    uncommitted: tuple[str, ...]  # PIPELINE_PATHS entries with uncommitted changes
    model_sha256: str
    params_sha256: str
    manifest_sha256: str
    git_note: str = ""


def read_provenance(root: Path, model_path: Path, params_path: Path, manifest_path: Path) -> Provenance:
    """The git revision (and uncommitted pipeline files) of `root`, and the sha256 of the model, params and manifest."""
    revision, uncommitted, note = None, (), ""
    head = _git(root, "rev-parse", "HEAD")
    if head.returncode != 0:
        note = (head.stderr.strip().splitlines() or ["git rev-parse HEAD failed"])[-1]
        log.info("model card: no git revision (%s)", note)
    else:
        revision = head.stdout.strip()
        status = _git(root, "status", "--porcelain=v1", "--untracked-files=all", "--", *PIPELINE_PATHS)
        # Byte code and build metadata appear beside the sources whenever they run; they are not changes.
        uncommitted = tuple(sorted({line[3:].split(" -> ")[-1].strip('"') for line in status.stdout.splitlines()
                                    if line.strip() and "__pycache__" not in line and ".egg-info" not in line}))
    return Provenance(git_revision=revision, uncommitted=uncommitted, model_sha256=file_sha256(model_path),
                      params_sha256=file_sha256(params_path), manifest_sha256=file_sha256(manifest_path),
                      git_note=note)


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:  # no git installed: the card says so
        return subprocess.CompletedProcess(["git", *args], 1, "", f"git could not run ({err})")


def read_json_input(path: Path, what: str, way_out: str) -> dict:
    """A JSON input of the card, refused with one line naming it when missing or malformed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelCardError(f"{path} ({what}) could not be read for the model card ({err}): {way_out}") from err


# ---------------------------------------------------------------------------------------------- formatting

def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def _num(value: object, digits: int = 3) -> str:
    return "n/a" if _missing(value) else f"{value:.{digits}f}"


def _with_ci(value: object, interval: dict | None, digits: int = 3) -> tuple[str, str]:
    """(value, '0.700–0.900' or '—')."""
    if not interval or _missing(interval.get("low")) or _missing(interval.get("high")):
        return _num(value, digits), "—"
    return _num(value, digits), f"{interval['low']:.{digits}f}–{interval['high']:.{digits}f}"


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "n/a"


def _require(mapping: dict, keys: tuple[str, ...], source: str, way_out: str) -> None:
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ModelCardError(f"{source} lacks {', '.join(missing)} (written by an older version of the pipeline?): "
                             f"{way_out}")


# ---------------------------------------------------------------------------------------------- the card

def build_model_card(report: dict, meta: ModelMetadata, params: Params, ingest_report: dict, split_summary: dict,
                     provenance: Provenance) -> str:
    """The model card's Markdown, from the evaluate report (metrics/evaluate.json), the model's metadata, the params,
    the ingest report (data/interim/ingest_report.json) and the split summary (metrics/split.json)."""
    _require(report, (Report.TEST, Report.THRESHOLD, Report.THRESHOLD_RULE, Report.CALIBRATION, Report.BURDEN,
                      Report.BY_SITE, Report.WARNINGS), EVALUATE_JSON, "rerun `dvc repro evaluate`")
    _require(ingest_report, ("synthetic", "n_synthetic", "n_kept", "n_found", "n_groups", "counts", "sites"),
             "data/interim/ingest_report.json", "rerun `dvc repro ingest` (then `dvc repro`)")
    _require(split_summary, ("group_by", "folds", "fold", "train", "val", "test"), "metrics/split.json",
             "rerun `dvc repro split`")
    synthetic = bool(ingest_report["synthetic"])
    out = [f"# Model card: {ARTIFACT_NAME}", "",
           "<!-- Written by the evaluate stage (src/glomeruli/evaluation/model_card.py) from metrics/evaluate.json, "
           "models/model.meta.json, params.yaml, data/interim/ingest_report.json and metrics/split.json. "
           "Do not edit: `dvc repro` rewrites it. -->", ""]
    if synthetic:
        out += [SYNTHETIC_LINE,
                "> Its images are the pipeline's generated sample (`glomeruli sample-data`, `SYNTH-` biopsy ids): "
                "the numbers below say the pipeline works, nothing about glomeruli of real patients.", ""]
    out += [f"EfficientNetB3 classifier of single glomerulus crops: **globally sclerotic (1)** versus "
            f"**non-globally sclerotic (0)**, with a calibrated probability and a decision threshold. Model file "
            f"`models/model.keras` (sha256 `{provenance.model_sha256}`), with its threshold, temperature and input "
            "contract in `models/model.meta.json`.", ""]
    out += _intended_use(meta)
    out += _training_data(ingest_report, synthetic)
    out += _split(split_summary, params)
    out += _test_results(report)
    out += _calibration(report)
    out += _burden(report)
    out += _sites(report, split_summary)
    out += _threshold(report, split_summary)
    out += _recipe(meta, params)
    out += _gradcam(report)
    out += ["## Warnings from evaluate", ""]
    out += [f"- {w}" for w in report[Report.WARNINGS]] or ["None."]
    out += [""]
    out += _limits(report, params, ingest_report, split_summary, synthetic)
    out += _reproduce(provenance)
    return "\n".join(out).rstrip("\n") + "\n"


def _intended_use(meta: ModelMetadata) -> list[str]:
    stain = meta.stain_normalization.method
    return ["## Intended use", "",
            "- **Research and decision support**: sorting and counting glomeruli of kidney biopsies for a "
            "pathologist who checks the result, e.g. the per-biopsy percentage of globally sclerotic glomeruli "
            "(`glomeruli predict --by-biopsy`) as a second reading.",
            f"- **Input**: a crop of one glomerulus from a **PAS**-stained section, RGB, pixel values 0–255 (fitted "
            f"into {meta.image_size}×{meta.image_size} keeping its aspect ratio, padded with RGB {list(meta.fill)}"
            + ("" if stain == "none" else f", stain-normalised with {stain} as in training") + "), prepared by "
            "`glomeruli predict`, which applies the calibration and the threshold below.",
            "",
            "**Not for:**", "",
            "- **Not a diagnosis**, and not a decision about a patient or a donor kidney on its own: a pathologist "
            "reads the biopsy.",
            "- Not whole slides or arbitrary tiles: it has no \"not a glomerulus\" class, so every input gets one of "
            "the two classes.",
            "- Not other stains (H&E, trichrome, silver, immunofluorescence), other tissues, or other lesions "
            "(segmental sclerosis, crescents): it was trained on none of them.",
            "- Not a new lab's scanner or staining without checking it there first (`glomeruli recalibrate` on "
            "labelled biopsies of that site, then score it on others).", ""]


def _training_data(ingest: dict, synthetic: bool) -> list[str]:
    n_kept = int(ingest["n_kept"])
    by_label = {label: sum(int(c["kept"]) for c in ingest["counts"].values() if int(c["label"]) == label)
                for label in (0, 1)}
    out = ["## Training data", ""]
    if synthetic:
        share = ("all of them" if int(ingest["n_synthetic"]) == n_kept else
                 f"{ingest['n_synthetic']} of {n_kept} images carry the synthetic biopsy prefix")
        marker = "the synthetic marker file is present" if ingest.get("synthetic_marker") else "no marker file"
        out += [f"- **Synthetic sample data** ({share}; {marker}).", ""]
    out += [f"- Source: `{ingest.get('source', '?')}`; {n_kept} images kept of {ingest['n_found']} found in the "
            f"class folders ({int(ingest['n_found']) - n_kept} left out, each with its reason, in "
            "`data/interim/ingest_report.json`).",
            f"- {_count(ingest['n_groups'], 'biopsy', 'biopsies')}, {_count(len(ingest['sites']), 'site')}.",
            f"- Class balance: {by_label[1]} globally sclerotic ({_pct(by_label[1], n_kept)}), {by_label[0]} "
            f"non-globally sclerotic ({_pct(by_label[0], n_kept)}).", ""]
    if len(ingest["sites"]) >= 2:
        out += ["| site | images | globally sclerotic | non-globally sclerotic |", "|---|--:|--:|--:|"]
        for site, counts in sorted(ingest["sites"].items()):
            labels = counts["by_label"]
            out.append(f"| {site} | {counts['n']} | {labels.get('1', 0)} | {labels.get('0', 0)} |")
        out.append("")
    return out


def _split(summary: dict, params: Params) -> list[str]:
    group_by = summary["group_by"]
    out = ["## Split and folds", "",
           f"- Grouped by **{group_by}**: {_GROUP_BY.get(group_by, group_by)}.",
           f"- {summary['folds']} stratified folds; the test set is fold {summary['fold']}; validation "
           f"(`split.val_fraction` = {params.split.val_fraction:g} of all images) is drawn from the other folds, "
           "and chose the calibration and the threshold. Augmented copies are in training only.", "",
           "| partition | originals | augmented copies | globally sclerotic | non-globally sclerotic | biopsies "
           "| sites |",
           "|---|--:|--:|--:|--:|--:|---|"]
    for name in ("train", "val", "test"):
        p = summary[name]
        out.append(f"| {name} | {p['originals']} | {p['augmented']} | {p['label_1']} | {p['label_0']} | "
                   f"{p['biopsies']} | {', '.join(p.get('sites', [])) or '—'} |")
    out += ["", "<sub>Class counts include the augmented copies (training only).</sub>", ""]
    return out


def _test_results(report: dict) -> list[str]:
    test, ci, boot = report[Report.TEST], report.get(Report.TEST_CI95, {}), report.get(Report.BOOTSTRAP, {})
    cm = test.get(Metric.CONFUSION_MATRIX, {})
    biopsies = report[Report.BURDEN].get(Burden.N_BIOPSIES)
    out = ["## Test results", "",
           f"{test[Metric.N]} test images" + (f" from {biopsies} biopsies" if biopsies is not None else "")
           + f", at the threshold {report[Report.THRESHOLD]:.3f} chosen on validation.", "",
           "| metric | value | 95 % interval |", "|---|--:|--:|"]
    for key, label in _HEADLINE:
        if key in test:
            value, interval = _with_ci(test[key], ci.get(key))
            out.append(f"| {label} | {value} | {interval} |")
    out += ["", f"Confusion matrix: true positives {cm.get('tp', '?')}, false negatives {cm.get('fn', '?')}, "
            f"false positives {cm.get('fp', '?')}, true negatives {cm.get('tn', '?')} (positive: globally "
            "sclerotic).", ""]
    if ci and boot.get(Bootstrap.RESAMPLES):
        unit = {"biopsy": "biopsies", "image": "images"}.get(boot.get(Bootstrap.UNIT), str(boot.get(Bootstrap.UNIT)))
        out += [f"Intervals: percentile bootstrap, {boot[Bootstrap.RESAMPLES]} resamples of whole {unit} "
                f"({boot.get(Bootstrap.UNITS, '?')} of them), seed {boot.get(Bootstrap.SEED, '?')}.", ""]
    else:
        out += ["No intervals (`evaluate.bootstrap_resamples` is 0, or the test set holds one biopsy).", ""]
    return out


def _calibration(report: dict) -> list[str]:
    cal = report[Report.CALIBRATION]
    out = ["## Calibration", ""]
    if cal[Calibration.METHOD] == "none":
        out += ["None (`evaluate.calibration: none`): the probabilities are the model's own output.",
                f"On test: ECE {_num(cal.get(Calibration.ECE))}, Brier {_num(cal.get(Calibration.BRIER))}.", ""]
        return out
    t = cal[Calibration.TEMPERATURE]
    meaning = ("T > 1: the model was over-confident" if t > 1.0005 else "T < 1: the model was under-confident"
               if t < 0.9995 else "T = 1: left as it was (the fit keeps 1 on a separated or tiny validation set)")
    out += [f"Temperature scaling fitted on {cal.get(Calibration.FITTED_ON, 'validation')}: "
            "probability = sigmoid(logit / T), "
            f"T = {t:.3f} ({meaning}).", "",
            "| on test | calibrated | 95 % interval | uncalibrated |", "|---|--:|--:|--:|"]
    for key, uncalibrated, label in (
            (Calibration.ECE, Calibration.ECE_UNCALIBRATED, f"ECE ({cal.get(Calibration.BINS, 10)} bins)"),
            (Calibration.BRIER, Calibration.BRIER_UNCALIBRATED, "Brier score")):
        value, interval = _with_ci(cal.get(key), cal.get(interval_key(key)))
        out.append(f"| {label} | {value} | {interval} | {_num(cal.get(uncalibrated))} |")
    out += ["", "Lower is better for both; the reliability diagram is `metrics/plots/reliability.png`.", ""]
    return out


def _burden(report: dict) -> list[str]:
    b = report[Report.BURDEN]
    return ["## Per-biopsy burden (test)", "",
            f"The percentage of globally sclerotic glomeruli per biopsy, over {b[Burden.N_BIOPSIES]} test biopsies "
            f"({b[Burden.N_GLOMERULI]} glomeruli):", "",
            f"- mean absolute error {_num(b[Burden.MAE_PCT_POINTS], 1)} percentage points counting glomeruli above "
            f"the threshold ({_num(b[Burden.MAE_PCT_POINTS_MEAN_PROBABILITY], 1)} with the mean probability);",
            f"- {b[Burden.WRONG_SIDE_OF_CUTOFF]} of {b[Burden.N_BIOPSIES]} biopsies on the wrong side of the "
            f"{b[Burden.CUTOFF_PCT]:g} % cutoff ({b[Burden.WRONG_SIDE_OF_CUTOFF_MEAN_PROBABILITY]} with the mean "
            "probability).", "",
            f"Per biopsy: `{BURDEN_CSV}` and `burden.png`.", ""]


def _sites(report: dict, summary: dict) -> list[str]:
    by_site = report[Report.BY_SITE]
    if len(by_site) < 2:
        only = ", ".join(by_site) or "none"
        return ["## Per-site results (test)", "",
                f"The test set holds one site ({only}): no per-site comparison is possible."
                + (" With `split.group_by: site` every fold holds one site out; `glomeruli cv-summary` compares them."
                   if summary["group_by"] == "site" else ""), ""]
    out = ["## Per-site results (test)", "",
           "| site | images | globally sclerotic | biopsies | ROC-AUC | recall | specificity | F1 | burden MAE (pp) |",
           "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for site, m in by_site.items():
        out.append(f"| {site} | {m[Site.N]} | {m[Site.SCLEROTIC]} | {m[Site.BIOPSIES]} | {_num(m[Site.ROC_AUC])} | "
                   f"{_num(m[Site.RECALL])} | {_num(m[Site.SPECIFICITY])} | {_num(m[Site.F1])} | "
                   f"{_num(m[Site.BURDEN_MAE_PCT_POINTS], 1)} |")
    gap = report.get(Report.SITE_GAP_ROC_AUC)
    out.append("")
    if gap is None:
        out.append("Site gap: n/a (fewer than two test sites hold both classes).")
    else:
        verdict = (f"above {SITE_GAP_WARNING}: the model may recognise the site rather than the glomerulus"
                   if gap > SITE_GAP_WARNING else f"within {SITE_GAP_WARNING}")
        out.append(f"Site gap (pooled ROC-AUC minus the mean within-site ROC-AUC): {gap:+.3f}, {verdict}. "
                   "ROC curves by site: `metrics/plots/by_site.png`.")
    return out + [""]


def _threshold(report: dict, summary: dict) -> list[str]:
    rule = report[Report.THRESHOLD_RULE]
    val = summary["val"]
    how = _THRESHOLD_RULES.get(rule, f"rule {rule}")
    resamples = report.get(Report.THRESHOLD_RESAMPLES) or 0
    if resamples and rule != "fixed":
        how += f"; the median over {resamples} bootstrap resamples of validation biopsies"
    return ["## Threshold", "",
            f"**{report[Report.THRESHOLD]:.4f}** on the calibrated probability (`evaluate.threshold_rule: {rule}`): "
            f"{how}. "
            + ("" if rule == "fixed" else
               f"Validation: {val['originals']} images from {val['biopsies']} biopsies, never the test set. ")
            + "A glomerulus at or above it is called globally sclerotic; `glomeruli predict` applies it "
            "(`models/model.meta.json`).", ""]


def _weights(weights: str) -> str:
    if weights == "imagenet":
        return "ImageNet (Keras' `efficientnetb3_notop.h5`), BatchNormalization frozen"
    if weights == "none":
        return "none: trained from scratch (random initialisation, BatchNormalization trained)"
    return f"the weights file `{weights}`"


def _recipe(meta: ModelMetadata, params: Params) -> list[str]:
    frozen, fine, aug = params.train_frozen, params.finetune, params.augment
    copies = ", ".join(f"class {label}: {n}" for label, n in sorted(aug.copies_per_class.items()))
    unfrozen = ("every layer unfrozen (stem included)" if fine.unfreeze_blocks == "all"
                else f"top {_count(fine.unfreeze_blocks, 'block')} unfrozen")
    return ["## Training recipe", "",
            "| | |", "|---|---|",
            f"| backbone | EfficientNetB3 (Keras), head: feature standardisation, dropout {params.model.dropout:g}, "
            "sigmoid |",
            f"| backbone weights | {_weights(params.model.weights)} |",
            f"| input | {meta.image_size}×{meta.image_size} px, padding RGB {list(meta.fill)}, stain normalisation "
            f"{meta.stain_normalization.method} |",
            f"| offline augmentation | copies per original ({copies}) |",
            f"| frozen phase | {_count(frozen.epochs, 'epoch')} at most, batch {frozen.batch_size}, lr {frozen.lr:g}, "
            f"class weight {frozen.class_weight}, early stopping patience {frozen.patience} |",
            f"| fine-tuning | {unfrozen}, {_count(fine.epochs, 'epoch')} at most, batch "
            f"{fine.batch_size}, lr {fine.lr:g} ({fine.lr_schedule}, {_count(fine.warmup_epochs, 'warm-up epoch')}), "
            f"class weight {fine.class_weight}, patience {fine.patience}, online augmentation "
            f"{'on' if fine.online_augment else 'off'}; the best validation epoch is kept |",
            f"| seed | {params.seed} |", ""]


def _gradcam(report: dict) -> list[str]:
    focus = report.get(Report.GRADCAM_FOCUS) or {}
    out = ["## Grad-CAM focus (test)", ""]
    if not focus or not focus.get("images"):
        return out + ["Not measured (no test image had Grad-CAM heat).", ""]
    return out + [f"Over {_count(focus['images'], 'test image')} ({focus.get('images_without_heat', 0)} more had no "
                  "heat): "
                  f"{_pct_share(focus['heat_on_tissue'])} of the heat lies on tissue, which covers "
                  f"{_pct_share(focus['tissue_area'])} of the image, and {_pct_share(focus['heat_on_centre'])} in the "
                  f"central area, which covers {_pct_share(focus['centre_area'])}. A model that looks at the "
                  "glomerulus puts more heat there than the area's share; `metrics/plots/gradcam.png` shows examples.",
                  ""]


def _pct_share(value: object) -> str:
    return "n/a" if _missing(value) else f"{100 * value:.0f} %"


def _limits(report: dict, params: Params, ingest: dict, summary: dict, synthetic: bool) -> list[str]:
    limits = []
    if synthetic:
        limits.append("**Synthetic training and test data**: these numbers do not describe any real performance.")
    n_sites = len(ingest["sites"])
    if n_sites < 2:
        limits.append("One site: trained and tested on images of one lab and scanner; another site's stain and "
                      "scanner may move the scores (`glomeruli recalibrate`).")
    else:
        gap = report.get(Report.SITE_GAP_ROC_AUC)
        limits.append(f"{n_sites} sites" + (f"; site gap {gap:+.3f}" if gap is not None else "")
                      + ": a site not among them may still differ (`glomeruli recalibrate`).")
    val = summary["val"]
    if report[Report.CALIBRATION][Calibration.METHOD] != "none" or report[Report.THRESHOLD_RULE] != "fixed":
        small = val["originals"] < SMALL_VALIDATION_IMAGES
        limits.append(f"Calibration and threshold rest on {val['originals']} validation images from {val['biopsies']} "
                      "biopsies" + (": a small set, so both may not transfer." if small else "."))
    biopsies = report[Report.BURDEN][Burden.N_BIOPSIES]
    if biopsies < FEW_TEST_BIOPSIES:
        limits.append(f"The test set holds {biopsies} biopsies: its intervals are crude; cross-validation "
                      "(`glomeruli cv-summary`) is the better estimate.")
    if summary["group_by"] == "image":
        limits.append("Split by image: images of one biopsy are in both training and test, so test numbers "
                      "overstate performance on new patients.")
    if params.model.weights == "none":
        limits.append("Trained from scratch, without pretrained features: it needs more data than a pretrained "
                      "model to learn subtle differences.")
    if report[Report.CALIBRATION][Calibration.METHOD] == "none":
        limits.append("Uncalibrated: a probability of 0.8 need not mean 8 in 10.")
    limits.append("One test fold of one split: another split gives other numbers; run every fold and "
                  "`glomeruli cv-summary` for the spread.")
    return ["## Known limits", ""] + [f"- {line}" for line in limits] + [""]


def _reproduce(p: Provenance) -> list[str]:
    if p.git_revision is None:
        revision = f"not recorded: not a git checkout ({p.git_note})"
    else:
        revision = f"`{p.git_revision}`" + (
            " plus uncommitted changes to " + ", ".join(f"`{u}`" for u in p.uncommitted) if p.uncommitted
            else " (no uncommitted changes to the pipeline's code or params)")
    return ["## How to reproduce", "",
            "As the evaluate stage saw it when it wrote this card:", "",
            f"- git revision: {revision}",
            f"- `models/model.keras` sha256: `{p.model_sha256}`",
            f"- `params.yaml` sha256: `{p.params_sha256}`",
            f"- `data/interim/manifest.csv` sha256: `{p.manifest_sha256}` (every image's SHA-256, label, biopsy "
            "and site)", "",
            "The commit that holds this card also holds its `dvc.lock`. From it:", "",
            "```bash",
            "dvc pull                       # this model and its outputs, from the DVC remote",
            "dvc repro                      # or retrain: the same data, params and seed (repeatable on a CPU)",
            "sha256sum models/model.keras   # compare with the sha256 above",
            "```", "",
            f"From an experiment: `dvc exp apply <name>`. A published version by name: "
            f"`dvc artifacts get <repo-url> {ARTIFACT_NAME} --rev <version>` (README, \"Publishing a model\").", ""]


def write_model_card(path: Path, text: str) -> None:
    """Write the card atomically."""
    write_text(path, text)
    log.info("model card written to %s", path)
