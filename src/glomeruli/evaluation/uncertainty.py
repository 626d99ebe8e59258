"""95 % bootstrap intervals for test metrics, resampling whole biopsies (images of one biopsy are not
independent: resampling them one by one would give intervals that are too narrow)."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

LEVEL = 0.95
FEW_UNITS = 5  # below this many biopsies a bootstrap interval says little


@dataclass(frozen=True)
class Interval:
    low: float | None  # None: no resample could compute the metric (e.g. AUC with one class)
    high: float | None

    def to_json(self) -> dict:
        return {"low": self.low, "high": self.high}


def resample_units(groups: np.ndarray) -> tuple[str, np.ndarray]:
    """What a bootstrap draws: whole groups (biopsies) when images share them, else single images.

    Returns the unit's name and, for every image, the index of its unit."""
    _, unit_of = np.unique(np.asarray(groups), return_inverse=True)
    n_units = int(unit_of.max()) + 1 if len(unit_of) else 0
    return ("biopsy" if n_units < len(unit_of) else "image"), unit_of.reshape(-1)


def rows_of_units(unit_of: np.ndarray) -> list[np.ndarray]:
    """The row indices of every unit, in unit order."""
    counts = np.bincount(unit_of)
    return np.split(np.argsort(unit_of, kind="stable"), np.cumsum(counts)[:-1])


def resample_rows(rows_of_unit: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Row indices of one resample: as many units as there are, drawn with replacement, each with all its rows."""
    drawn = rng.integers(0, len(rows_of_unit), len(rows_of_unit))
    return np.concatenate([rows_of_unit[u] for u in drawn])


def bootstrap_intervals(y_true: np.ndarray, prob: np.ndarray, groups: np.ndarray,
                        statistic: Callable[[np.ndarray, np.ndarray], dict[str, float]], *,
                        n_resamples: int, seed: int, level: float = LEVEL) -> dict[str, Interval]:
    """Percentile bootstrap interval of every value `statistic(y, prob)` returns.

    Resamples in which a metric is undefined (NaN, e.g. ROC-AUC of a resample holding one class) are left
    out of that metric's interval; their share is logged.
    """
    y_true, prob = np.asarray(y_true), np.asarray(prob)
    unit, unit_of = resample_units(groups)
    units = rows_of_units(unit_of)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        rows = resample_rows(units, rng)
        with warnings.catch_warnings():  # resamples holding one class make scikit-learn warn; counted below
            warnings.simplefilter("ignore")
            values = statistic(y_true[rows], prob[rows])
        for name, value in values.items():
            draws.setdefault(name, []).append(float(value))
    tail = (1 - level) / 2 * 100
    intervals = {}
    for name, values in draws.items():
        values = np.asarray(values)
        finite = values[np.isfinite(values)]
        if len(finite) < len(values):
            log.info("bootstrap: %s undefined in %d of %d resamples (left out)", name, len(values) - len(finite),
                     len(values))
        if not len(finite):
            intervals[name] = Interval(None, None)
            continue
        low, high = np.percentile(finite, [tail, 100 - tail])
        intervals[name] = Interval(float(low), float(high))
    log.info("bootstrap: %d resamples of %d %s units, %.0f %% intervals", n_resamples, len(units), unit, level * 100)
    if len(units) < FEW_UNITS:
        log.warning("bootstrap: only %d %s units in the test set: the intervals are crude; cross-validation "
                    "(glomeruli cv-summary) gives a steadier estimate", len(units), unit)
    return intervals


def format_interval(value: float, interval: Interval | dict | None, digits: int = 2) -> str:
    """'0.88 (0.75-0.97)' for plot titles; the bare value when there is no interval."""
    if isinstance(interval, Interval):
        interval = interval.to_json()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if not interval or interval.get("low") is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ({interval['low']:.{digits}f}\u2013{interval['high']:.{digits}f})"
