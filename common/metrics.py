"""Metrics with their conventions pinned in one place (DESIGN.md, "Metric conventions").

Classification: class 1 (malignant) is positive; hard predictions are P(class 1) >= threshold
(0.5 = the original's argmax, ties going to class 0 there and to class 1 here only when both
probabilities are exactly 0.5). A ratio whose denominator is zero is 0, as scikit-learn's
`zero_division=0`. ROC-AUC and PR-AUC (average precision) are scikit-learn's definitions; both
are NaN when the labels hold one class only. Calibration uses P(class 1) in equal-width bins.

Segmentation (boolean masks, 2-D or 3-D): Dice, medpy's HD95 and voxel sensitivity/specificity,
with the empty-mask conventions pinned in `hd95`, `sensitivity` and `specificity`; region
definitions for BraTS and MyoPS label maps and the BraTS ET post-processing are at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

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


def best_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    """The highest F1 of any threshold on `scores` (predict positive when score >= threshold):
    the validation F1 of the operating point `common.calibration.choose_threshold` picks (by
    F1) on these scores or any monotone recalibration of them, so a model is not judged by
    where its scores cross 0.5."""
    labels = np.asarray(labels).astype(int)
    positives, negatives = labels.sum(), len(labels) - labels.sum()
    if positives == 0:
        return 0.0
    fpr, tpr, _ = roc_curve(labels, scores)
    tp, fp = tpr * positives, fpr * negatives
    return float(np.max(2 * tp / (tp + fp + positives)))  # 2 TP / (2 TP + FP + FN)


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
    """{key: {'mean', 'std'}} over folds, NaN folds ignored. The std is the sample standard
    deviation (ddof 1), what "mean ± sd" over cross-validation folds conventionally reports;
    NaN with fewer than two folds."""
    out = {}
    for k in keys:
        v = np.array([f[k] for f in per_fold], dtype=np.float64)
        v = v[~np.isnan(v)]
        out[k] = {
            "mean": float(v.mean()) if len(v) else math.nan,
            "std": float(v.std(ddof=1)) if len(v) > 1 else math.nan,
        }
    return out


# --- Segmentation -------------------------------------------------------------------------------

# HD95 when exactly one mask is empty, BraTS convention: the diagonal of a 240x240x155 volume
# (373.1286...), kept as computed, independent of the spacing.
BRATS_EMPTY_HD95 = math.sqrt(240.0**2 + 240.0**2 + 155.0**2)
# The same case in the code base DMAF-Net forks (PASSION's `eval.py`): 1.0, which rewards a
# missed or spurious region with a near-perfect distance. Offered only as `empty="passion"`.
PASSION_EMPTY_HD95 = 1.0
_ONE_EMPTY_HD95 = {"brats": BRATS_EMPTY_HD95, "passion": PASSION_EMPTY_HD95}
HD95_VARIANTS = ("medpy", "monai")

# Internal label values: BraTS 0/1/2/4 on disk with 4 stored as 3; MyoPS 0 background,
# 1 normal myocardium, 2 LV blood pool, 3 RV blood pool, 4 oedema, 5 scar.
BRATS_REGIONS: dict[str, tuple[int, ...]] = {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)}
MYOPS_REGIONS: dict[str, tuple[int, ...]] = {
    "lvb": (2,),
    "rvb": (3,),
    "myo": (1, 4, 5),
    "scar": (5,),
    "scar_oedema": (4, 5),
}
SEGMENTATION_KEYS = ("dice", "hd95", "sensitivity", "specificity")
ET_MIN_VOXELS = 500


def _masks(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} != ground truth shape {g.shape}")
    return p, g


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2|P∩G| / (|P| + |G|) of boolean masks of one shape; both empty -> 1.0, one empty -> 0.0."""
    p, g = _masks(pred, gt)
    total = np.count_nonzero(p) + np.count_nonzero(g)
    if total == 0:
        return 1.0
    return float(2.0 * np.count_nonzero(p & g) / total)


def sensitivity(pred: np.ndarray, gt: np.ndarray) -> float:
    """TP / |G|. An empty ground truth gives 1.0: there is no foreground voxel to miss (unlike
    the classification part's 0, so that a correctly empty ET prediction is not penalised)."""
    p, g = _masks(pred, gt)
    n = np.count_nonzero(g)
    return float(np.count_nonzero(p & g) / n) if n else 1.0


def specificity(pred: np.ndarray, gt: np.ndarray) -> float:
    """TN / |not G|. A ground truth with no background voxel gives 1.0 (nothing to mislabel)."""
    p, g = _masks(pred, gt)
    n = g.size - np.count_nonzero(g)
    return float(np.count_nonzero(~p & ~g) / n) if n else 1.0


