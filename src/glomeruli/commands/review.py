"""`glomeruli review BASE [HEAD]`: one pull-request report of what a change did to the model.

Everything is read through DVC (`dvc metrics diff`, `dvc params diff`, `dvc plots diff --json`) and git
(`dvc.lock` of both revisions); nothing is re-run. The pictures are drawn with matplotlib from the same
CSV/TSV data DVC's own plots use, so they render on a CI runner with no browser and no network.

`dvc plots diff --json --split` fetches either revision's DVC-cached training curves from the cache or the
remote; a stage whose `dvc.lock` entry differs reran (`stages_rerun`). The model card of both revisions comes from
git (`read_card`): the head's is copied beside the report, its changed lines shown as a unified diff
(`CardChange`). `.github/workflows/review.yml` posts `comment.md` on pull requests; `gpu-repro.yml` reruns the
pipeline on a self-hosted GPU runner; `scripts/ci-remote.sh` sets the DVC remote from secrets.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from glomeruli.core.errors import UserError  # noqa: E402
from glomeruli.core.vcs import CommandError, git_show_or_none, run_dvc, run_git  # noqa: E402
from glomeruli.evaluation.outputs import (EVALUATE_JSON, Bootstrap, Metric, PlotColumn, Report, dotted,  # noqa: E402
                                          interval_key)

log = logging.getLogger(__name__)

EVALUATE = EVALUATE_JSON
SPLIT = "metrics/split.json"
MODEL_CARD = "models/MODEL_CARD.md"  # paths.MODEL_CARD: git-tracked, so both revisions' cards are in git
CARD_DIFF_LINES = 80  # changed lines shown in the report; the rest is in the card itself
PHASE_SUMMARIES = {"metrics/train_frozen/metrics.json": "Training summary, frozen phase",
                   "metrics/finetune/metrics.json": "Training summary, fine-tune phase"}
# The marker that finds this report's earlier pull-request comment, so CI updates it instead of adding one.
COMMENT_MARKER = "<!-- glomeruli-review -->"
ARTIFACT_URL_PLACEHOLDER = "@ARTIFACT_URL@"
FIRST_RUN = "first run of the pipeline"

# Headline: the test-set numbers a reviewer decides on, in this order.
HEADLINE = tuple((dotted(Report.TEST, metric), title) for metric, title in (
    (Metric.BALANCED_ACCURACY, "Balanced accuracy"), (Metric.F1, "F1"), (Metric.ROC_AUC, "ROC-AUC"),
    (Metric.PR_AUC, "PR-AUC"), (Metric.PRECISION, "Precision"), (Metric.RECALL, "Recall"),
    (Metric.ACCURACY, "Accuracy"))) + ((Report.THRESHOLD, "Threshold"),)
# Groups of the collapsed section: evaluate.json key prefix -> title (anything left goes to "Other").
EVALUATE_GROUPS = ((dotted(Report.TEST, ""), "Test set, other numbers"),
                   (dotted(Report.CALIBRATION, ""), "Calibration (test)"),
                   (dotted(Report.BURDEN, ""), "Per-biopsy sclerosis burden"), (dotted(Report.VAL, ""), "Validation set"))

# dvc.yaml plot ids whose data the pictures are drawn from.
CONFUSION_PLOT, ROC_PLOT, PR_PLOT = "Confusion matrix (test)", "ROC (test)", "Precision-recall (test)"
CURVE_PLOTS = {("frozen", "loss"): "Loss, frozen phase", ("frozen", "accuracy"): "Accuracy, frozen phase",
               ("fine-tune", "loss"): "Loss, fine-tune phase", ("fine-tune", "accuracy"): "Accuracy, fine-tune phase"}
CLASS_LABELS = ("non-GS (0)", "GS (1)")
# Base drawn wide and pale underneath, head narrow on top: identical curves stay visible as both.
STYLES = {"base": dict(color="tab:orange", lw=4.5, ms=9, alpha=0.55, zorder=2),
          "head": dict(color="tab:blue", lw=1.8, ms=4, alpha=1.0, zorder=3)}

_HIGHER_BETTER = {"accuracy", "balanced_accuracy", "f1", "roc_auc", "pr_auc", "precision", "recall", "auc",
                  "sensitivity", "specificity", "tp", "tn", "kappa", "agreement", "r2"}
_LOWER_BETTER = {"loss", "brier", "ece", "mae", "rmse", "mse", "error", "fp", "fn", "wrong"}


class ReviewError(UserError):
    """A revision cannot be reviewed (unknown, no pipeline, no metrics); a failing dvc raises vcs.CommandError."""


@dataclass(frozen=True)
class Revision:
    """One side of the review: a git commit, or the workspace (sha None)."""

    name: str
    sha: str | None = None

    @property
    def dvc_rev(self) -> str:
        """How DVC names this revision in its JSON output."""
        return self.sha or "workspace"

    @property
    def label(self) -> str:
        if self.sha is None:
            return "workspace"
        short = self.sha[:7]
        return short if self.sha.startswith(self.name) else f"{self.name} ({short})"


@dataclass(frozen=True)
class Change:
    """One metric or parameter of both revisions (None where a revision has no value)."""

    key: str
    base: object
    head: object

    @property
    def delta(self) -> float | None:
        if not (_is_number(self.base) and _is_number(self.head)):
            return None
        return float(self.head) - float(self.base)


@dataclass(frozen=True)
class StageRerun:
    name: str
    because: str


@dataclass
class Review:
    base: Revision
    head: Revision
    base_has_metrics: bool
    metrics: dict[str, dict[str, Change]]
    params: list[Change]
    reran: list[StageRerun]
    unchanged_stages: list[str]
    pictures: dict[str, str] = field(default_factory=dict)  # file name -> caption
    warnings: list[str] = field(default_factory=list)
    card: CardChange | None = None  # None: the review was built without reading the model cards


@dataclass(frozen=True)
class CardChange:
    """The model card (models/MODEL_CARD.md) of both revisions; None where a revision has none."""

    base: str | None
    head: str | None

    def changed_lines(self, context: int = 0) -> list[str]:
        """A unified diff of the two cards (hunk headers, then - and + lines); [] when equal or one is missing."""
        if self.base is None or self.head is None:
            return []
        return [line.rstrip("\n") for line in difflib.unified_diff(
            self.base.splitlines(), self.head.splitlines(), n=context, lineterm="")][2:]  # no ---/+++ file header


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _dvc_json(repo: Path, *args: str) -> dict:
    """Run a read-only dvc command with --json and parse its output (DVC's own CLI, as a user would)."""
    return json.loads(run_dvc([*args, "--json"], repo) or "{}")


def resolve_revision(repo: Path, name: str | None) -> Revision:
    """A git revision (or the workspace when `name` is None) that holds this pipeline's dvc.yaml."""
    if name is None:
        if not (repo / "dvc.yaml").is_file():
            raise ReviewError(f"no dvc.yaml in {repo.resolve()}: run `glomeruli review` in the project's root")
        return Revision("workspace")
    try:
        sha = run_git(["rev-parse", "--verify", "--quiet", f"{name}^{{commit}}"], repo).strip()
    except CommandError:
        raise ReviewError(f"unknown revision {name!r}: check the name, or fetch it (git fetch origin main)") from None
    if git_show_or_none(sha, "dvc.yaml", repo) is None:
        raise ReviewError(f"revision {name!r} ({sha[:7]}) has no dvc.yaml: it is not a revision of this pipeline")
    return Revision(name, sha)


def _rev_args(base: Revision, head: Revision) -> list[str]:
    """DVC's diff commands compare with the workspace when the second revision is left out."""
    return [base.dvc_rev] + ([head.sha] if head.sha else [])


def read_metrics(repo: Path, base: Revision, head: Revision) -> dict[str, dict[str, Change]]:
    """Every metric of both revisions (`dvc metrics diff --all`), by file, keys flattened with dots."""
    diff = _dvc_json(repo, "metrics", "diff", *_rev_args(base, head), "--all")
    return {path: {key: Change(key, entry.get("old"), entry.get("new")) for key, entry in sorted(entries.items())}
            for path, entries in diff.items()}


def read_params(repo: Path, base: Revision, head: Revision) -> list[Change]:
    """The parameters that differ between the revisions (`dvc params diff`)."""
    diff = _dvc_json(repo, "params", "diff", *_rev_args(base, head))
    return [Change(key if path == "params.yaml" else f"{path}:{key}", entry.get("old"), entry.get("new"))
            for path, entries in sorted(diff.items()) for key, entry in sorted(entries.items())]


def read_lock(repo: Path, rev: Revision) -> dict:
    """The `stages` of dvc.lock at a revision ({} when it has none: the pipeline never ran there)."""
    if rev.sha is None:
        path = repo / "dvc.lock"
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
    else:
        text = git_show_or_none(rev.sha, "dvc.lock", repo) or ""
    return (yaml.safe_load(text) or {}).get("stages", {})


def read_card(repo: Path, rev: Revision) -> str | None:
    """models/MODEL_CARD.md at a revision (the workspace's file when `rev` is the workspace); None when absent."""
    if rev.sha is None:
        path = repo / MODEL_CARD
        return path.read_text(encoding="utf-8") if path.is_file() else None
    return git_show_or_none(rev.sha, MODEL_CARD, repo)


def _hashes(entries: Iterable[dict] | None) -> dict[str, object]:
    return {e["path"]: e.get("md5") or e.get("etag") or e.get("checksum") for e in entries or ()}


def _changed_keys(old: dict, new: dict) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _flatten(value: object, prefix: str) -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for name, item in value.items() for k, v in _flatten(item, f"{prefix}.{name}").items()}
    return {prefix: value}


