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
    p = np.array([0.2, 0.9, 1.0, 0.0, 1e-12, 1e-11])
    q = calibration.apply_temperature(p, 1.0)
    np.testing.assert_allclose(q, p, rtol=1e-12, atol=1e-300)  # T = 1: the identity
    q = calibration.apply_temperature(p, 0.2)
    assert np.all(np.diff(q[np.argsort(p)]) > 0)  # distinct scores stay distinct, 0 and 1 too
    assert calibration.fit_temperature(np.ones(4), p) == 1.0  # one class: nothing to fit
    assert not calibration.at_search_bound(1.0)
    assert calibration.fit_temperature([], []) == 1.0


def _sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, np.float64)))


def test_threshold_by_f1_and_by_sensitivity():
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7])
    y = np.array([0, 0, 1, 0, 1, 1])
    # between 0.2 and 0.3: tp 3, fp 1 -> F1 6/7, the best (0.5 gives 4/5, 0.35 gives 2/3);
    # the boundary is the midpoint in logit space
    between = _sigmoid((calibration._logit(0.2) + calibration._logit(0.3)) / 2)
    assert calibration.choose_threshold(y, p) == pytest.approx(between)
    assert calibration.choose_threshold(y, p, target_sensitivity=1.0) == pytest.approx(between)
    assert calibration.choose_threshold(y, p, target_sensitivity=0.6) == pytest.approx(0.5)
    assert calibration.choose_threshold(np.zeros(6), p) == 0.5


def test_threshold_is_the_logit_midpoint_of_a_separating_gap():
    """Scores that saturate on one side: a probability midpoint would sit next to the lowest
    positive (here 0.5 of it), a test positive just below it missed; the logit midpoint is
    as far from both classes in the model's own scale."""
    z = np.array([-9.0, -8.0, -7.0, -6.0, -1.0, 0.0, 2.0])
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    t = calibration.choose_threshold(y, _sigmoid(z))
    assert t == pytest.approx(_sigmoid(-3.5))
    assert calibration.choose_threshold(y, _sigmoid(z), target_sensitivity=1.0) == pytest.approx(t)


def test_temperature_of_separable_validation_stays_finite():
    """Perfectly ranked validation scores: maximum likelihood sends T to 0 (P = 0 or 1, a
    threshold squeezed onto one case); Platt's targets (N+ + 1)/(N+ + 2) and 1/(N- + 2) keep
    it where the calibrated probabilities stay below 1 and above 0."""
    z = np.r_[np.linspace(-5, -2, 70), np.linspace(0.5, 3, 10)]
    y = np.r_[np.zeros(70), np.ones(10)]
    t = calibration.fit_temperature(y, _sigmoid(z))
    assert not calibration.at_search_bound(t)
    q = calibration.apply_temperature(_sigmoid(z), t)
    assert q[y == 1].min() < 1 - 1 / 12 and q[y == 0].max() > 1 / 72  # the targets' reach
    assert q[y == 1].min() > 0.5 > q[y == 0].max()  # still separated at 0.5
    # the optimum against exactly these targets: d NLL / d(1/T) = mean((q - target) z) = 0
    np.testing.assert_allclose(calibration.platt_targets(y)[[0, -1]], [1 / 72, 11 / 12])
    np.testing.assert_allclose(calibration.platt_targets([1, 0, 0]), [2 / 3, 1 / 4, 1 / 4])
    gradient = np.mean((q - calibration.platt_targets(y)) * z)
    assert abs(gradient) < 1e-6, gradient  # other targets: T 0.63 to 1.54, |gradient| > 1e-2


def test_threshold_between_scores_that_saturate():
    """Scores below the fit's 1e-7 clip stay apart: the threshold separates them, halfway in
    logit space, not on a validation case."""
    y, q = np.array([0, 1, 1]), np.array([0.0, 1e-9, 0.9])
    t = calibration.choose_threshold(y, q)
    assert 0.0 < t < 1e-9
    y, q = np.array([0, 0, 1, 1]), np.array([1e-12, 1e-10, 1e-9, 0.9])
    assert calibration.choose_threshold(y, q) == pytest.approx(np.sqrt(1e-19), rel=1e-6)


