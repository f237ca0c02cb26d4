"""A binary classifier's operating point and calibration, both chosen on a validation split.

A focal-loss model trained on imbalanced data ranks well but its P(positive) is not a
probability and 0.5 is not where it separates best. `fit_temperature` rescales its logit
(temperature scaling: p' = sigmoid(logit(p) / T), T by maximum likelihood on the validation
labels, smoothed as Platt's targets so a perfectly ranked validation split does not send T to
0; monotone, so the ranking and ROC-AUC stay the same, but for scores so far below 1e-300 or so
close to 1 that float64 cannot tell them apart); `choose_threshold` picks the decision
threshold on the calibrated validation probabilities: by the best F1 or the highest threshold
that keeps a target sensitivity, halfway in logit space between the validation cases it
separates, or by the best kernel-smoothed F1 (`smoothed_f1_threshold`). Plain numpy on the
host.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import expit
from scipy.stats import norm

from common.metrics import roc_auc

# The fit reads probabilities within 1e-7 of 0 or 1 as that far (a float32 softmax cannot
# resolve more near 1), so one saturated mistake does not decide the temperature.
PROB_CLIP = 1e-7
# Elsewhere only exact 0 and 1 are moved, to the nearest float64 inside (0, 1), so distinct
# scores keep distinct logits (a threshold between 1e-10 and 1e-9 stays between them).
_FINEST = (np.finfo(np.float64).smallest_subnormal, np.nextafter(1.0, 0.0))
_SYMMETRIC = (1.0 - np.nextafter(1.0, 0.0), np.nextafter(1.0, 0.0))
LOG_T_RANGE = (-4.0, 4.0)  # T in [e^-4, e^4]


def _logit(p: np.ndarray, bounds: tuple[float, float] = _FINEST) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), *bounds)
    return np.log(p) - np.log1p(-p)


def apply_temperature(prob_pos: np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit(p) / T), float64 (the identity at T = 1)."""
    return expit(_logit(prob_pos) / temperature)


def combine_folds(
    calibrated: list[np.ndarray], thresholds: list[float]
) -> tuple[np.ndarray, float]:
    """(probability (N,), threshold) of an ensemble of folds, each with its calibrated
    probabilities (N,) and its own threshold: both averaged in logit space, the space the
    thresholds were chosen in, so `probability >= threshold` when the folds' mean logit margin
    over their thresholds is >= 0. Over several folds logits are clipped symmetrically
    (+-36.7) so that a fold saturated at 0 does not outweigh one saturated at 1; one fold is
    returned as it is (its decisions exactly evaluate's, also below 1e-16)."""
    if len(calibrated) == 1:
        return np.asarray(calibrated[0], np.float64), float(thresholds[0])
    z = np.mean([_logit(q, _SYMMETRIC) for q in calibrated], axis=0)
    return expit(z), mean_threshold(thresholds)


def mean_threshold(thresholds: list[float]) -> float:
    """The folds' thresholds averaged in logit space (clipped as in `combine_folds`): the
    ensemble's threshold, and the one summary of several folds' thresholds that is."""
    if len(thresholds) == 1:
        return float(thresholds[0])
    return float(expit(np.mean([_logit(t, _SYMMETRIC) for t in thresholds])))


def _both_classes(labels: np.ndarray) -> bool:
    """Whether the labels hold both classes (else nothing can be fitted on them)."""
    y = np.asarray(labels)
    return len(y) > 0 and y.min() != y.max()


def _nll(targets: np.ndarray, z: np.ndarray, log_t: float) -> float:
    s = z / math.exp(log_t)
    # -[t log sigmoid(s) + (1 - t) log sigmoid(-s)], stably
    return float(np.mean(np.logaddexp(0.0, -s) * targets + np.logaddexp(0.0, s) * (1 - targets)))