def _flat_params(params: dict | None) -> dict[str, object]:
    """A lock entry's params ({file: {key or whole section: value}}) as dotted keys: `evaluate.threshold_rule`."""
    return {k: v for entries in (params or {}).values() for key, value in entries.items()
            for k, v in _flatten(value, key).items()}


def stages_rerun(base_lock: dict, head_lock: dict) -> tuple[list[StageRerun], list[str]]:
    """Stages whose dvc.lock entry differs between the revisions (they ran for the head), and the others."""
    reran, unchanged = [], []
    for name, new in head_lock.items():
        old = base_lock.get(name)
        if old is None:
            reran.append(StageRerun(name, "new in this revision" if base_lock else FIRST_RUN))
            continue
        old_params, new_params = _flat_params(old.get("params")), _flat_params(new.get("params"))
        reasons = []
        if old.get("cmd") != new.get("cmd"):
            reasons.append("command")
        if params := _changed_keys(old_params, new_params):
            reasons.append("params " + ", ".join(f"`{p}`" for p in params))
        if deps := _changed_keys(_hashes(old.get("deps")), _hashes(new.get("deps"))):
            reasons.append("deps " + ", ".join(f"`{d}`" for d in deps))
        if not reasons and _hashes(old.get("outs")) != _hashes(new.get("outs")):
            reasons.append("outputs differ (rerun, or outputs changed by hand)")
        if reasons:
            reran.append(StageRerun(name, "; ".join(reasons)))
        else:
            unchanged.append(name)
    return reran, unchanged


