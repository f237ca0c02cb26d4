import math

import numpy as np
import pytest
from sklearn import metrics as skm

from common import metrics


@pytest.mark.parametrize("seed", range(5))
def test_against_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = 60
    y = (rng.random(n) < 0.2).astype(int)
    y[:2] = [0, 1]
    p = np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1)
    p[5:15] = np.round(p[5:15], 1)  # ties
    m = metrics.classification_metrics(y, p)
    pred = (p >= 0.5).astype(int)
    np.testing.assert_allclose(m["accuracy"], skm.accuracy_score(y, pred))
    np.testing.assert_allclose(m["precision"], skm.precision_score(y, pred, zero_division=0))
    np.testing.assert_allclose(m["sensitivity"], skm.recall_score(y, pred))
    np.testing.assert_allclose(m["specificity"], skm.recall_score(1 - y, 1 - pred))
    np.testing.assert_allclose(m["f1"], skm.f1_score(y, pred, zero_division=0))
    np.testing.assert_allclose(m["balanced_accuracy"], skm.balanced_accuracy_score(y, pred))
    np.testing.assert_allclose(m["roc_auc"], skm.roc_auc_score(y, p))
    np.testing.assert_allclose(m["pr_auc"], skm.average_precision_score(y, p))
    np.testing.assert_allclose(m["g_mean"], math.sqrt(m["sensitivity"] * m["specificity"]))
    fpr, tpr, _ = skm.roc_curve(y, p, drop_intermediate=False)
    want = 1 - fpr[tpr >= 0.9].min()
    np.testing.assert_allclose(metrics.specificity_at_sensitivity(y, p, 0.9), want)


@pytest.mark.parametrize("seed", range(4))
def test_best_f1_is_the_best_threshold_f1(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(50) < 0.25).astype(int)
    y[:2] = [0, 1]
    p = np.round(rng.random(50) * 0.6 + 0.4 * y, 1 + seed % 2)  # ties at seed 0, 2
    prec, rec, _ = skm.precision_recall_curve(y, p)
    with np.errstate(invalid="ignore"):
        want = np.nanmax(2 * prec * rec / (prec + rec))
    assert metrics.best_f1(y, p) == pytest.approx(want)
    brute = max(skm.f1_score(y, p >= t, zero_division=0) for t in np.unique(p))
    assert metrics.best_f1(y, p) == pytest.approx(brute)
    assert metrics.best_f1(np.zeros(4), p[:4]) == 0.0  # no positives: no F1 above 0


def test_degenerate_cases():
    y = np.zeros(5, int)
    m = metrics.classification_metrics(y, np.full(5, 0.1))
    assert math.isnan(m["roc_auc"]) and m["f1"] == 0 and m["specificity"] == 1
    lo, hi = metrics.bootstrap_ci(np.array([0, 1] * 20), np.linspace(0, 1, 40), metrics.roc_auc)
    assert 0 <= lo <= hi <= 1


def test_calibration():
    y = np.array([0, 0, 1, 1])
    assert metrics.expected_calibration_error(y, np.array([0.0, 0.0, 1.0, 1.0])) == 0
    np.testing.assert_allclose(metrics.expected_calibration_error(y, np.full(4, 0.75)), 0.25)


def test_summarise_folds():
    s = metrics.summarise_folds([{"f1": 0.5}, {"f1": 0.7}], ["f1"])
    np.testing.assert_allclose([s["f1"]["mean"], s["f1"]["std"]], [0.6, 0.1 * np.sqrt(2)])
    one = metrics.summarise_folds([{"f1": 0.5}, {"f1": float("nan")}], ["f1"])
    assert one["f1"]["mean"] == 0.5 and np.isnan(one["f1"]["std"])