def test_folds_combine_in_logit_space():
    q1, q2 = np.array([0.9, 0.2, 0.45]), np.array([0.6, 0.015, 0.02])
    p, t = calibration.combine_folds([q1], [0.4])
    np.testing.assert_allclose(p, q1, rtol=1e-12)  # one fold: unchanged
    assert t == pytest.approx(0.4, rel=1e-12)
    # one fold, scores saturated far below 1e-16: the same decisions as evaluate's q >= t
    tiny = np.array([1e-20, 1e-30])
    p, t = calibration.combine_folds([tiny], [1e-18])
    np.testing.assert_array_equal(p >= t, tiny >= 1e-18)
    p, t = calibration.combine_folds([q1, q2], [0.5, 0.01])
    logit = lambda x: np.log(x / (1 - x))  # noqa: E731
    np.testing.assert_allclose(logit(p), (logit(q1) + logit(q2)) / 2, rtol=1e-12)
    assert logit(t) == pytest.approx((logit(0.5) + logit(0.01)) / 2, rel=1e-12)
    # third case: just below fold 1's threshold (margin -0.20), twice fold 2's (+0.71): the mean
    # margin is positive, malignant (a mean probability 0.235 < mean threshold 0.255 said no)
    np.testing.assert_array_equal(p >= t, [True, False, True])


def test_uninformative_validation_is_flagged():
    """Backwards scores always put T at its upper bound; random ones put it anywhere, so the
    warning also reads the validation ROC-AUC (many cases here: AUC near 0.5 for every seed)."""
    rng = np.random.default_rng(0)
    y = (rng.random(80) < 0.125).astype(int)
    y[:2] = [0, 1]
    backwards = np.where(y == 1, 0.2, 0.8)
    t = calibration.fit_temperature(y, backwards)
    assert calibration.at_search_bound(t) and calibration.weak_validation(y, backwards, t)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        y = (rng.random(4000) < 0.125).astype(int)
        p = rng.random(4000)
        assert calibration.weak_validation(y, p, calibration.fit_temperature(y, p))
    z = np.r_[np.linspace(-5, -2, 70), np.linspace(0.5, 3, 10)]  # a model that ranks well
    y = np.r_[np.zeros(70), np.ones(10)]
    p = _sigmoid(z)
    assert calibration.weak_validation(y, p, calibration.fit_temperature(y, p)) is None


def test_best_f1_is_the_f1_at_the_chosen_threshold():
    """What makes f1_best_auc judge a checkpoint where evaluation will put its threshold: the
    best F1 over raw scores equals the F1 at choose_threshold on the calibrated ones."""
    from common import metrics

    for seed in range(20):
        rng = np.random.default_rng(seed)
        y = (rng.random(60) < 0.2).astype(int)
        y[:2] = [0, 1]
        p = np.round(rng.random(60) * 0.7 + 0.3 * y, 2).astype(np.float32)  # float32, ties
        q = calibration.apply_temperature(p, calibration.fit_temperature(y, p))
        t = calibration.choose_threshold(y, q)
        pred = q >= t
        f1 = 2 * np.sum(pred & (y == 1)) / (np.sum(pred) + np.sum(y))
        assert f1 == pytest.approx(metrics.best_f1(y, p)), seed


def test_a_calibration_applies_only_to_its_own_checkpoint(tmp_path, caplog):
    """evaluate with another eval.checkpoint (or criterion) then predict: the calibration
    fitted for one checkpoint must not be read for another's probabilities."""
    from famf_jax.operating_point import read_calibration, write_calibration

    calib = {"temperature": 0.8, "threshold": 0.3, "rule": "best F1", "valid_cases": 8}
    assert read_calibration(tmp_path, 0, 240) is None  # none written
    (tmp_path / "fold_0").mkdir()
    write_calibration(tmp_path, 0, {**calib, "step": 240})
    assert read_calibration(tmp_path, 0, 240)["threshold"] == 0.3
    assert read_calibration(tmp_path, 0, 150) is None
    assert "fitted for checkpoint 240, this run restores 150" in caplog.text
    write_calibration(tmp_path, 0, calib)  # written before steps were recorded
    assert read_calibration(tmp_path, 0, 240) is None