# ---------------------------------------------------------------------------------------------- pictures

@dataclass(frozen=True)
class PlotData:
    """Rows of DVC's plot data by plot id, each row tagged with its revision (`rev`) and source file."""

    rows: dict[str, list[dict]]
    errors: list[dict]

    def of(self, plot_id: str, rev: Revision) -> list[dict]:
        return [r for r in self.rows.get(plot_id, []) if r.get("rev") == rev.dvc_rev]


def read_plot_data(repo: Path, base: Revision, head: Revision, images_dir: Path) -> PlotData:
    """Data of every plot of both revisions (`dvc plots diff --json --split`); DVC fetches cached files
    (the training curves) from the cache or the default remote. DVC copies image plots into `images_dir`."""
    out = _dvc_json(repo, "plots", "diff", *_rev_args(base, head), "--split", "-o", str(images_dir))
    rows = {}
    for plot_id, entries in out.get("data", {}).items():
        for entry in entries:
            if entry.get("type") == "vega":
                rows.setdefault(plot_id, []).extend(entry.get("anchor_definitions", {}).get("<DVC_METRIC_DATA>", []))
    return PlotData(rows, out.get("errors", []))


def _save(fig, path: Path, title: str, drawn: Iterable[str]) -> None:
    """PNG with the revisions actually drawn in its metadata (the tests and a curious reader can check it)."""
    fig.savefig(path, dpi=110, metadata={"Title": title, "Description": "revisions: " + ", ".join(drawn),
                                         "Software": None})
    plt.close(fig)


