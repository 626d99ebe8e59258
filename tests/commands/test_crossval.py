"""Cross-validation: folds disjoint by biopsy that cover every image once; `glomeruli cv-summary` against
hand-computed mean, sd and pooled values, from run folders and from real DVC experiments."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from glomeruli.commands import cli
from glomeruli.commands.crossval import CrossValidationError, experiment_runs, folder_run, format_summary, summarize
from glomeruli.data.h5store import RecordMeta
from glomeruli.core.params import SplitParams
from glomeruli.data.split import fold_assignment, split_records

from cvruns import FOLD_ACCURACY, FOLD_ECE, FOLD_F1, PREDICTIONS, fold_files, write_run


def clustered_meta(n_biopsies: int = 15, seed: int = 0) -> RecordMeta:
    """Biopsies of 3-9 originals with mixed labels, each original with 0-2 augmented copies."""
    rng = np.random.default_rng(seed)
    ids, sources, groups, labels, augmented = [], [], [], [], []
    for b in range(n_biopsies):
        share = rng.uniform(0.1, 0.6)
        for i in range(int(rng.integers(3, 10))):
            label = int(rng.uniform() < share)
            source = f"B{b:02d}_PAS_{i}.png"
            for copy in range(1 + int(rng.integers(0, 3))):
                ids.append(source if copy == 0 else f"{source}#aug{copy}")
                sources.append(source)
                groups.append(f"B{b:02d}")
                labels.append(label)
                augmented.append(copy > 0)
    return RecordMeta(np.array(ids, dtype=object), np.array(sources, dtype=object), np.array(groups, dtype=object),
                      np.array(labels), np.array(augmented))


def test_folds_are_disjoint_by_biopsy_and_cover_every_image_once():
    meta = clustered_meta()
    k, seed = 5, 3
    params = [SplitParams(group_by="biopsy", folds=k, fold=f, val_fraction=0.15) for f in range(k)]
    fold_of = fold_assignment(meta, params[0], seed)
    originals = np.flatnonzero(~meta.is_augmented)
    assert (fold_of[meta.is_augmented] == -1).all() and set(fold_of[originals]) == set(range(k))
    for biopsy in set(meta.groups):  # a biopsy lies in one fold
        assert len(set(fold_of[originals][meta.groups[originals] == biopsy])) == 1
    tests = []
    for p in params:
        split = split_records(meta, p, seed)
        assert split.test.tolist() == originals[fold_of[originals] == p.fold].tolist()
        parts = {name: set(meta.groups[split.rows(name)]) for name in ("train", "val", "test")}
        assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"] and not parts["val"] & parts["test"]
        assert not meta.is_augmented[split.test].any() and not meta.is_augmented[split.val].any()
        tests.append(split.test)
    every_test = np.concatenate(tests)
    assert sorted(every_test.tolist()) == originals.tolist()  # each original is a test image exactly once
    assert fold_assignment(meta, params[3], seed).tolist() == fold_of.tolist()  # independent of the chosen fold


def check_hand_computed(summary: dict) -> None:
    assert summary["folds"] == 3 and [r["fold"] for r in summary["runs"]] == [0, 1, 2]
    assert summary["mean"]["f1"] == pytest.approx(0.7) and summary["sd"]["f1"] == pytest.approx(0.2)
    assert summary["mean"]["accuracy"] == pytest.approx(0.7) and summary["sd"]["accuracy"] == pytest.approx(0.1)
    assert summary["mean"]["ece"] == pytest.approx(0.3) and summary["sd"]["ece"] == pytest.approx(np.sqrt(0.07))
    assert summary["mean"]["burden_mae_pct_points"] == pytest.approx(10.0)
    pooled = summary["pooled"]
    assert pooled["n"] == 8 and pooled["confusion_matrix"] == {"tn": 3, "fp": 1, "fn": 1, "tp": 3}
    assert pooled["accuracy"] == pytest.approx(0.75) and pooled["f1"] == pytest.approx(0.75)
    assert pooled["roc_auc"] == pytest.approx(14 / 16)  # positive above negative in 14 of the 16 pairs
    assert pooled["brier"] == pytest.approx(1.2 / 8)  # .1² .2² .7² .6² .2² .1² .3² .4²
    # per biopsy true vs predicted %: A 50/50, B 0/100, C 100/50, D 0/0, E 50/50
    assert pooled["burden_mae_pct_points"] == pytest.approx(30.0) and pooled["burden_wrong_side_of_cutoff"] == 1
    assert pooled["burden_biopsies"] == 5


def test_cv_summary_from_folders_by_hand(tmp_path, capsys):
    folders = [write_run(tmp_path / f"fold{k}", k) for k in (2, 0, 1)]
    check_hand_computed(summarize([folder_run(f) for f in folders]))
    out = tmp_path / "cv.json"
    assert cli.main(["cv-summary", *map(str, folders), "-o", str(out)]) == 0
    check_hand_computed(json.loads(out.read_text()))
    printed = capsys.readouterr().out
    assert "3-fold cross-validation (8 test images" in printed and "0.700 ± 0.200" in printed


def test_cv_summary_refuses_incomplete_or_overlapping_runs(tmp_path):
    runs = {k: folder_run(write_run(tmp_path / f"f{k}", k)) for k in range(3)}
    with pytest.raises(CrossValidationError, match=r"fold\(s\) \[2\] of 3 have no run"):
        summarize([runs[0], runs[1]])
    with pytest.raises(CrossValidationError, match="more than one run for fold"):
        summarize([runs[0], runs[1], runs[2], folder_run(write_run(tmp_path / "again", 1))])
    with pytest.raises(CrossValidationError, match="different split.folds"):
        summarize([runs[0], runs[1], folder_run(write_run(tmp_path / "k4", 2, folds=4))])
    overlap = write_run(tmp_path / "overlap", 2)
    csv_path = overlap / "metrics/plots/test_predictions.csv"
    csv_path.write_text(csv_path.read_text().replace("e1,", "a1,"))
    with pytest.raises(CrossValidationError, match="a1 is a test image of folds 0 and 2"):
        summarize([runs[0], runs[1], folder_run(overlap)])


STAGE = """
import json, pathlib, sys, yaml
sys.path.insert(0, {tests!r})
from cvruns import fold_files
split = yaml.safe_load(open("params.yaml"))["split"]
for rel, text in fold_files(split["fold"], split["folds"]).items():
    pathlib.Path(rel).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(rel).write_text(text)