def test_a_calibration_applies_only_to_its_own_threshold_rule(tmp_path, caplog):
    """evaluate with the best-F1 rule, then predict asking for a target sensitivity: the
    best-F1 threshold must not be used as if it were the one asked for."""
    from famf_jax.operating_point import read_calibration, write_calibration

    (tmp_path / "fold_0").mkdir()
    calib = {"temperature": 0.8, "threshold": 0.3, "rule": "best F1", "step": 240}
    write_calibration(tmp_path, 0, calib)
    assert read_calibration(tmp_path, 0, 240, "best F1")["threshold"] == 0.3
    assert read_calibration(tmp_path, 0, 240, "sensitivity >= 0.95") is None
    assert "chosen by best F1, this run asks for sensitivity >= 0.95" in caplog.text


def test_a_validation_split_that_cannot_calibrate_is_named():
    """One class (or none): T 1 and threshold 0.5 are defaults, not fitted; the ROC-AUC is
    undefined (NaN), which a `<= 0.6` test would have let pass silently."""
    from ml_collections import ConfigDict

    from famf_jax.operating_point import fit_calibration

    p = np.array([0.1, 0.7, 0.4])
    for y, what in (([0, 0, 0], "one class only"), ([1, 1, 1], "one class only"), ([], "no case")):
        y = np.array(y)
        reason = calibration.weak_validation(y, p[: len(y)], 1.0)
        assert reason and what in reason, reason
    cfg = ConfigDict({"eval": {"operating_point": "f1", "target_sensitivity": 0.95}})
    calib = fit_calibration(cfg, np.zeros(3), p)
    assert (calib["temperature"], calib["threshold"]) == (1.0, 0.5)
    assert "one class only" in calib["warning"]
    y = np.array([0, 1, 0])  # ranked right
    assert fit_calibration(cfg, y, p)["warning"] is None
    cfg.eval.operating_point = "smoothed_f1"
    assert fit_calibration(cfg, y, p)["warning"] is None
    y, p = np.array([0, 0, 1, 1]), np.array([0.2, 0.2, 0.9, 0.9])  # nothing to smooth with
    assert "midpoint" in fit_calibration(cfg, y, p)["warning"]


def _fold(k, ids, y, p, t, threshold):
    """A fold as evaluate records it, from test labels, raw P(1), temperature, threshold."""
    from common import metrics
    from famf_jax.operating_point import operating_point_metrics

    q = calibration.apply_temperature(p, t)
    test = metrics.classification_metrics(y, p)
    test.update(metrics.clinical_extras(y, p, 20))
    test.update(operating_point_metrics(y, q, {"threshold": threshold}))
    calib = {"temperature": t, "threshold": threshold, "rule": "best F1", "warning": None}
    predictions = [
        {"patient_id": i, "label": int(c), "prob_malignant": float(v)} for i, c, v in zip(ids, y, p)
    ]
    fold = {"fold": k, "step": 10, "epoch": 1, "warm": True, "valid": {"f1_acc": 1.0}}
    return {**fold, "calibration": calib, "test": test, "predictions": predictions}, q


def test_several_folds_summarise_as_predict_decides(tmp_path):
    """Over folds the threshold in metrics.json is the one predict applies (logit mean, not a
    mean of probabilities: 0.5 and 0.01 give 0.091, not 0.255), and `ensemble` scores what
    predict outputs on the shared test set; folds with other test patients get no ensemble."""
    from common import metrics
    from configs.famf import get_config
    from famf_jax.evaluate import summarise_test, write_report

    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(30), np.ones(10)].astype(int)
    ids = [f"p{i}" for i in range(40)]
    p1, p2 = (np.clip(0.3 * y + rng.random(40) * 0.7, 0, 1) for _ in range(2))
    (f1, q1), (f2, q2) = _fold(0, ids, y, p1, 0.7, 0.5), _fold(1, ids, y, p2, 1.3, 0.01)
    out = summarise_test([f1, f2], [q1, q2])
    q, t = calibration.combine_folds([q1, q2], [0.5, 0.01])
    assert (
        out["operating_point"]["threshold"] == pytest.approx(t) == pytest.approx(0.0913, abs=1e-4)
    )
    assert out["operating_point"]["f1"] == pytest.approx(
        (f1["test"]["operating_point"]["f1"] + f2["test"]["operating_point"]["f1"]) / 2
    )
    assert (
        out["ensemble"]["operating_point"]["f1"]
        == metrics.classification_metrics(y, q, threshold=t)["f1"]
    )
    assert out["ensemble"]["roc_auc"] == metrics.roc_auc(y, q)
    other, _ = _fold(1, [f"q{i}" for i in range(40)], y, p2, 1.3, 0.01)
    assert "ensemble" not in summarise_test([f1, other], [q1, q2])
    # the report shows the ensemble column and names a fold that could not calibrate
    f2["calibration"]["warning"] = "the validation split holds one class only"
    result = {"criterion": "f1_acc", "test": out, "folds": [f1, f2], "data_problems": []}
    curves = [("fold 0", y, p1, q1), ("fold 1", y, p2, q2)]
    text = write_report(get_config("smoke"), tmp_path, result, curves, None).read_text()
    assert "| metric | value | ensemble |" in text
    assert f"| threshold | {t:.3f} | {t:.3f} |" in text
    assert "**Warning**, fold 1: the validation split holds one class only." in text