def _sides(review: Review) -> list[tuple[str, Revision]]:
    return ([("base", review.base)] if review.base_has_metrics else []) + [("head", review.head)]


def draw_confusions(data: PlotData, sides: list[tuple[str, Revision]], path: Path) -> bool:
    """The test confusion matrices of the revisions side by side (counts and row percentages)."""
    panels = [(side, rev, data.of(CONFUSION_PLOT, rev)) for side, rev in sides]
    panels = [p for p in panels if p[2]]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (side, rev, rows) in zip(axes[0], panels):
        matrix = np.zeros((2, 2), int)
        for r in rows:
            matrix[int(float(r[PlotColumn.ACTUAL])), int(float(r[PlotColumn.PREDICTED]))] += 1
        ax.imshow(matrix, cmap="Blues" if side == "head" else "Oranges", vmin=0)
        for (i, j), count in np.ndenumerate(matrix):
            share = count / max(matrix[i].sum(), 1)
            ax.text(j, i, f"{count}\n({share:.0%} of row)", ha="center", va="center", fontsize=11,
                    color="white" if count > matrix.max() / 2 else "black")
        ax.set_xticks([0, 1], CLASS_LABELS)
        ax.set_yticks([0, 1], CLASS_LABELS)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(f"{side}: {rev.label}\n(n = {matrix.sum()})", fontsize=10)
    fig.suptitle("Confusion matrix, test set", fontsize=12)
    fig.tight_layout()
    _save(fig, path, "Confusion matrices", [f"{side} {rev.label}" for side, rev, _ in panels])
    return True


def draw_roc_pr(data: PlotData, sides: list[tuple[str, Revision]], path: Path) -> bool:
    """ROC and precision-recall curves of the revisions overlaid."""
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(10, 4.4))
    drawn = []
    for side, rev in sides:
        roc_rows, pr_rows = data.of(ROC_PLOT, rev), data.of(PR_PLOT, rev)
        if not roc_rows or not pr_rows:
            continue
        fpr, tpr = (np.array([float(r[k]) for r in roc_rows]) for k in (PlotColumn.FPR, PlotColumn.TPR))
        recall, precision = (np.array([float(r[k]) for r in pr_rows])
                             for k in (PlotColumn.RECALL, PlotColumn.PRECISION))
        # ROC rows run up from (0, 0); PR rows (scikit-learn's order) run from recall 1 down to 0
        style = {k: v for k, v in STYLES[side].items() if k != "ms"}
        auc = float(np.trapezoid(tpr, fpr))  # the curve's own area (the table has scikit-learn's)
        roc.plot(fpr, tpr, label=f"{side} {rev.label}, AUC {auc:.3f}", drawstyle="steps-post", **style)
        pr.plot(recall, precision, label=f"{side} {rev.label}", drawstyle="steps-post", **style)
        drawn.append(f"{side} {rev.label}")
    if not drawn:
        plt.close(fig)
        return False
    roc.plot([0, 1], [0, 1], color="0.7", lw=1, ls=":")
    roc.set(xlabel="false positive rate", ylabel="true positive rate (recall)", title="ROC, test set",
            xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    pr.set(xlabel="recall", ylabel="precision", title="Precision-recall, test set", xlim=(-0.02, 1.02),
           ylim=(-0.02, 1.02))
    for ax in (roc, pr):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if ax is roc else "lower left", fontsize=9)
    fig.tight_layout()
    _save(fig, path, "ROC and precision-recall", drawn)
    return True