"""


@pytest.mark.slow
def test_cv_summary_reads_the_folds_dvc_experiments(tmp_path):
    """A real DVC project whose one stage writes a fold's files: each fold run as `dvc exp run -S split.fold=K`."""
    repo = tmp_path / "project"
    repo.mkdir()
    (repo / "make.py").write_text(STAGE.format(tests=str(Path(__file__).parents[1])))
    (repo / "params.yaml").write_text("split:\n  folds: 3\n  fold: 0\n")
    (repo / "dvc.yaml").write_text(textwrap.dedent("""\
        stages:
          fold:
            cmd: python make.py
            deps: [make.py]
            params: [split]
            outs:
              - metrics/split.json: {cache: false}
              - metrics/evaluate.json: {cache: false}
              - metrics/plots: {cache: false}
        """))

    def run(*args):
        result = subprocess.run(args, cwd=repo, capture_output=True, text=True,
                                env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
                                     "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x",
                                     "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"})
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    run("git", "init", "-q", "-b", "main")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "project")
    for fold in range(3):
        run(sys.executable, "-m", "dvc", "exp", "run", "-q", "-S", f"split.fold={fold}")
    check_hand_computed(summarize(experiment_runs(repo)))


def test_formula_names_written_by_evaluate_are_read_back_exactly(tmp_path):
    from glomeruli.evaluation.evaluate import TestSet, write_test_predictions

    folder = write_run(tmp_path / "fold0", 0)
    prob = np.array([0.9, 0.2, 0.7, 0.4])
    test = TestSet(rows=np.arange(4), ids=np.array(["gs/=SUM(A1).png", "ngs/-x.png", "ngs/'q.png", "gs/plain.png"],
                                                    dtype=object),
                   biopsies=np.array(["=B", "-B", "'B", "B"], dtype=object), labels=np.array([1, 0, 0, 1]),
                   raw_probability=prob, probability=prob, score=np.log(prob / (1 - prob)))
    csv_path = folder / "metrics" / "plots" / "test_predictions.csv"
    write_test_predictions(csv_path, test, 0.5, calibrated=False)
    lines = csv_path.read_text().splitlines()[1:]
    assert [line.split(",")[:2] for line in lines] == [["'=SUM(A1).png", "'=B"], ["'-x.png", "'-B"],
                                                       ["''q.png", "''B"], ["plain.png", "B"]]
    run = folder_run(folder)
    assert [(r["name"], r["biopsy"]) for r in run.predictions] == [("=SUM(A1).png", "=B"), ("-x.png", "-B"),
                                                                  ("'q.png", "'B"), ("plain.png", "B")]


