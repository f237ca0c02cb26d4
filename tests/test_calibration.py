"""Temperature scaling and the validation-chosen operating point (common/calibration.py)."""

import numpy as np
import pytest

from common import calibration


def test_temperature_recovers_an_overconfident_model():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z))).astype(int)
    p = 1 / (1 + np.exp(-3 * z))  # logits three times too large
    t = calibration.fit_temperature(y, p)
    assert t == pytest.approx(3.0, rel=0.05)
    q = calibration.apply_temperature(p, t)
    np.testing.assert_allclose(q, 1 / (1 + np.exp(-z)), atol=0.03)
    assert np.all(np.diff(q[np.argsort(p)]) >= 0)  # monotone: the ranking is kept


def test_temperature_edge_cases():
    p = np.array([0.2, 0.9, 1.0, 0.0])
    np.testing.assert_allclose(calibration.apply_temperature(p, 1.0), [0.2, 0.9, 1 - 1e-7, 1e-7])
    assert calibration.fit_temperature(np.ones(4), p) == 1.0  # one class: nothing to fit
    assert calibration.fit_temperature([], []) == 1.0


def test_threshold_by_f1_and_by_sensitivity():
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7])
    y = np.array([0, 0, 1, 0, 1, 1])
    # >= 0.25: tp 3, fp 1 -> F1 6/7, the best (0.5 gives 4/5, 0.35 gives 2/3)
    assert calibration.choose_threshold(y, p) == pytest.approx(0.25)
    assert calibration.choose_threshold(y, p, target_sensitivity=1.0) == pytest.approx(0.25)
    assert calibration.choose_threshold(y, p, target_sensitivity=0.6) == pytest.approx(0.5)
    assert calibration.choose_threshold(np.zeros(6), p) == 0.5