def draw_training_curves(data: PlotData, sides: list[tuple[str, Revision]], path: Path) -> bool:
    """Loss and accuracy per epoch of both training phases, the revisions overlaid (train: solid line and
    circles, val: dashed line and squares)."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.4), squeeze=False)
    drawn = []
    for row, phase in enumerate(("frozen", "fine-tune")):
        for col, metric in enumerate(("loss", "accuracy")):
            ax, epochs = axes[row][col], set()
            for side, rev in sides:
                rows = data.of(CURVE_PLOTS[(phase, metric)], rev)
                for split, ls, marker in (("train", "-", "o"), ("val", "--", "s")):
                    points = sorted((int(r["step"]) + 1, float(r[metric])) for r in rows
                                    if r.get("filename", "").startswith(f"{split}/"))
                    if points:
                        ax.plot(*zip(*points), ls=ls, marker=marker, **STYLES[side])
                        epochs.update(p[0] for p in points)
                        if f"{side} {rev.label}" not in drawn:
                            drawn.append(f"{side} {rev.label}")
            ax.set(title=f"{metric}, {phase} phase", xlabel="epoch", ylabel=metric)
            if epochs:
                ax.set_xticks(sorted(epochs) if len(epochs) <= 15 else ax.get_xticks())
                ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
            ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return False
    handles = [plt.Line2D([], [], marker="o", **STYLES[label.split()[0]], label=label) for label in drawn]
    handles += [plt.Line2D([], [], color="0.3", ls=ls, marker=marker, label=split)
                for split, ls, marker in (("train", "-", "o"), ("val", "--", "s"))]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle("Training curves (per epoch)", fontsize=12)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _save(fig, path, "Training curves", drawn)
    return True


def _missing_plot_sources(data: PlotData, review: Review) -> list[str]:
    """One line per revision whose plot files DVC could not read (e.g. curves neither cached nor pulled)."""
    names = {review.base.dvc_rev: f"base {review.base.label}", review.head.dvc_rev: f"head {review.head.label}"}
    skip = set() if review.base_has_metrics else {review.base.dvc_rev}
    missing: dict[str, list[str]] = {}
    for err in data.errors:
        rev = err.get("rev")
        if rev in names and rev not in skip:
            missing.setdefault(names[rev], []).append(err.get("source") or err.get("name", "?"))
    return [f"DVC could not read {len(srcs)} plot file(s) of {who} (e.g. `{sorted(srcs)[0]}`): they are in neither "
            "the DVC cache nor the remote; `dvc push` them from where that revision ran, `dvc pull` here"
            for who, srcs in missing.items()]


# ---------------------------------------------------------------------------------------------- report

def metric_direction(key: str) -> int:
    """+1 when higher is better, -1 when lower is better, 0 when neither (counts, thresholds, intervals)."""
    parts = key.split(".")
    if any("ci95" in p for p in parts) or parts[0] in ("n", "step"):
        return 0
    last = parts[-1]
    first_word = last.split("_")[0]  # brier_uncalibrated, mae_pct_points, wrong_side_of_cutoff
    if last in _HIGHER_BETTER:
        return 1
    if last in _LOWER_BETTER or first_word in _LOWER_BETTER or last.endswith(("_mae", "_error", "_loss")):
        return -1
    return 0


def fmt_value(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"`{value}`" if not isinstance(value, (dict, list)) else f"`{json.dumps(value)}`"
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3f}" if value == 0 or abs(value) >= 0.001 else f"{value:.2e}"


def _same(change: Change) -> bool:
    """Equal, or equal but for floating-point noise (a rerun that sums in another order)."""
    delta = change.delta
    if delta is None:
        return change.base == change.head
    return abs(delta) <= 1e-9 * max(1.0, abs(float(change.base)), abs(float(change.head)))


def _fmt_param(value: object) -> str:
    """A parameter as written in params.yaml (a learning rate stays 1e-05, not 0.000)."""
    return "—" if value is None else f"`{json.dumps(value) if isinstance(value, (dict, list)) else value}`"


def fmt_delta(change: Change) -> str:
    delta = change.delta
    if _same(change):
        return "="
    if delta is None:
        return "changed"
    if isinstance(change.base, int) and isinstance(change.head, int):
        return f"{int(delta):+d}"
    return f"{delta:+.3f}" if abs(delta) >= 0.0005 else f"{delta:+.1e}"


def verdict(change: Change) -> str:
    delta, direction = change.delta, metric_direction(change.key)
    if delta is None or direction == 0:
        return ""
    if _same(change):
        return ""
    return "✅ better" if delta * direction > 0 else "❌ worse"


def interval_keys(key: str) -> list[tuple[str, str]]:
    """Where evaluate writes a number's 95 % interval: `test_ci95.f1.low` for `test.f1`, `brier_ci95.low`
    beside `calibration.brier`."""
    candidates = [interval_key(key)]
    test_prefix = dotted(Report.TEST, "")
    if key.startswith(test_prefix):
        candidates.insert(0, dotted(Report.TEST_CI95, key[len(test_prefix):]))
    return [(dotted(c, "low"), dotted(c, "high")) for c in candidates]


def _with_interval(value: object, metrics: dict[str, Change], key: str, side: str) -> str:
    """A value, followed by its 95 % interval (low–high) where evaluate wrote one."""
    for low_key, high_key in interval_keys(key):
        low, high = metrics.get(low_key), metrics.get(high_key)
        if value is not None and low is not None and high is not None:
            lo, hi = getattr(low, side), getattr(high, side)
            if lo is not None and hi is not None:
                return f"{fmt_value(value)} ({fmt_value(lo)}–{fmt_value(hi)})"
    return fmt_value(value)


def _table(changes: list[Change], review: Review, metrics: dict[str, Change],
           labels: dict[str, str] | None = None) -> list[str]:
    """base | head | change | mark rows (the head alone when the base has no metrics)."""
    labels = labels or {}
    if review.base_has_metrics:
        lines = [f"| | base `{review.base.label}` | head `{review.head.label}` | change | |", "|---|--:|--:|--:|---|"]
    else:
        lines = [f"| | head `{review.head.label}` |", "|---|--:|"]
    for c in changes:
        name = labels.get(c.key, f"`{c.key}`")
        base, head = _with_interval(c.base, metrics, c.key, "base"), _with_interval(c.head, metrics, c.key, "head")
        if review.base_has_metrics:
            lines.append(f"| {name} | {base} | {head} | {fmt_delta(c)} | {verdict(c)} |")
        else:
            lines.append(f"| {name} | {head} |")
    return lines


def _without_intervals(metrics: dict[str, Change]) -> dict[str, Change]:
    """The numbers of a metrics file less the interval bounds, which are shown beside their numbers."""
    bounds = {k for key in metrics for pair in interval_keys(key) for k in pair if k in metrics}
    return {k: c for k, c in metrics.items() if k not in bounds}


def _details_sections(review: Review) -> list[tuple[str, list[Change], dict[str, Change]]]:
    """Everything but the headline, grouped: evaluate's other numbers, split counts, per-phase summaries."""
    full = review.metrics.get(EVALUATE, {})
    evaluate = _without_intervals(full)
    for key, _ in HEADLINE:
        evaluate.pop(key, None)
    sections = []
    for prefix, title in EVALUATE_GROUPS:
        group = [c for k, c in evaluate.items() if k.startswith(prefix)]
        if group:
            sections.append((f"{title} (`{EVALUATE}`: `{prefix[:-1]}`)", group, full))
        evaluate = {k: c for k, c in evaluate.items() if not k.startswith(prefix)}
    if evaluate:
        sections.append((f"Other numbers of `{EVALUATE}`", list(evaluate.values()), full))
    named = [(SPLIT, f"Split counts (`{SPLIT}`)")] + [(p, f"{t} (`{p}`)") for p, t in PHASE_SUMMARIES.items()]
    named += [(p, f"`{p}`") for p in sorted(set(review.metrics) - {EVALUATE, SPLIT, *PHASE_SUMMARIES})]
    for path, title in named:
        if path in review.metrics:
            metrics = review.metrics[path]
            sections.append((title, list(_without_intervals(metrics).values()), metrics))
    return sections


