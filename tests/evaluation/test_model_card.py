"""The model card: hand-built inputs give written-out lines; the tiny pipeline's own card (pipeline_repo) says it is
synthetic, shows its three sites, and is what the inputs beside it give; the review shows its changed lines; the
model registry entry in dvc.yaml round-trips through `dvc artifacts get` and GTO's tags."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import small_params
from glomeruli.model.metadata import CLASS_NAMES, ModelMetadata, read_metadata
from glomeruli.evaluation.model_card import (ARTIFACT_NAME, SYNTHETIC_LINE, ModelCardError, Provenance, build_model_card,
                                  read_provenance)
from glomeruli.core.params import load_params
from glomeruli.commands.review import CardChange, Review, Revision, render_report

ROOT = Path(__file__).resolve().parents[2]


def _ci(low, high):
    return {"low": low, "high": high}


REPORT = {
    "threshold": 0.4321, "threshold_rule": "max_f1", "threshold_resamples": 0,
    "test": {"n": 40, "accuracy": 0.9, "loss": 0.3, "precision": 0.8, "recall": 0.75, "f1": 0.7742,
             "roc_auc": 0.91, "pr_auc": 0.82, "balanced_accuracy": 0.85,
             "confusion_matrix": {"tn": 28, "fp": 3, "fn": 2, "tp": 6}},
    "test_ci95": {"accuracy": _ci(0.8, 0.95), "loss": _ci(0.2, 0.4), "precision": _ci(0.5, 1.0),
                  "recall": _ci(0.5, 1.0), "f1": _ci(0.55, 0.9), "roc_auc": _ci(0.8, 0.98), "pr_auc": _ci(0.6, 0.95),
                  "balanced_accuracy": _ci(0.7, 0.95)},
    "bootstrap": {"resamples": 1000, "level": 0.95, "unit": "biopsy", "units": 8, "seed": 42},
    "calibration": {"method": "temperature", "temperature": 1.5, "fitted_on": "validation", "bins": 10,
                    "brier": 0.08, "ece": 0.05, "brier_uncalibrated": 0.1, "ece_uncalibrated": 0.09,
                    "brier_ci95": _ci(0.05, 0.12), "ece_ci95": _ci(0.03, 0.1)},
    "burden": {"cutoff_pct": 20.0, "n_biopsies": 8, "n_glomeruli": 40, "mae_pct_points": 6.25,
               "mae_pct_points_mean_probability": 7.5, "wrong_side_of_cutoff": 1,
               "wrong_side_of_cutoff_mean_probability": 2, "per_biopsy": "metrics/plots/burden.csv"},
    "val": {"n": 30},
    "warnings": ["validation holds sclerotic glomeruli from 2 biopsies only"],
    "by_site": {"SITE1": {"n": 25, "sclerotic": 5, "roc_auc": 0.9, "recall": 0.8, "specificity": 0.95, "f1": 0.8,
                          "burden_mae_pct_points": 5.0, "biopsies": 5},
                "SITE2": {"n": 15, "sclerotic": 3, "roc_auc": None, "recall": 0.6667, "specificity": 0.9,
                          "f1": 0.6, "burden_mae_pct_points": 8.333, "biopsies": 3}},
    "site_gap_roc_auc": 0.01,
    "gradcam_focus": {"images": 38, "images_without_heat": 2, "heat_on_tissue": 0.8, "tissue_area": 0.5,
                      "heat_on_centre": 0.6, "centre_area": 0.36},
}
INGEST = {"source": "data/sample", "n_found": 52, "n_kept": 50, "n_groups": 12, "synthetic": True,
          "synthetic_marker": True, "n_synthetic": 50,
          "counts": {"globally_sclerotic_glomeruli": {"label": 1, "found": 10, "kept": 10},
                     "non_globally_sclerotic_glomeruli": {"label": 0, "found": 42, "kept": 40}},
          "n_sites": 2, "sites": {"SITE1": {"n": 30, "by_label": {"0": 24, "1": 6}},
                                  "SITE2": {"n": 20, "by_label": {"0": 16, "1": 4}}}}
SPLIT = {"group_by": "biopsy", "folds": 5, "fold": 0,
         "train": {"records": 60, "originals": 30, "augmented": 30, "label_0": 40, "label_1": 20, "biopsies": 7,
                   "sites": ["SITE1", "SITE2"]},
         "val": {"records": 10, "originals": 10, "augmented": 0, "label_0": 8, "label_1": 2, "biopsies": 2,
                 "sites": ["SITE1"]},
         "test": {"records": 10, "originals": 10, "augmented": 0, "label_0": 8, "label_1": 2, "biopsies": 3,
                  "sites": ["SITE1", "SITE2"]}}
META = ModelMetadata(image_size=64, fill=(0, 0, 0), threshold=0.4321, threshold_rule="max_f1", class_names=CLASS_NAMES,
                     model_sha256="ab" * 32, max_pixels=40_000_000, temperature=1.5)
PROVENANCE = Provenance(git_revision="c0ffee" * 6 + "0123", uncommitted=("params.yaml",), model_sha256="ab" * 32,
                        params_sha256="cd" * 32, manifest_sha256="ef" * 32)


def _card(report=REPORT, ingest=INGEST, split=SPLIT, provenance=PROVENANCE, **params) -> str:
    return build_model_card(report, META, small_params(**params), ingest, split, provenance)


def test_hand_built_inputs_give_these_lines():
    card = _card()
    lines = card.splitlines()
    assert lines[0] == f"# Model card: {ARTIFACT_NAME}"
    for expected in (
            SYNTHETIC_LINE,
            "- **Synthetic sample data** (all of them; the synthetic marker file is present).",
            "- **Not a diagnosis**, and not a decision about a patient or a donor kidney on its own: a pathologist "
            "reads the biopsy.",
            "- Source: `data/sample`; 50 images kept of 52 found in the class folders (2 left out, each with its "
            "reason, in `data/interim/ingest_report.json`).",
            "- 12 biopsies, 2 sites.",
            "- Class balance: 10 globally sclerotic (20.0 %), 40 non-globally sclerotic (80.0 %).",
            "| SITE1 | 30 | 6 | 24 |",
            "- Grouped by **biopsy**: every image of a biopsy in one partition (an honest estimate for new patients).",
            "| test | 10 | 0 | 2 | 8 | 3 | SITE1, SITE2 |",
            "40 test images from 8 biopsies, at the threshold 0.432 chosen on validation.",
            "| Balanced accuracy | 0.850 | 0.700–0.950 |",
            "| ROC-AUC | 0.910 | 0.800–0.980 |",
            "Confusion matrix: true positives 6, false negatives 2, false positives 3, true negatives 28 (positive: "
            "globally sclerotic).",
            "Intervals: percentile bootstrap, 1000 resamples of whole biopsies (8 of them), seed 42.",
            "| ECE (10 bins) | 0.050 | 0.030–0.100 | 0.090 |",
            "| Brier score | 0.080 | 0.050–0.120 | 0.100 |",
            "- 1 of 8 biopsies on the wrong side of the 20 % cutoff (2 with the mean probability).",
            "| SITE2 | 15 | 3 | 3 | n/a | 0.667 | 0.900 | 0.600 | 8.3 |",
            "Site gap (pooled ROC-AUC minus the mean within-site ROC-AUC): +0.010, within 0.05. ROC curves by site: "
            "`metrics/plots/by_site.png`.",
            "| backbone weights | none: trained from scratch (random initialisation, BatchNormalization trained) |",
            "- validation holds sclerotic glomeruli from 2 biopsies only",
            "- **Synthetic training and test data**: these numbers do not describe any real performance.",
            "- Calibration and threshold rest on 10 validation images from 2 biopsies: a small set, so both may not "
            "transfer.",
            f"- git revision: `{PROVENANCE.git_revision}` plus uncommitted changes to `params.yaml`",
            f"- `params.yaml` sha256: `{'cd' * 32}`",
            f"`dvc artifacts get <repo-url> {ARTIFACT_NAME} --rev <version>` (README, \"Publishing a model\")."):
        assert any(expected in line for line in lines), expected
    assert "T = 1.500 (T > 1: the model was over-confident)" in card
    assert "**0.4321** on the calibrated probability (`evaluate.threshold_rule: max_f1`): the threshold with the " \
           "highest F1 on validation" in card
    assert "Validation: 10 images from 2 biopsies, never the test set." in card
    assert "Over 38 test images (2 more had no heat): 80 % of the heat lies on tissue, which covers 50 % of the image" \
           in card
    assert ("| fine-tuning | top 2 blocks unfrozen, 2 epochs at most, batch 16, lr 1e-05 (cosine, 1 warm-up epoch), "
            "class weight balanced, patience 3, online augmentation off; the best validation epoch is kept |") in card
    assert _card() == card  # a function of its inputs: no clock


def test_real_data_has_no_loud_line_and_one_site_no_site_table():
    ingest = {**INGEST, "synthetic": False, "synthetic_marker": False, "n_synthetic": 0,
              "n_sites": 1, "sites": {"all": {"n": 50, "by_label": {"0": 40, "1": 10}}}}
    report = {**REPORT, "by_site": {"all": REPORT["by_site"]["SITE1"]}, "site_gap_roc_auc": None, "warnings": []}
    card = _card(report, ingest, **{"model.weights": "imagenet"})
    assert "synthetic" not in card.lower()
    assert "| site |" not in card and "Site gap" not in card
    assert "The test set holds one site (all): no per-site comparison is possible." in card
    assert "- One site: trained and tested on images of one lab and scanner" in card
    assert "## Warnings from evaluate\n\nNone.\n" in card
    assert "| backbone weights | ImageNet (Keras' `efficientnetb3_notop.h5`), BatchNormalization frozen |" in card


def test_a_mixture_without_marker_still_says_synthetic_and_how_much():
    ingest = {**INGEST, "synthetic_marker": False, "n_synthetic": 20}
    card = _card(ingest=ingest)
    assert SYNTHETIC_LINE in card
    assert "- **Synthetic sample data** (20 of 50 images carry the synthetic biopsy prefix; no marker file)." in card


def test_no_intervals_no_calibration_fixed_threshold_and_no_git():
    report = copy.deepcopy(REPORT)
    report.update(test_ci95={}, threshold_rule="fixed", bootstrap={"resamples": 0})
    report["calibration"] = {"method": "none", "temperature": 1.0, "brier": 0.08, "ece": 0.05}
    card = _card(report, provenance=Provenance(None, (), "ab" * 32, "cd" * 32, "ef" * 32,
                                               git_note="fatal: not a git repository"))
    assert "| Balanced accuracy | 0.850 | — |" in card
    assert "No intervals (`evaluate.bootstrap_resamples` is 0, or the test set holds one biopsy)." in card
    assert "None (`evaluate.calibration: none`): the probabilities are the model's own output." in card
    assert "fixed by hand (`evaluate.fixed_threshold`), not chosen on data." in card
    assert "- Uncalibrated: a probability of 0.8 need not mean 8 in 10." in card
    assert "- git revision: not recorded: not a git checkout (fatal: not a git repository)" in card


def test_an_ingest_report_from_before_the_synthetic_field_is_refused_naming_it():
    old = {k: v for k, v in INGEST.items() if not k.startswith(("synthetic", "n_synthetic"))}
    with pytest.raises(ModelCardError, match=r"data/interim/ingest_report.json lacks synthetic, n_synthetic .*"
                                             r"rerun `dvc repro ingest`"):
        _card(ingest=old)


def test_provenance_names_the_revision_and_uncommitted_pipeline_files_only(tmp_path):
    repo = tmp_path / "repo"
    (repo / "src" / "__pycache__").mkdir(parents=True)
    for name, text in (("params.yaml", "seed: 1\n"), ("dvc.yaml", "stages: {}\n"), ("src/a.py", "x = 1\n"),
                       ("model.keras", "weights"), ("manifest.csv", "id\n")):
        (repo / name).write_text(text)

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()

    assert read_provenance(repo, repo / "model.keras", repo / "params.yaml", repo / "manifest.csv").git_revision is None
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    (repo / "src" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")  # byte code is no change
    (repo / "notes.txt").write_text("outside the pipeline\n")
    clean = read_provenance(repo, repo / "model.keras", repo / "params.yaml", repo / "manifest.csv")
    assert clean.git_revision == git("rev-parse", "HEAD") and clean.uncommitted == ()
    assert clean.params_sha256 == hashlib.sha256(b"seed: 1\n").hexdigest()
    (repo / "params.yaml").write_text("seed: 2\n")
    (repo / "src" / "b.py").write_text("y = 2\n")
    dirty = read_provenance(repo, repo / "model.keras", repo / "params.yaml", repo / "manifest.csv")
    assert dirty.uncommitted == ("params.yaml", "src/b.py")


def _review(base_card, head_card) -> str:
    review = Review(Revision("main", "a" * 40), Revision("head", "b" * 40), True, {}, [], [], [],
                    card=CardChange(base_card, head_card))
    return render_report(review)


def test_review_links_the_card_and_shows_its_changed_lines():
    base = _card()
    head = _card(report={**REPORT, "threshold": 0.25})
    report = _review(base, head)
    section = report.split("### Model card", 1)[1].split("<details>", 1)[0]
    assert "[`models/MODEL_CARD.md`](MODEL_CARD.md) of the head; its changed lines" in section
    assert "-40 test images from 8 biopsies, at the threshold 0.432 chosen on validation." in section
    assert "+40 test images from 8 biopsies, at the threshold 0.250 chosen on validation." in section
    assert "````diff" in section and "+# Model card" not in section  # changed lines only, not the whole card
    assert "unchanged since the base" in _review(base, base)
    assert "new in this revision (the base has none)" in _review(None, head)
    assert "The head has no `models/MODEL_CARD.md`" in _review(base, None)
    comment = render_report(Review(Revision("main", "a" * 40), Revision("head", "b" * 40), True, {}, [], [], [],
                                   card=CardChange(base, head)), pictures_link="@ARTIFACT_URL@")
    assert "[`models/MODEL_CARD.md`](@ARTIFACT_URL@) (in this run's artifact)" in comment


def test_dvc_yaml_names_the_model_artifact():
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    artifact = dvc_yaml["artifacts"][ARTIFACT_NAME]
    assert artifact["type"] == "model" and artifact["path"] == "models/model.keras"
    assert artifact["desc"] and artifact["labels"]
    evaluate = dvc_yaml["stages"]["evaluate"]
    assert {"models/MODEL_CARD.md": {"cache": False}} in evaluate["outs"]


# ---------------------------------------------------------------------------------------------- the tiny pipeline

@pytest.mark.slow
def test_the_tiny_pipelines_card_is_synthetic_with_sites_and_reproducible(pipeline_repo):
    from project import run

    card = (pipeline_repo / "models/MODEL_CARD.md").read_text(encoding="utf-8")
    report = json.loads((pipeline_repo / "metrics/evaluate.json").read_text())
    assert SYNTHETIC_LINE in card
    assert "| site | images | globally sclerotic | biopsies | ROC-AUC |" in card
    for site in report["by_site"]:
        assert any(line.startswith(f"| {site} | {report['by_site'][site]['n']} |") for line in card.splitlines())
    assert len(report["by_site"]) >= 2 and set(report["by_site"]) <= {"SITE1", "SITE2", "SITE3"}
    assert " biopsies, 3 sites." in card  # the training data's sites, from the ingest report
    model_sha = hashlib.sha256((pipeline_repo / "models/model.keras").read_bytes()).hexdigest()
    assert f"`models/model.keras` sha256: `{model_sha}`" in card
    assert f"at the threshold {report['threshold']:.3f} chosen on validation" in card
    # The stage ran on the committed "pipeline" revision, before "baseline" committed its outputs.
    pipeline_rev = run(pipeline_repo, "git", "rev-parse", "HEAD~1").stdout.strip()
    assert f"- git revision: `{pipeline_rev}` (no uncommitted changes" in card
    assert run(pipeline_repo, "git", "ls-files", "models/MODEL_CARD.md").stdout.strip() == "models/MODEL_CARD.md"
    # The card is what its inputs give: rebuilt from the files beside it, it is the same text.
    ingest = json.loads((pipeline_repo / "data/interim/ingest_report.json").read_text())
    assert ingest["synthetic"] is True and ingest["synthetic_marker"] is True
    provenance = read_provenance(pipeline_repo, pipeline_repo / "models/model.keras", pipeline_repo / "params.yaml",
                                 pipeline_repo / "data/interim/manifest.csv")
    rebuilt = build_model_card(report, read_metadata(pipeline_repo / "models/model.keras"),
                               load_params(pipeline_repo / "params.yaml"), ingest,
                               json.loads((pipeline_repo / "metrics/split.json").read_text()),
                               Provenance(pipeline_rev, (), *(getattr(provenance, k) for k in
                                          ("model_sha256", "params_sha256", "manifest_sha256"))))
    assert rebuilt == card
