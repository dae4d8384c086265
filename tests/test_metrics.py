"""Per-class metrics against scikit-learn, calibration on constructed examples with known values."""

from typing import Any

import numpy as np
import pytest
from sklearn.metrics import classification_report

from flaxvision import metrics

sk_report: Any = classification_report  # (its stubs type the dict output loosely)


def test_per_class_metrics_equal_scikit_learns_classification_report():
    rng = np.random.default_rng(0)
    names = ["a", "b", "c", "d", "e"]
    truth = rng.choice([0, 1, 2, 4], 200)  # "d" has no images
    pred = np.where(rng.uniform(size=200) < 0.6, truth, rng.choice([0, 1, 3, 4], 200))  # "c" is never predicted
    confusion = np.zeros((5, 5), np.int64)
    np.add.at(confusion, (truth, pred), 1)
    ours = metrics.classification_report(confusion, names)
    present = sorted(set(truth) | set(pred))
    theirs = sk_report(truth, pred, labels=present, target_names=[names[i] for i in present], output_dict=True,
                       zero_division=0)  # fmt: skip
    for i in present:
        for key, sk_key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"), ("support", "support")):
            assert ours["per_class"][names[i]][key] == pytest.approx(theirs[names[i]][sk_key], abs=1e-12), (names[i], key)
    for avg, sk_avg in (("macro_avg", "macro avg"), ("weighted_avg", "weighted avg")):
        for key, sk_key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert ours[avg][key] == pytest.approx(theirs[sk_avg][sk_key], abs=1e-12), (avg, key)


def test_ece_of_a_constructed_example():
    # Two examples at confidence 0.95 (one right, one wrong) and two at 0.55 (both right): each bin is 0.45 off.
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 1])
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.45)
    assert metrics.expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == 0.0  # certain and right


def test_brier_score_bounds():
    assert metrics.brier_score(np.eye(3), np.arange(3)) == 0.0
    assert metrics.brier_score(np.full((2, 2), 0.5), np.array([0, 1])) == pytest.approx(0.5)
    assert metrics.brier_score(np.array([[0.0, 1.0]]), np.array([0])) == pytest.approx(2.0)


def test_temperature_fit_recovers_an_overconfident_models_scale_and_lowers_nll():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(4000, 10)) * 2.0
    labels = np.array([rng.choice(10, p=p) for p in metrics.softmax(z)])  # labels drawn from softmax(z)
    logits = 4.0 * z  # a model four times too confident
    fit = metrics.calibration(logits, labels)
    assert fit["temperature"] == pytest.approx(4.0, rel=0.1)
    assert fit["nll_after_temperature"] < fit["nll"] - 0.5
    assert fit["ece_after_temperature"] < fit["ece"] / 2
    assert fit["nll"] == pytest.approx(metrics.nll(logits, labels))