def at_search_bound(temperature: float) -> bool:
    """Whether a fitted T sits at an end of LOG_T_RANGE (e^4: scores that rank the labels
    backwards, or by chance slightly so; e^-4: a margin too wide for any finite T to matter)."""
    return min(abs(math.log(temperature) - b) for b in LOG_T_RANGE) < 1e-3


def weak_validation(
    labels: np.ndarray, prob_pos: np.ndarray, temperature: float, smoothed: bool = False
) -> str | None:
    """Why the calibration fitted on these validation scores means little, or None: one class
    only (nothing is fitted: T 1 and threshold 0.5 are defaults), a ROC-AUC of at most 0.6
    (scores that hardly tell the classes apart; their fitted T lands anywhere from a few to
    the e^4 bound, by chance), a T at a search bound or, for a `smoothed` threshold, scores
    that do not spread in either class (the threshold is then the best F1's midpoint)."""
    y = np.asarray(labels)
    if not _both_classes(y):
        return (
            f"the validation split holds {'no case' if len(y) == 0 else 'one class only'} "
            f"({len(y)} cases, {int(y.sum())} malignant): the temperature (1) and threshold "
            "(0.5) are defaults, not fitted"
        )
    auc = roc_auc(labels, prob_pos)
    if not auc > 0.6 or at_search_bound(temperature):
        return (
            f"the validation scores hardly tell the classes apart (ROC-AUC {auc:.3f}, "
            f"temperature {temperature:.3g}): the calibrated probabilities and the threshold "
            "mean little"
        )
    if smoothed and not any(_bandwidths(y.astype(bool), _logit(prob_pos, _SYMMETRIC))):
        return "neither class's validation scores spread: the threshold is the best F1's midpoint"
    return None


def platt_targets(labels: np.ndarray) -> np.ndarray:
    """(N+ + 1) / (N+ + 2) for positives, 1 / (N- + 2) for negatives (Platt 1999): the
    posterior mean of each class's rate under a uniform prior, instead of 1 and 0, so that
    separable validation labels have a finite best temperature."""
    y = np.asarray(labels, np.float64)
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    return np.where(y > 0, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))