def render_report(review: Review, *, pictures_link: str | None = None) -> str:
    """GitHub-flavoured markdown: headline, parameters and stages, pictures, then the rest collapsed.

    pictures_link: for the pull-request comment, which cannot show local files: one link (to the CI
    artifact) replaces the inline pictures."""
    evaluate = review.metrics.get(EVALUATE, {})
    out = [f"## Model review: `{review.base.label}` → `{review.head.label}`", ""]
    if not review.base_has_metrics:
        out += [f"> **The base `{review.base.label}` has no metrics yet** (the first pull request of this "
                "pipeline, or its `dvc.lock` and metrics were never committed): the head is shown alone.", ""]
    for warning in review.warnings:
        out += [f"> ⚠️ {warning}", ""]
    n = evaluate.get(dotted(Report.TEST, Metric.N))
    sizes = "" if n is None else (f" (n = {fmt_value(n.base)} → {fmt_value(n.head)})" if review.base_has_metrics
                                  else f" (n = {fmt_value(n.head)})")
    has_ci = any(k.startswith(dotted(Report.TEST_CI95, "")) for k in evaluate)
    out += [f"### Test set{sizes}", ""]
    headline = [evaluate.get(key) or Change(key, None, None) for key, _ in HEADLINE]
    out += _table(headline, review, evaluate, labels=dict(HEADLINE))
    notes = ["better/worse follows each metric's direction"] if review.base_has_metrics else []
    if has_ci:
        unit = evaluate.get(dotted(Report.BOOTSTRAP, Bootstrap.UNIT))
        notes.append("(low–high): 95 % bootstrap interval" + (f", resampled by {unit.head}" if unit and unit.head else ""))
    out += ["", f"<sub>{'; '.join(notes)}.</sub>" if notes else "", ""]

    out += ["### Parameters changed", ""]
    if review.params:
        out += ["| parameter | base | head |", "|---|---|---|"]
        out += [f"| `{c.key}` | {_fmt_param(c.base)} | {_fmt_param(c.head)} |" for c in review.params]
    else:
        out.append("None (`dvc params diff` is empty).")
    out.append("")
    if review.reran and all(s.because == FIRST_RUN for s in review.reran):
        out.append(f"**Stages run:** all {len(review.reran)} ({FIRST_RUN}: the base has no `dvc.lock`).")
    elif review.reran:
        out.append("**Stages rerun:** " + "; ".join(f"`{s.name}` ({s.because})" for s in review.reran) + ".")
    else:
        out.append("**Stages rerun:** none (`dvc.lock` is the same).")
    if review.unchanged_stages:
        out[-1] += " **Unchanged:** " + ", ".join(f"`{s}`" for s in review.unchanged_stages) + "."
    out.append("")

    if review.pictures:
        out += ["### Pictures", ""]
        legend = "base (orange, wide) and head (blue, on top)" if review.base_has_metrics else "head alone"
        if pictures_link:
            names = ", ".join(f"`{name}`" for name in review.pictures)
            out += [f"[**Open the pictures**]({pictures_link}) ({legend}): {names}, and DVC's interactive "
                    "plots (`dvc_plots/index.html`), in this run's artifact.", ""]
        else:
            out += [f"{legend.capitalize()}.", ""]
            for name, caption in review.pictures.items():
                out += [f"![{caption}]({name})", ""]

    if review.card is not None:
        out += _card_section(review, pictures_link)

    out += ["<details>", "<summary>Everything else: validation, calibration, burden, split counts, "
            "training summaries</summary>", ""]
    for title, changes, metrics in _details_sections(review):
        out += [f"#### {title}", ""] + _table(changes, review, metrics) + [""]
    out += ["</details>", ""]
    return "\n".join(out)