def _smoothed_f1_by_hand(y, z, t):
    """Expected F1 at logit threshold t, every logit a Gaussian of its class's Silverman
    bandwidth, written out case by case (math.erfc, no vectorising)."""
    import math

    def bandwidth(v):
        v = sorted(v)
        n = len(v)
        mean = sum(v) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
        iqr = (np.percentile(v, 75) - np.percentile(v, 25)) / 1.34
        return 0.9 * min(sd, iqr) * n**-0.2

    pos = [zi for zi, yi in zip(z, y) if yi]
    neg = [zi for zi, yi in zip(z, y) if not yi]
    h1, h0 = bandwidth(pos), bandwidth(neg)
    above = lambda x, h: 0.5 * math.erfc((t - x) / (h * math.sqrt(2)))  # P(x + noise >= t)
    tp = sum(above(x, h1) for x in pos)
    fp = sum(above(x, h0) for x in neg)
    return 2 * tp / (2 * tp + fp + (len(pos) - tp))


def test_smoothed_threshold_maximises_the_kernel_smoothed_f1():
    """The threshold's smoothed F1 is the best of any (a fine scan of the formula written by
    hand), and where the malignant scores spread wider than the benign ones it sits lower
    than the best-F1 midpoint: F1 falls faster on the side of the wider class."""
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(70), np.ones(10)].astype(bool)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        z = np.r_[rng.normal(-3, 1, 70), rng.normal(1, 2, 10)]
        t = float(
            calibration._logit(
                np.array(calibration.choose_threshold(y, _sigmoid(z), smoothed=True))
            )
        )
        scan = np.linspace(z.min() - 2, z.max() + 2, 2001)
        best = max(_smoothed_f1_by_hand(y, z, s) for s in scan)
        assert _smoothed_f1_by_hand(y, z, t) >= best - 1e-6, seed
        assert (
            _smoothed_f1_by_hand(y, z, t + 0.3) < best
            and _smoothed_f1_by_hand(y, z, t - 0.3) < best
        )
    # separable, benign tight and malignant wide: below the gap's middle, in the gap
    z = np.r_[np.linspace(-5, -4, 70), np.linspace(2, 8, 10)]
    t = float(
        calibration._logit(np.array(calibration.choose_threshold(y, _sigmoid(z), smoothed=True)))
    )
    mid = float(calibration._logit(np.array(calibration.choose_threshold(y, _sigmoid(z)))))
    assert mid == pytest.approx(-1.0, abs=1e-9) and -4 < t < mid - 0.5
    # classes packed within a few thousandths of a logit beside saturated outliers (a grid
    # even across the range would step over them): the best is found between the classes
    z = np.r_[-40, np.linspace(-0.003, -0.0003, 69), 40, np.linspace(0.0003, 0.003, 9)]
    p = _sigmoid(z)
    t = float(calibration._logit(np.array(calibration.choose_threshold(y, p, smoothed=True))))
    assert -0.0003 < t < 0.0003, t
    # nothing to smooth with (each class one value): the best-F1 midpoint; a target
    # sensitivity is not smoothed
    z = np.r_[np.full(70, -3.0), np.full(10, 2.0)]
    assert calibration.choose_threshold(
        y, _sigmoid(z), smoothed=True
    ) == calibration.choose_threshold(y, _sigmoid(z))
    z = np.r_[rng.normal(-3, 1, 70), rng.normal(1, 2, 10)]
    assert calibration.choose_threshold(
        y, _sigmoid(z), 0.9, smoothed=True
    ) == calibration.choose_threshold(y, _sigmoid(z), 0.9)