def test_cv_summary_per_site_and_the_site_gap(tmp_path, capsys):
    # Leave-one-site-out by hand: fold k holds site Sk. Within each site the ranking is poor, but S2's scores sit
    # above the others' and S2 has most sclerotic glomeruli: the pooled AUC beats every within-site one.
    rows = {0: [("a", "S0", 1, 0.20, 0), ("b", "S0", 0, 0.25, 0), ("c", "S0", 0, 0.10, 0)],
            1: [("d", "S1", 1, 0.30, 0), ("e", "S1", 0, 0.35, 0), ("f", "S1", 0, 0.15, 0)],
            2: [("g", "S2", 1, 0.80, 1), ("h", "S2", 1, 0.70, 1), ("i", "S2", 0, 0.75, 1)]}
    folders = []
    for fold, predictions in rows.items():
        folder = tmp_path / f"fold{fold}"
        files = fold_files(0)
        files["metrics/split.json"] = json.dumps({"fold": fold, "folds": 3, "group_by": "site"})
        lines = ["name,biopsy,site,label,probability,calibrated_probability,predicted"]
        lines += [f"{n},{n.upper()},{s},{y},0.5,{p},{d}" for n, s, y, p, d in predictions]
        files["metrics/plots/test_predictions.csv"] = "\n".join(lines) + "\n"
        for rel, text in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)
        folders.append(folder)
    summary = summarize([folder_run(f) for f in folders])
    by_site = summary["pooled"]["by_site"]
    assert list(by_site) == ["S0", "S1", "S2"]
    # S0: positive 0.20 vs negatives 0.25, 0.10 -> 1 of 2 pairs; S1: 0.30 vs 0.35, 0.15 -> 1 of 2; S2: 0.80, 0.70 vs 0.75 -> 1 of 2
    assert [by_site[s]["roc_auc"] for s in by_site] == [0.5, 0.5, 0.5]
    assert by_site["S0"]["recall"] == 0.0 and by_site["S2"]["recall"] == 1.0 and by_site["S2"]["specificity"] == 0.0
    # pooled: positives .20 .30 .80 .70 vs negatives .25 .10 .35 .15 .75: 2 + 3 + 5 + 4 = 14 of 20 pairs
    assert summary["pooled"]["roc_auc"] == pytest.approx(14 / 20)
    assert summary["pooled"]["site_gap_roc_auc"] == pytest.approx(0.2)
    printed = format_summary(summary)
    assert "pooled ROC-AUC minus mean within-site ROC-AUC: +0.200" in printed and "WARNING" in printed
    assert "S2" in printed
