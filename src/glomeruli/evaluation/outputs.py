"""The names in the evaluate stage's outputs that other code reads: the keys of `metrics/evaluate.json`, the
columns of `metrics/plots/test_predictions.csv` and of the plot CSVs that dvc.yaml's `plots:` name. Evaluate writes them with these constants and `glomeruli
cv-summary`, `glomeruli review`, the model card and `glomeruli recalibrate` read them with the same ones.

The strings are a file format: `dvc metrics diff`, `dvc plots` and runs made by earlier versions read them, so
a value here never changes; a new name is added beside the old ones. Plain strings (paths from `core.paths`),
so any module may read them without loading numpy, scikit-learn or Keras.
"""

from __future__ import annotations

from glomeruli.core.paths import METRICS, PLOTS

TEST_PREDICTIONS_NAME = "test_predictions.csv"
CONFUSION_NAME, ROC_NAME, PR_NAME = "confusion.csv", "roc.csv", "precision_recall.csv"
BURDEN_NAME = "burden.csv"
# Relative to the project root, as git and `dvc exp` name them.
EVALUATE_JSON = METRICS.as_posix()
TEST_PREDICTIONS_CSV = (PLOTS / TEST_PREDICTIONS_NAME).as_posix()
BURDEN_CSV = (PLOTS / BURDEN_NAME).as_posix()


class Report:
    """Top-level keys of evaluate.json."""

    THRESHOLD = "threshold"
    THRESHOLD_RULE = "threshold_rule"
    THRESHOLD_RESAMPLES = "threshold_resamples"
    TEST = "test"  # Metric names, on the test set
    TEST_CI95 = "test_ci95"  # Metric name -> {"low", "high"}
    BOOTSTRAP = "bootstrap"  # Bootstrap keys
    CALIBRATION = "calibration"  # Calibration keys
    BURDEN = "burden"  # Burden keys
    VAL = "val"  # Metric names, on the validation set
    WARNINGS = "warnings"
    BY_SITE = "by_site"  # site -> Site
    SITE_GAP_ROC_AUC = "site_gap_roc_auc"
    GRADCAM_FOCUS = "gradcam_focus"


class Metric:
    """Keys of `metrics.binary_metrics`: evaluate.json's `test` and `val`, predict's and recalibrate's scores."""

    N = "n"
    ACCURACY = "accuracy"
    LOSS = "loss"
    PRECISION = "precision"
    RECALL = "recall"
    F1 = "f1"
    ROC_AUC = "roc_auc"
    PR_AUC = "pr_auc"
    BALANCED_ACCURACY = "balanced_accuracy"
    CONFUSION_MATRIX = "confusion_matrix"


# The metrics that are not one number of quality: no interval, not averaged over folds.
NOT_SCALAR = (Metric.N, Metric.CONFUSION_MATRIX)


class Calibration:
    """Keys of evaluate.json's `calibration` (BRIER and ECE: `calibration.calibration_metrics`)."""

    METHOD = "method"
    TEMPERATURE = "temperature"
    FITTED_ON = "fitted_on"
    BINS = "bins"
    BRIER = "brier"
    ECE = "ece"
    BRIER_UNCALIBRATED = "brier_uncalibrated"
    ECE_UNCALIBRATED = "ece_uncalibrated"


class Burden:
    """Keys of evaluate.json's `burden` (`burden.burden_summary`, and where the per-biopsy table is)."""

    CUTOFF_PCT = "cutoff_pct"
    N_BIOPSIES = "n_biopsies"
    N_GLOMERULI = "n_glomeruli"
    MAE_PCT_POINTS = "mae_pct_points"
    MAE_PCT_POINTS_MEAN_PROBABILITY = "mae_pct_points_mean_probability"
    WRONG_SIDE_OF_CUTOFF = "wrong_side_of_cutoff"
    WRONG_SIDE_OF_CUTOFF_MEAN_PROBABILITY = "wrong_side_of_cutoff_mean_probability"
    PER_BIOPSY = "per_biopsy"


class Bootstrap:
    """Keys of evaluate.json's `bootstrap` (what the intervals resampled)."""

    RESAMPLES = "resamples"
    LEVEL = "level"
    UNIT = "unit"
    UNITS = "units"
    SEED = "seed"


class Site:
    """Keys of each site in evaluate.json's `by_site` (`sites.site_metrics`)."""

    N = "n"
    SCLEROTIC = "sclerotic"
    ROC_AUC = "roc_auc"
    RECALL = "recall"
    SPECIFICITY = "specificity"
    F1 = "f1"
    BURDEN_MAE_PCT_POINTS = "burden_mae_pct_points"
    BIOPSIES = "biopsies"


def interval_key(name: str) -> str:
    """Where a number's 95 % interval sits beside it: `brier` -> `brier_ci95` (in `calibration`)."""
    return f"{name}_ci95"


def dotted(*keys: str) -> str:
    """A key as `dvc metrics diff` flattens it: dotted("test", "f1") -> "test.f1"."""
    return ".".join(keys)


class PredictionColumn:
    """Columns of test_predictions.csv, one row per test image."""

    NAME = "name"  # the image's file name
    BIOPSY = "biopsy"
    SITE = "site"
    LABEL = "label"  # 0 or 1
    PROBABILITY = "probability"  # the model's own
    CALIBRATED_PROBABILITY = "calibrated_probability"  # only when evaluate.calibration is on
    SCORE = "score"  # the calibrated logit, which ROC/PR-AUC rank
    PREDICTED = "predicted"  # 0 or 1, at the run's threshold


# Written spreadsheet-safe (csvcells): readers take the original back with csvcells.original_cell.
PREDICTION_TEXT_COLUMNS = (PredictionColumn.NAME, PredictionColumn.BIOPSY, PredictionColumn.SITE)
# What every run's file holds (site and score came later: readers default them).
PREDICTION_REQUIRED_COLUMNS = (PredictionColumn.NAME, PredictionColumn.BIOPSY, PredictionColumn.LABEL,
                               PredictionColumn.PROBABILITY, PredictionColumn.PREDICTED)


def prediction_columns(calibrated: bool) -> tuple[str, ...]:
    """test_predictions.csv's header, in order; the calibrated probability only when calibration is on."""
    c = PredictionColumn
    return (c.NAME, c.BIOPSY, c.SITE, c.LABEL, c.PROBABILITY, *((c.CALIBRATED_PROBABILITY,) if calibrated else ()),
            c.SCORE, c.PREDICTED)


class PlotColumn:
    """Columns of the plot CSVs: dvc.yaml's `plots:` use them as x and y (a test keeps the two equal), and
    `glomeruli review` reads them back from `dvc plots diff`."""

    ID = "id"  # confusion.csv: the image, actual and predicted class
    ACTUAL = "actual"
    PREDICTED = "predicted"
    FPR = "fpr"  # roc.csv
    TPR = "tpr"
    RECALL = "recall"  # precision_recall.csv
    PRECISION = "precision"
    THRESHOLD = "threshold"  # both curves: the probability at each point
