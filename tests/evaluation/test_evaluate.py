"""The evaluate stage's own file, test_predictions.csv: its columns and rows are a format `glomeruli cv-summary`
reads from runs of earlier versions, so they are checked against the literal header here (the whole stage runs in
test_evaluate_outputs.py)."""

import numpy as np

from glomeruli.evaluation import evaluate

PROB = np.array([0.9, 0.2, 0.7])


def _test_set(probability: np.ndarray) -> evaluate.TestSet:
    return evaluate.TestSet(rows=np.arange(3), ids=np.array(["gs/a.png", "ngs/b.png", "gs/c.png"], dtype=object),
                            biopsies=np.array(["A", "A", "B"], dtype=object), labels=np.array([1, 0, 1]),
                            raw_probability=PROB, probability=probability, score=np.array([2.0, -1.5, 0.25]),
                            sites=np.array(["s1", "s1", "s2"], dtype=object))


def test_test_predictions_header_and_rows(tmp_path):
    path = tmp_path / "test_predictions.csv"
    evaluate.write_test_predictions(path, _test_set(PROB), 0.5, calibrated=False)
    assert path.read_text().splitlines() == [
        "name,biopsy,site,label,probability,score,predicted",
        "a.png,A,s1,1,0.900000,2.000000,1",
        "b.png,A,s1,0,0.200000,-1.500000,0",
        "c.png,B,s2,1,0.700000,0.250000,1"]


def test_calibrated_test_predictions_carry_both_probabilities(tmp_path):
    path = tmp_path / "test_predictions.csv"
    evaluate.write_test_predictions(path, _test_set(np.array([0.8, 0.3, 0.45])), 0.5, calibrated=True)
    lines = path.read_text().splitlines()
    assert lines[0] == "name,biopsy,site,label,probability,calibrated_probability,score,predicted"
    # predicted follows the calibrated probability: 0.45 is below the threshold though the raw 0.7 is above
    assert lines[3] == "c.png,B,s2,1,0.700000,0.450000,0.250000,0"
