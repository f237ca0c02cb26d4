"""Metrics with their conventions pinned in one place (DESIGN.md, "Metric conventions").

Classification: class 1 (malignant) is positive; hard predictions are P(class 1) >= threshold
(0.5 = the original's argmax, ties going to class 0 there and to class 1 here only when both
probabilities are exactly 0.5). A ratio whose denominator is zero is 0, as scikit-learn's
`zero_division=0`. ROC-AUC and PR-AUC (average precision) are scikit-learn's definitions; both
are NaN when the labels hold one class only. Calibration uses P(class 1) in equal-width bins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

CLASSIFICATION_KEYS = (
    "accuracy",
    "precision",
    "sensitivity",
    "specificity",
    "f1",
    "g_mean",
    "balanced_accuracy",
    "roc_auc",
    "pr_auc",
)


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def confusion(labels: np.ndarray, preds: np.ndarray) -> dict[str, int]:
    labels, preds = np.asarray(labels).astype(int), np.asarray(preds).astype(int)
    return {
        "tp": int(np.sum((preds == 1) & (labels == 1))),
        "fp": int(np.sum((preds == 1) & (labels == 0))),
        "tn": int(np.sum((preds == 0) & (labels == 0))),
        "fn": int(np.sum((preds == 0) & (labels == 1))),
    }


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, from (0, 0) to (1, 1)."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    p, n = max(int(y.sum()), 1), max(int(len(y) - y.sum()), 1)
    tpr = np.r_[0.0, tps / p]
    fpr = np.r_[0.0, fps / n]
    return fpr, tpr, np.r_[np.inf, s[last_of_tie]]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        return math.nan
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """sum_n (R_n - R_{n-1}) P_n over the distinct thresholds (no interpolation)."""
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        return math.nan
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    s, y = np.asarray(scores, dtype=np.float64)[order], labels[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[last_of_tie]
    precision = tps / (last_of_tie + 1)
    recall = tps / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def classification_metrics(
    labels: np.ndarray, prob_pos: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """All headline metrics of a split from labels (N,) and P(class 1) (N,)."""
    labels = np.asarray(labels).astype(int)
    prob_pos = np.asarray(prob_pos, dtype=np.float64)
    c = confusion(labels, (prob_pos >= threshold).astype(int))
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    prec = _ratio(tp, tp + fp)
    return {
        "accuracy": _ratio(tp + tn, len(labels)),
        "precision": prec,
        "sensitivity": sens,
        "specificity": spec,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "g_mean": math.sqrt(sens * spec),
        "balanced_accuracy": (sens + spec) / 2,
        "roc_auc": roc_auc(labels, prob_pos),
        "pr_auc": average_precision(labels, prob_pos),
        **c,
        "n": len(labels),
        "n_positive": int(labels.sum()),
    }


def specificity_at_sensitivity(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The highest specificity of any threshold whose sensitivity is at least `target`."""
    if len(np.unique(labels)) < 2:
        return math.nan
    fpr, tpr, _ = roc_curve(labels, scores)
    ok = tpr >= target - 1e-12
    return float(1.0 - fpr[ok].min())


def bootstrap_ci(
    labels: np.ndarray,
    prob_pos: np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float],
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval over patients; resamples with one class only are skipped."""
    labels, prob_pos = np.asarray(labels), np.asarray(prob_pos)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(labels), len(labels))
        if len(np.unique(labels[idx])) < 2:
            continue
        v = metric(labels[idx], prob_pos[idx])
        if not math.isnan(v):
            values.append(v)
    if not values:
        return math.nan, math.nan
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def f1_at_half(labels: np.ndarray, prob_pos: np.ndarray) -> float:
    return classification_metrics(labels, prob_pos)["f1"]


def reliability(labels: np.ndarray, prob_pos: np.ndarray, bins: int = 10) -> dict[str, np.ndarray]:
    """Per equal-width bin of P(class 1): count, mean prediction, observed positive rate."""
    labels, prob_pos = np.asarray(labels, float), np.asarray(prob_pos, float)
    idx = np.clip((prob_pos * bins).astype(int), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    mean_pred = np.bincount(idx, prob_pos, bins) / np.maximum(count, 1)
    frac_pos = np.bincount(idx, labels, bins) / np.maximum(count, 1)
    return {"count": count, "mean_prediction": mean_pred, "fraction_positive": frac_pos}


def expected_calibration_error(labels: np.ndarray, prob_pos: np.ndarray, bins: int = 10) -> float:
    r = reliability(labels, prob_pos, bins)
    w = r["count"] / max(r["count"].sum(), 1)
    return float(np.sum(w * np.abs(r["mean_prediction"] - r["fraction_positive"])))


def clinical_extras(
    labels: np.ndarray, prob_pos: np.ndarray, n_resamples: int = 1000, seed: int = 0
) -> dict[str, float]:
    """What small imbalanced test sets need beside the headline metrics: bootstrap CIs of
    ROC-AUC and F1, specificity at 90 % and 95 % sensitivity, and calibration (ECE)."""
    ci = lambda fn: bootstrap_ci(labels, prob_pos, fn, n_resamples=n_resamples, seed=seed)
    return {
        "roc_auc_ci": ci(roc_auc),
        "f1_ci": ci(f1_at_half),
        "specificity_at_90_sensitivity": specificity_at_sensitivity(labels, prob_pos, 0.90),
        "specificity_at_95_sensitivity": specificity_at_sensitivity(labels, prob_pos, 0.95),
        "ece": expected_calibration_error(labels, prob_pos),
    }


def summarise_folds(per_fold: Sequence[dict[str, float]], keys: Sequence[str]) -> dict:
    """{key: {'mean', 'std'}} over folds (population std; NaN folds ignored)."""
    out = {}
    for k in keys:
        v = np.array([f[k] for f in per_fold], dtype=np.float64)
        v = v[~np.isnan(v)]
        out[k] = {
            "mean": float(v.mean()) if len(v) else math.nan,
            "std": float(v.std()) if len(v) else math.nan,
        }
    return out
