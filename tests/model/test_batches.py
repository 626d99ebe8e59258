"""The training input pipeline (glomeruli.model.batches): reshuffled, repeatable batches and class weights."""

from __future__ import annotations

import numpy as np
import pytest

from glomeruli.model.batches import Batches, sample_weights
from glomeruli.model.inference import ArrayRows


def test_batches_reshuffle_per_epoch_and_repeat_exactly():
    x = ArrayRows(np.arange(10, dtype=np.float32)[:, None])
    y = np.arange(10) % 2
    a, b = Batches(x, y, 4, seed=1), Batches(x, y, 4, seed=1)
    first = [a[i][1].tolist() for i in range(len(a))]
    assert first == [b[i][1].tolist() for i in range(len(b))] and len(a) == 3
    a.on_epoch_end()
    assert [a[i][0].ravel().tolist() for i in range(3)] != [b[i][0].ravel().tolist() for i in range(3)]
    assert sorted(np.concatenate([a[i][0].ravel() for i in range(3)]).tolist()) == list(range(10))


def test_balanced_sample_weights():
    labels = np.array([0] * 8 + [1] * 2)
    w = sample_weights(labels, "balanced")
    # n / (2 * n_class): 10 / 16 for each of the 8 negatives, 10 / 4 for each of the 2 positives
    np.testing.assert_allclose(w, [0.625] * 8 + [2.5] * 2)
    assert w[labels == 0].sum() == pytest.approx(w[labels == 1].sum())
    assert sample_weights(labels, "none") is None