def _card_section(review: Review, pictures_link: str | None) -> list[str]:
    """A link to the head's model card (copied into the report's folder) and its lines changed since the base."""
    card = review.card
    out = ["### Model card", ""]
    if card.head is None:
        return out + [f"The head has no `{MODEL_CARD}` (the evaluate stage writes it): run `dvc repro` and commit "
                      "it with `dvc.lock`.", ""]
    link = (f"[`{MODEL_CARD}`]({pictures_link})" + " (in this run's artifact)" if pictures_link
            else f"[`{MODEL_CARD}`](MODEL_CARD.md)")
    if card.base is None:
        return out + [f"{link} of the head: new in this revision (the base has none).", ""]
    changed = card.changed_lines()
    if not changed:
        return out + [f"{link} of the head: unchanged since the base.", ""]
    n = sum(1 for line in changed if line[:1] in "+-")
    out += [f"{link} of the head; its changed lines ({n}: `-` base, `+` head):", "", "````diff"]
    out += changed[:CARD_DIFF_LINES]
    if len(changed) > CARD_DIFF_LINES:
        out.append(f"@@ … {len(changed) - CARD_DIFF_LINES} more lines: see the card @@")
    return out + ["````", ""]


def build_review(repo: Path, base_name: str, head_name: str | None, out_dir: Path) -> Review:
    """Read both revisions through DVC and git, draw the pictures into `out_dir`; returns the review."""
    base, head = resolve_revision(repo, base_name), resolve_revision(repo, head_name)
    metrics = read_metrics(repo, base, head)
    evaluate = metrics.get(EVALUATE, {})
    if not any(c.head is not None for c in evaluate.values()):
        raise ReviewError(f"{head.label} has no {EVALUATE}: run `dvc repro` (or `dvc pull` its outputs) first")
    base_has_metrics = any(c.base is not None for c in evaluate.values())
    reran, unchanged = stages_rerun(read_lock(repo, base), read_lock(repo, head))
    review = Review(base, head, base_has_metrics, metrics, read_params(repo, base, head), reran, unchanged,
                    card=CardChange(read_card(repo, base), read_card(repo, head)))

    out_dir.mkdir(parents=True, exist_ok=True)
    if review.card.head is not None:  # beside report.md (the link) and in CI's artifact with the pictures
        (out_dir / "MODEL_CARD.md").write_text(review.card.head, encoding="utf-8")
    data = read_plot_data(repo, base, head, out_dir / "dvc_plots")
    review.warnings += _missing_plot_sources(data, review)
    sides = _sides(review)
    for name, caption, draw in (("confusion.png", "Confusion matrices, test set", draw_confusions),
                                ("roc_pr.png", "ROC and precision-recall curves, test set", draw_roc_pr),
                                ("training_curves.png", "Training curves of both phases", draw_training_curves)):
        if draw(data, sides, out_dir / name):
            review.pictures[name] = caption
        else:
            review.warnings.append(f"no data for {caption.lower()}: `{name}` not drawn")
    return review


def write_plots_html(repo: Path, review: Review, out_dir: Path) -> None:
    """DVC's own interactive page of both revisions (loads Vega from the internet when opened)."""
    try:
        run_dvc(["plots", "diff", *_rev_args(review.base, review.head), "-o", str(out_dir / "dvc_plots")], repo)
    except CommandError as err:
        log.warning("dvc plots diff could not write its HTML page: %s", err.stderr.strip()[-300:])


def write_review(repo: Path, base_name: str, head_name: str | None, out_dir: Path) -> Review:
    """`glomeruli review`: report.md (pictures inline) and comment.md (for the pull request) in out_dir."""
    out_dir = out_dir.resolve()
    review = build_review(repo, base_name, head_name, out_dir)
    write_plots_html(repo, review, out_dir)
    for warning in review.warnings:
        log.warning("%s", warning)
    (out_dir / "report.md").write_text(render_report(review), encoding="utf-8")
    comment = render_report(review, pictures_link=ARTIFACT_URL_PLACEHOLDER)
    (out_dir / "comment.md").write_text(f"{COMMENT_MARKER}\n{comment}", encoding="utf-8")
    return review