def fit_temperature(labels: np.ndarray, prob_pos: np.ndarray, iters: int = 100) -> float:
    """The T minimising the validation negative log-likelihood against Platt's targets
    (golden-section search on log T; unimodal in log T for a fixed logit sign pattern). 1.0
    when the labels hold one class only (nothing to fit)."""
    y = np.asarray(labels, np.float64)
    if not _both_classes(y):
        return 1.0
    y = platt_targets(y)
    z = _logit(prob_pos, (PROB_CLIP, 1 - PROB_CLIP))
    lo, hi = LOG_T_RANGE
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = _nll(y, z, a), _nll(y, z, b)
    for _ in range(iters):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = _nll(y, z, a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = _nll(y, z, b)
    return math.exp((lo + hi) / 2)


def choose_threshold(
    labels: np.ndarray,
    prob_pos: np.ndarray,
    target_sensitivity: float | None = None,
    smoothed: bool = False,
) -> float:
    """Decision threshold (predict positive when p >= threshold) on validation probabilities.

    Candidates are the midpoints in logit space between consecutive distinct scores (so no
    validation case sits on the boundary, and a gap between saturated and unsaturated scores
    is split in the model's own scale, not next to one side) and the ends. Default: the best
    F1 (ties: the higher threshold, fewer false positives). With `target_sensitivity`: the
    highest threshold whose sensitivity is at least the target. With `smoothed` (and no
    target): the best kernel-smoothed F1 (`smoothed_f1_threshold`). 0.5 when the labels hold
    one class only."""
    y = np.asarray(labels).astype(bool)
    p = np.asarray(prob_pos, np.float64)
    if not _both_classes(y):
        return 0.5
    if smoothed and target_sensitivity is None:
        t = smoothed_f1_threshold(y, p)
        if t is not None:
            return t
    s = np.unique(p)
    z = _logit(s)
    # rounding (and the finite logits of 0 and 1) can put a midpoint on or outside its gap
    halfway = np.clip(expit((z[:-1] + z[1:]) / 2), np.nextafter(s[:-1], 2.0), s[1:])
    candidates = np.concatenate([[s[0]], halfway, [np.nextafter(s[-1], 2.0)]])
    best, best_key = 0.5, None
    for t in candidates:
        pred = p >= t
        tp = int(np.sum(pred & y))
        fp = int(np.sum(pred & ~y))
        fn = int(np.sum(~pred & y))
        sens = tp / (tp + fn)
        if target_sensitivity is not None:
            key = (sens >= target_sensitivity, t if sens >= target_sensitivity else -t)
        else:
            f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
            key = (f1, t)
        if best_key is None or key > best_key:
            best, best_key = float(t), key
    return best


def _silverman(z: np.ndarray) -> float:
    """Silverman's rule-of-thumb bandwidth (0 for fewer than two distinct values)."""
    if len(z) < 2 or np.ptp(z) == 0:  # np.std of equal values can round to 1e-16
        return 0.0
    sd = float(np.std(z, ddof=1))
    iqr = float(np.subtract(*np.percentile(z, [75, 25]))) / 1.34
    return 0.9 * (min(sd, iqr) if iqr > 0 else sd) * len(z) ** -0.2


def _bandwidths(y: np.ndarray, z: np.ndarray) -> tuple[float, float]:
    """(positives', negatives') Silverman bandwidths of the logits z."""
    return _silverman(z[y]), _silverman(z[~y])


def smoothed_f1(y: np.ndarray, z: np.ndarray, at: np.ndarray, h1: float, h0: float) -> np.ndarray:
    """Expected F1 at logit thresholds `at` when each logit in z is a Gaussian of bandwidth h1
    (positives, y True) or h0: 2 TP / (TP + FP + P) with TP and FP sums of tail probabilities."""
    tp = norm.sf((at[:, None] - z[y][None]) / h1).sum(1)
    fp = norm.sf((at[:, None] - z[~y][None]) / h0).sum(1)
    return 2 * tp / (tp + fp + y.sum())


def smoothed_f1_threshold(labels: np.ndarray, prob_pos: np.ndarray) -> float | None:
    """The threshold of the best F1 when each validation case's logit is read as a Gaussian
    (each class's own Silverman bandwidth): expected true and false positives are sums of
    tail probabilities, so the threshold answers to every case near it and leans away from
    the side where F1 falls faster, instead of resting on the two extreme cases a best-F1
    interval is bounded by. Where both classes' tails vanish in float64 (a gap wider than
    about 14 bandwidths) the smoothed F1 is flat: then the middle of that plateau, about 6.7
    bandwidths inside the gap from either side. None when neither class's scores spread
    (nothing to smooth with)."""
    y = np.asarray(labels).astype(bool)
    z = _logit(prob_pos, _SYMMETRIC)
    h1, h0 = _bandwidths(y, z)
    if not (h1 > 0 or h0 > 0):
        return None
    h1, h0 = h1 or h0, h0 or h1  # a class without spread borrows the other's bandwidth
    # Quarter-bandwidth steps around every case (where the curve bends), and a coarse grid
    # across the gaps between them (where it is flat but a plateau's ends are sought).
    steps = np.linspace(-8, 8, 65)
    local = np.concatenate([z[y][:, None] + h1 * steps, z[~y][:, None] + h0 * steps]).ravel()
    pad = 8 * max(h1, h0)
    grid = np.unique(np.concatenate([local, np.linspace(z.min() - pad, z.max() + pad, 2001)]))
    points = len(grid)
    f1 = smoothed_f1(y, z, grid, h1, h0)
    near = f1 >= f1.max() * (1 - 1e-12)
    lo = hi = int(np.argmax(f1))
    while lo > 0 and near[lo - 1]:
        lo -= 1
    while hi < points - 1 and near[hi + 1]:
        hi += 1
    return float(expit((grid[lo] + grid[hi]) / 2))