def _spacing(spacing: Sequence[float] | None, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    s = np.asarray(spacing, dtype=np.float64)
    if s.shape != (ndim,):
        raise ValueError(f"spacing {tuple(s.tolist())} does not match a {ndim}-D mask")
    return s


def _union_box(p: np.ndarray, g: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Bounding box of p | g (both non-empty) widened by `margin` voxels, clipped to the array."""
    union = p | g
    box = []
    for axis in range(union.ndim):
        others = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=others))
        box.append(slice(max(idx[0] - margin, 0), min(idx[-1] + 1 + margin, union.shape[axis])))
    return tuple(box)


def _surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: np.ndarray, crop: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (pred -> gt, gt -> pred) in mm of two non-empty masks, as
    medpy's `__surface_distances` computes them."""
    if crop:
        # Exact: every surface voxel lies inside the box, so the distance transform sees all of
        # them, and erosion with scipy's default border_value=0 treats the outside as background
        # whether that outside is the array edge or the cropped-away zeros.
        box = _union_box(pred, gt)
        pred, gt = pred[box], gt[box]
    footprint = ndimage.generate_binary_structure(pred.ndim, 1)
    pred_border = pred ^ ndimage.binary_erosion(pred, structure=footprint, iterations=1)
    gt_border = gt ^ ndimage.binary_erosion(gt, structure=footprint, iterations=1)
    d_pred = ndimage.distance_transform_edt(~gt_border, sampling=spacing)[pred_border]
    d_gt = ndimage.distance_transform_edt(~pred_border, sampling=spacing)[gt_border]
    return d_pred, d_gt


def hd95(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None = None,
    *,
    empty: str = "brats",
    variant: str = "medpy",
) -> float:
    """95th-percentile Hausdorff distance in mm of boolean masks `(H, W)` or `(D, H, W)`.

    `variant="medpy"` (default) replicates `medpy.metric.binary.hd95` exactly: a surface is
    `mask ^ binary_erosion(mask, generate_binary_structure(ndim, 1), iterations=1)` (6-connected
    in 3-D, 4-connected in 2-D; scipy's default border_value=0, so a mask touching the array edge
    has a surface there), the distance of each surface voxel of one mask to the other's surface is
    read from `distance_transform_edt(~other_surface, sampling=spacing)`, and the result is
    `np.percentile` (linear interpolation) at 95 of both directions' distances pooled.
    `variant="monai"` takes the larger of the two directed 95th percentiles instead (MONAI's
    `compute_hausdorff_distance(percentile=95)` on these surfaces); it is usually the larger value,
    though percentile interpolation can make the pooled one exceed it on tiny surfaces.

    `spacing`: one value per axis of the masks in mm; None means 1 on every axis.
    Masks are cropped to the bounding box of their union plus one voxel first (distances are
    translation-invariant; the result is identical), which makes large volumes cheap.

    Empty masks (`empty=`): "brats" (default) gives 0.0 when both are empty and
    `BRATS_EMPTY_HD95` = sqrt(240^2 + 240^2 + 155^2) when exactly one is; "passion" gives 0.0
    and 1.0, the code base DMAF-Net forks, a different and more lenient convention.
    """
    if empty not in _ONE_EMPTY_HD95:
        raise ValueError(f"empty must be one of {sorted(_ONE_EMPTY_HD95)}, got {empty!r}")
    if variant not in HD95_VARIANTS:
        raise ValueError(f"variant must be one of {HD95_VARIANTS}, got {variant!r}")
    p, g = _masks(pred, gt)
    s = _spacing(spacing, p.ndim)
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return 0.0
    if not has_p or not has_g:
        return _ONE_EMPTY_HD95[empty]
    d_pred, d_gt = _surface_distances(p, g, s)
    if variant == "medpy":
        return float(np.percentile(np.concatenate([d_pred, d_gt]), 95))
    return float(max(np.percentile(d_pred, 95), np.percentile(d_gt, 95)))


def et_min_voxels(zoom: float) -> int:
    """The ET threshold on a grid resampled by `zoom` per axis: 500 voxels of the 1 mm grid
    are 500 zoom^3 voxels there (at least 1)."""
    return max(1, round(ET_MIN_VOXELS * float(zoom) ** 3))


def et_postprocess(
    pred_labels: np.ndarray, et_label: int = 3, min_voxels: int = ET_MIN_VOXELS
) -> np.ndarray:
    """The ET mask scored as ETPro: `pred_labels == et_label`, emptied when it has fewer than
    `min_voxels` voxels (zeroed, not relabelled; spec 7.3). Same shape as `pred_labels`."""
    et = np.asarray(pred_labels) == et_label
    if np.count_nonzero(et) < min_voxels:
        et[...] = False
    return et


def region_metrics(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    regions: Mapping[str, Sequence[int]],
    spacing: Sequence[float] | None = None,
    *,
    empty: str = "brats",
    variant: str = "medpy",
    et_post: bool = True,
    et_min_voxels: int = ET_MIN_VOXELS,
) -> dict[str, dict[str, float]]:
    """{region: {dice, hd95, sensitivity, specificity}} of integer label maps of one shape.

    A region is the union of its labels (e.g. `BRATS_REGIONS`, `MYOPS_REGIONS`). With `et_post`
    and an "et" region of one label, "et_post" is added: the ET region with the prediction
    passed through `et_postprocess` with `et_min_voxels` (the ground truth unchanged).
    """
    pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
    out = {}

    def scores(p: np.ndarray, g: np.ndarray) -> dict[str, float]:
        return {
            "dice": dice(p, g),
            "hd95": hd95(p, g, spacing, empty=empty, variant=variant),
            "sensitivity": sensitivity(p, g),
            "specificity": specificity(p, g),
        }

    for name, labels in regions.items():
        out[name] = scores(np.isin(pred_labels, labels), np.isin(gt_labels, labels))
    if et_post and "et" in regions:
        (et_label,) = regions["et"]
        out["et_post"] = scores(
            et_postprocess(pred_labels, et_label, et_min_voxels), np.isin(gt_labels, regions["et"])
        )
    return out
