"""Do the probabilities mean what they say? Brier score, expected calibration error, reliability
table, and temperature scaling fitted on validation (applied by evaluate and by `glomeruli predict`;
`glomeruli recalibrate` refits it, with the threshold, on a lab's own labelled folder)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from glomeruli.evaluation.outputs import Calibration

log = logging.getLogger(__name__)

N_BINS = 10
# The model's float32 sigmoid saturates: probabilities are clipped so their logits stay finite (|logit| <= ~16).
_EPS = 1e-7
# Temperatures outside this range mean the validation set cannot support a fit (e.g. perfectly separated).
TEMPERATURE_BOUNDS = (0.05, 20.0)


def logit(prob: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(prob, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def apply_temperature(prob: np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit(prob) / T): T > 1 softens over-confident probabilities, T = 1 changes nothing."""
    prob = np.asarray(prob)
    if temperature == 1.0:
        return prob.astype(np.float64)
    return 1.0 / (1.0 + np.exp(-logit(prob) / temperature))


def _nll(y_true: np.ndarray, logits: np.ndarray) -> float:
    # log(1 + exp(-z)) for positives, log(1 + exp(z)) for negatives, computed without overflow
    signed = np.where(y_true == 1, logits, -logits)
    return float(np.mean(np.logaddexp(0.0, -signed)))


# Fewer validation images of a class than this and a fitted temperature follows a handful of points.
MIN_PER_CLASS = 5
# Weak Gaussian prior on log T (standard deviation, in units of log T) added to the mean NLL with weight 1/n:
# negligible on hundreds of images, enough to keep a nearly separated small set from driving T toward 0.
LOG_T_PRIOR_SD = 1.0


def is_separated(y_true: np.ndarray, prob: np.ndarray) -> bool:
    """True when every positive scores above every negative: NLL then falls for ever as T shrinks."""
    y_true, prob = np.asarray(y_true), np.asarray(prob)
    pos, neg = prob[y_true == 1], prob[y_true == 0]
    return bool(len(pos) and len(neg) and pos.min() > neg.max())


def fit_temperature(y_true: np.ndarray, prob: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of validation labels (Guo et al. 2017).

    The model outputs probabilities (its last layer is a float32 sigmoid), so the logits are recovered
    from them. A validation set that cannot support a fit keeps T = 1 and the log says why: fewer than
    MIN_PER_CLASS images of a class, or perfect separation (the likelihood has no minimum: T would run to 0
    and every probability would become 0 or 1, a certainty nothing supports). Otherwise the search over
    log T is bounded and carries a weak prior toward T = 1.
    """
    from scipy.optimize import minimize_scalar  # here, not at the top: `glomeruli predict` imports this module

    y_true = np.asarray(y_true)
    counts = {label: int(np.sum(y_true == label)) for label in (0, 1)}
    if min(counts.values()) < MIN_PER_CLASS:
        log.warning("temperature kept at 1: validation holds %d non-sclerotic and %d sclerotic images, fewer than "
                    "%d of a class to calibrate on", counts[0], counts[1], MIN_PER_CLASS)
        return 1.0
    if is_separated(y_true, prob):
        log.warning("temperature kept at 1: validation (%d images) is perfectly separated, so no temperature fits "
                    "it (the likelihood keeps rising as T falls to 0); the probabilities stay the model's own",
                    len(y_true))
        return 1.0
    logits = logit(prob)
    lo, hi = np.log(TEMPERATURE_BOUNDS)
    weight = 1.0 / (2 * LOG_T_PRIOR_SD**2 * len(y_true))
    result = minimize_scalar(lambda log_t: _nll(y_true, logits / np.exp(log_t)) + weight * log_t**2,
                             bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    temperature = float(np.exp(result.x))
    if np.isclose(temperature, TEMPERATURE_BOUNDS, rtol=1e-3).any():
        log.warning("temperature %.3g sits at its bound %s: the validation set (%d images) is too small or too "
                    "well separated to calibrate on", temperature, TEMPERATURE_BOUNDS, len(y_true))
    return temperature


def ranking_score(prob: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """logit(prob) / T: the calibrated logit, in the order of the model's own output.

    Metrics that rank (ROC-AUC, PR-AUC, pooled out-of-fold ones) use it instead of calibrated probabilities,
    which a small temperature saturates to exactly 0 or 1 in floating point: ties that would lower the AUC.
    """
    return logit(prob) / temperature


def prob_of_score(score: np.ndarray) -> np.ndarray:
    """The calibrated probability of a `ranking_score` (a calibrated logit); +inf (roc_curve's first) gives 1."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(score, dtype=np.float64)))


@dataclass(frozen=True)
class ReliabilityBin:
    low: float
    high: float
    count: int
    mean_probability: float  # nan when the bin is empty
    fraction_positive: float  # nan when the bin is empty


def reliability_bins(y_true: np.ndarray, prob: np.ndarray, n_bins: int = N_BINS) -> list[ReliabilityBin]:
    """Equal-width probability bins [0, 0.1), ..., [0.9, 1.0]: mean predicted probability vs observed
    fraction of globally sclerotic glomeruli in each."""
    y_true, prob = np.asarray(y_true, dtype=np.float64), np.asarray(prob, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(prob, edges[1:-1], right=False), 0, n_bins - 1)  # 1.0 falls in the last bin
    bins = []
    for b in range(n_bins):
        members = index == b
        count = int(members.sum())
        bins.append(ReliabilityBin(float(edges[b]), float(edges[b + 1]), count,
                                   float(prob[members].mean()) if count else float("nan"),
                                   float(y_true[members].mean()) if count else float("nan")))
    return bins


def expected_calibration_error(y_true: np.ndarray, prob: np.ndarray, n_bins: int = N_BINS) -> float:
    """Sum over bins of (share of images in the bin) x |mean probability - fraction positive|."""
    bins = reliability_bins(y_true, prob, n_bins)
    n = sum(b.count for b in bins)
    return float(sum(b.count / n * abs(b.mean_probability - b.fraction_positive) for b in bins if b.count))


def brier_score(y_true: np.ndarray, prob: np.ndarray) -> float:
    """Mean squared difference between probability and label (0 is perfect, 0.25 is a coin)."""
    from sklearn.metrics import brier_score_loss

    return float(brier_score_loss(y_true, prob, labels=[0, 1]))


def calibration_metrics(y_true: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    return {Calibration.BRIER: brier_score(y_true, prob), Calibration.ECE: expected_calibration_error(y_true, prob)}
