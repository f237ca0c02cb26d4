"""Segmentation metrics against a brute-force reference written here: surfaces by explicit
neighbour checks, distances by pairwise `cdist`, the percentile by hand."""

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from common import metrics as M

BRATS_DIAGONAL = math.sqrt(240**2 + 240**2 + 155**2)


# --- brute-force reference ---------------------------------------------------------------------


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a face neighbour that is background or outside the array."""
    surf = np.zeros_like(mask, dtype=bool)
    for idx in np.argwhere(mask):
        for axis in range(mask.ndim):
            for step in (-1, 1):
                n = idx.copy()
                n[axis] += step
                if n[axis] < 0 or n[axis] >= mask.shape[axis] or not mask[tuple(n)]:
                    surf[tuple(idx)] = True
    return surf


def brute_directed(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    pa = np.argwhere(brute_surface(a)) * np.asarray(spacing, float)
    pb = np.argwhere(brute_surface(b)) * np.asarray(spacing, float)
    return cdist(pa, pb).min(axis=1)


def percentile95(values: np.ndarray) -> float:
    """Linear interpolation between closest ranks (numpy's default method), by hand."""
    x = np.sort(values)
    h = (len(x) - 1) * 0.95
    lo = int(math.floor(h))
    hi = min(lo + 1, len(x) - 1)
    return float(x[lo] + (h - lo) * (x[hi] - x[lo]))


def brute_hd95(pred, gt, spacing, variant="medpy") -> float:
    d1, d2 = brute_directed(pred, gt, spacing), brute_directed(gt, pred, spacing)
    if variant == "medpy":
        return percentile95(np.concatenate([d1, d2]))
    return max(percentile95(d1), percentile95(d2))


def brute_dice(pred, gt) -> float:
    p, g = pred.ravel().tolist(), gt.ravel().tolist()
    inter = sum(1 for a, b in zip(p, g) if a and b)
    return 2 * inter / (sum(p) + sum(g))


def blob(rng, shape, smooth=2.0, level=0.3) -> np.ndarray:
    """A lumpy mask with an interior (so erosion matters), thresholded smoothed noise."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), smooth)
    return f > level * f.std()


def pair(rng, shape, kind):
    if kind == "blob":
        return blob(rng, shape), blob(rng, shape)
    # sparse noise: nearly every voxel is surface
    return rng.random(shape) < 0.15, rng.random(shape) < 0.1


# --- Dice, sensitivity, specificity ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(40, 36), (14, 16, 12)])
def test_dice_matches_brute_force(seed, shape):
    rng = np.random.default_rng(seed)
    p, g = pair(rng, shape, "blob")
    assert abs(M.dice(p, g) - brute_dice(p, g)) < 1e-6
    assert isinstance(M.dice(p, g), float)


def test_dice_by_hand_and_empty():
    p = np.zeros((4, 4), bool)
    g = np.zeros((4, 4), bool)
    p[0, :3] = True  # 3 voxels
    g[0, 1:4] = True
    g[1, :2] = True  # 5 voxels, overlap 2
    assert M.dice(p, g) == pytest.approx(4 / 8, abs=1e-12)
    z = np.zeros((5, 5, 5), bool)
    one = z.copy()
    one[2, 2, 2] = True
    assert M.dice(z, z) == 1.0
    assert M.dice(one, z) == 0.0 and M.dice(z, one) == 0.0
    assert M.dice(one, one) == 1.0


def test_sensitivity_specificity_by_hand_and_conventions():
    g = np.zeros(10, bool)
    g[:4] = True  # 4 foreground, 6 background
    p = np.zeros(10, bool)
    p[[0, 1, 2, 5]] = True  # TP 3, FN 1, FP 1, TN 5
    assert M.sensitivity(p, g) == pytest.approx(3 / 4)
    assert M.specificity(p, g) == pytest.approx(5 / 6)
    empty, full = np.zeros(10, bool), np.ones(10, bool)
    # no foreground to miss / no background to mislabel -> 1.0, whatever the prediction
    assert M.sensitivity(p, empty) == 1.0 and M.sensitivity(empty, empty) == 1.0
    assert M.specificity(p, full) == 1.0
    assert M.sensitivity(empty, g) == 0.0
    assert M.specificity(full, g) == 0.0


# --- HD95 against brute force ------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["blob", "sparse"])
@pytest.mark.parametrize(
    "shape,spacing",
    [
        ((40, 36), (1.0, 1.0)),
        ((40, 36), (0.7, 1.3)),
        ((14, 16, 12), (1.0, 1.0, 1.0)),
        ((14, 16, 12), (1.0, 1.0, 2.5)),
    ],
)
def test_hd95_matches_brute_force(seed, kind, shape, spacing):
    rng = np.random.default_rng(100 + seed)
    p, g = pair(rng, shape, kind)
    assert p.any() and g.any()
    for variant in M.HD95_VARIANTS:
        got = M.hd95(p, g, spacing, variant=variant)
        assert abs(got - brute_hd95(p, g, spacing, variant)) < 1e-3, variant
    assert M.hd95(p, g, spacing) == pytest.approx(M.hd95(g, p, spacing), abs=1e-12)


def test_hd95_anisotropic_spacing_by_hand():
    a = np.zeros((5, 5, 7), bool)
    b = np.zeros_like(a)
    a[2, 2, 1] = True
    b[2, 2, 3] = True  # two voxels apart on the last axis
    assert M.hd95(a, b, (1.0, 1.0, 2.5)) == pytest.approx(5.0)
    a2, b2 = np.zeros((7, 5, 5), bool), np.zeros((7, 5, 5), bool)
    a2[1, 2, 2] = b2[3, 2, 2] = True  # two voxels apart on the first axis
    assert M.hd95(a2, b2, (1.0, 1.0, 2.5)) == pytest.approx(2.0)
    c, d = np.zeros((6, 6), bool), np.zeros((6, 6), bool)
    c[1, 1] = d[4, 3] = True
    assert M.hd95(c, d, (0.7, 1.3)) == pytest.approx(math.hypot(3 * 0.7, 2 * 1.3))


def test_single_voxel_against_blob():
    rng = np.random.default_rng(7)
    g = blob(rng, (14, 16, 12))
    p = np.zeros_like(g)
    p[3, 4, 5] = True
    for spacing in [(1.0, 1.0, 1.0), (1.0, 1.0, 2.5)]:
        assert abs(M.hd95(p, g, spacing) - brute_hd95(p, g, spacing)) < 1e-3
    assert abs(M.dice(p, g) - brute_dice(p, g)) < 1e-6


def test_identical_masks_give_zero():
    rng = np.random.default_rng(3)
    for shape in [(40, 36), (14, 16, 12)]:
        m = blob(rng, shape)
        assert M.hd95(m, m) == 0.0
        assert M.hd95(m, m, variant="monai") == 0.0
        assert M.dice(m, m) == 1.0


# --- cropping and the array border -------------------------------------------------------------


def test_mask_touching_the_border():
    """Erosion treats outside the array as background: a face on the array edge is surface."""
    rng = np.random.default_rng(11)
    shape = (12, 14, 10)
    g = blob(rng, shape)
    g[:, :3, :] = True  # slab on the y = 0 face
    p = np.zeros(shape, bool)
    p[0:5, 0:6, 6:10] = True  # box in a corner: touches three faces
    full = np.ones(shape, bool)  # every face; its surface is the array's outer shell
    spacing = (1.0, 1.0, 2.5)
    for a, b in [(p, g), (full, g), (full, p)]:
        want = brute_hd95(a, b, spacing)
        assert abs(M.hd95(a, b, spacing) - want) < 1e-3
        # the same masks away from the edge (zero padding) give the same value
        pad = lambda m: np.pad(m, 3)
        assert abs(M.hd95(pad(a), pad(b), spacing) - want) < 1e-3
        for crop in (True, False):
            d1, d2 = M._surface_distances(a, b, np.asarray(spacing), crop=crop)
            assert abs(percentile95(np.concatenate([d1, d2])) - want) < 1e-3


def test_crop_is_exact_on_small_masks_in_a_larger_volume():
    rng = np.random.default_rng(5)
    vol = (32, 32, 32)
    p, g = np.zeros(vol, bool), np.zeros(vol, bool)
    p[20:30, 2:12, 22:32] = blob(rng, (10, 10, 10), smooth=1.5)
    g[18:28, 4:14, 20:30] = blob(rng, (10, 10, 10), smooth=1.5)
    s = np.array([0.9, 1.1, 2.0])
    cropped = M._surface_distances(p, g, s, crop=True)
    full = M._surface_distances(p, g, s, crop=False)
    for c, f in zip(cropped, full):
        np.testing.assert_allclose(np.sort(c), np.sort(f), atol=1e-9)
    assert abs(M.hd95(p, g, s) - brute_hd95(p, g, s)) < 1e-3


# --- empty conventions, variants, arguments ----------------------------------------------------


def test_empty_conventions():
    z = np.zeros((6, 7, 8), bool)
    one = z.copy()
    one[1, 2, 3] = True
    assert M.BRATS_EMPTY_HD95 == BRATS_DIAGONAL
    assert abs(M.BRATS_EMPTY_HD95 - 373.12866) < 1e-5
    for empty in ("brats", "passion"):
        assert M.hd95(z, z, empty=empty) == 0.0
    for a, b in [(one, z), (z, one)]:
        assert M.hd95(a, b) == BRATS_DIAGONAL
        assert M.hd95(a, b, (1.0, 1.0, 2.5)) == BRATS_DIAGONAL
        assert M.hd95(a, b, empty="passion") == 1.0
        assert M.hd95(a, b, empty="passion", variant="monai") == 1.0
    # both conventions agree when both masks are non-empty
    assert M.hd95(one, one, empty="passion") == 0.0
    with pytest.raises(ValueError):
        M.hd95(one, z, empty="nan")


def test_monai_variant_is_larger_on_asymmetric_masks():
    """The ground truth is the prediction plus a small distant blob: its few far surface voxels
    are over 5 % of one direction's distances but under 5 % of the pooled ones."""
    yy, xx = np.mgrid[:48, :48]
    p = (yy - 20) ** 2 + (xx - 20) ** 2 < 15**2
    g = p | ((yy - 42) ** 2 + (xx - 42) ** 2 < 2**2)
    for a, b in [(p, g), (g, p)]:
        medpy, monai = M.hd95(a, b), M.hd95(a, b, variant="monai")
        assert abs(medpy - brute_hd95(a, b, (1, 1))) < 1e-3
        assert monai > medpy + 10.0
        d_ab, d_ba = brute_directed(a, b, (1, 1)), brute_directed(b, a, (1, 1))
        assert abs(monai - max(percentile95(d_ab), percentile95(d_ba))) < 1e-3
    rng = np.random.default_rng(9)
    g3 = blob(rng, (16, 16, 16), smooth=3.0, level=-0.3)
    p3 = g3 & blob(rng, (16, 16, 16), smooth=2.0, level=0.8)
    assert p3.any()
    assert M.hd95(p3, g3, variant="monai") >= M.hd95(p3, g3)
    with pytest.raises(ValueError):
        M.hd95(p3, g3, variant="hausdorff")


def test_spacing_must_match_rank():
    rng = np.random.default_rng(2)
    p2, g2 = pair(rng, (20, 20), "blob")
    assert M.hd95(p2, g2) == M.hd95(p2, g2, (1.0, 1.0))
    with pytest.raises(ValueError):
        M.hd95(p2, g2, (1.0, 1.0, 1.0))
    p3, g3 = pair(rng, (8, 8, 8), "blob")
    assert M.hd95(p3, g3) == M.hd95(p3, g3, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        M.hd95(p3, g3, (1.0, 2.0))
    with pytest.raises(ValueError):
        M.dice(p2, g3)


# --- regions and ET post-processing ------------------------------------------------------------


def test_et_postprocess_threshold():
    labels = np.zeros((10, 10, 10), np.int32)
    labels[0, 0, :5] = 1
    labels.reshape(-1)[100:599] = 3  # 499 ET voxels
    before = labels.copy()
    assert not M.et_postprocess(labels).any()
    np.testing.assert_array_equal(labels, before)  # input untouched
    labels.reshape(-1)[599] = 3  # 500
    out = M.et_postprocess(labels)
    np.testing.assert_array_equal(out, labels == 3)
    assert out.dtype == bool
    assert M.et_postprocess(labels, min_voxels=501).sum() == 0
    assert M.et_postprocess(labels, et_label=1, min_voxels=5).sum() == 5


def test_et_threshold_follows_the_zoom():
    # 500 voxels of 1 mm are 62.5 voxels of 2 mm; the threshold is never below one voxel.
    assert M.et_min_voxels(1.0) == 500
    assert M.et_min_voxels(0.5) == 62
    assert M.et_min_voxels(1 / 3) == 19
    assert M.et_min_voxels(0.01) == 1
    labels = np.zeros((8, 8, 8), np.int32)
    labels.reshape(-1)[:70] = 3  # 70 ET voxels: kept at 2 mm, dropped at 1 mm
    kept = M.region_metrics(labels, labels, M.BRATS_REGIONS, et_min_voxels=M.et_min_voxels(0.5))
    dropped = M.region_metrics(labels, labels, M.BRATS_REGIONS)
    assert kept["et_post"]["dice"] == 1.0
    assert dropped["et_post"]["dice"] == 0.0


def _brats_maps(rng, shape=(20, 22, 18)):
    g = np.zeros(shape, np.int32)
    g[blob(rng, shape, smooth=3.0, level=-0.2)] = 2
    g[blob(rng, shape, smooth=3.0, level=0.4) & (g == 2)] = 1
    g[blob(rng, shape, smooth=2.0, level=0.9) & (g == 1)] = 3
    p = g.copy()
    flip = rng.random(shape) < 0.05
    p[flip] = rng.integers(0, 4, flip.sum())
    return p, g


def test_region_metrics_brats():
    rng = np.random.default_rng(4)
    p, g = _brats_maps(rng)
    spacing = (1.0, 1.0, 2.5)
    r = M.region_metrics(p, g, M.BRATS_REGIONS, spacing)
    assert set(r) == {"wt", "tc", "et", "et_post"}
    for name, labels in [("wt", (1, 2, 3)), ("tc", (1, 3)), ("et", (3,))]:
        pm, gm = np.isin(p, labels), np.isin(g, labels)
        assert set(r[name]) == set(M.SEGMENTATION_KEYS)
        assert abs(r[name]["dice"] - brute_dice(pm, gm)) < 1e-6
        assert abs(r[name]["hd95"] - brute_hd95(pm, gm, spacing)) < 1e-3
        assert r[name]["sensitivity"] == M.sensitivity(pm, gm)
        assert r[name]["specificity"] == M.specificity(pm, gm)
    # fewer than 500 predicted ET voxels here: ETPro scores an empty ET prediction
    assert 0 < (p == 3).sum() < 500 and (g == 3).any()
    assert r["et_post"]["dice"] == 0.0 and r["et_post"]["hd95"] == BRATS_DIAGONAL
    assert r["et"]["dice"] > 0.5
    assert "et_post" not in M.region_metrics(p, g, M.BRATS_REGIONS, spacing, et_post=False)
    passion = M.region_metrics(p, g, M.BRATS_REGIONS, spacing, empty="passion")
    assert passion["et_post"]["hd95"] == 1.0
    # an LGG-like case: no ET in the ground truth, a few spurious ET voxels predicted
    g2, p2 = g.copy(), p.copy()
    g2[g2 == 3] = 1
    p2[p2 == 3] = 1
    p2[0, 0, :3] = 3
    r2 = M.region_metrics(p2, g2, M.BRATS_REGIONS, spacing)
    assert r2["et"]["dice"] == 0.0 and r2["et"]["hd95"] == BRATS_DIAGONAL
    assert r2["et_post"]["dice"] == 1.0 and r2["et_post"]["hd95"] == 0.0


def test_region_metrics_myops_regions():
    rng = np.random.default_rng(6)
    g = rng.integers(0, 6, (40, 40))
    g = ndimage.median_filter(g, size=5)
    p = g.copy()
    p[10:20, 10:20] = 4  # turns some tissue into oedema
    r = M.region_metrics(p, g, M.MYOPS_REGIONS, (1.25, 1.25))
    assert set(r) == {"lvb", "rvb", "myo", "scar", "scar_oedema"}  # no et_post without "et"
    assert r["myo"]["dice"] == pytest.approx(
        brute_dice(np.isin(p, (1, 4, 5)), np.isin(g, (1, 4, 5)))
    )
    assert r["scar_oedema"]["dice"] == pytest.approx(
        brute_dice(np.isin(p, (4, 5)), np.isin(g, (4, 5)))
    )
    lvb = (p == 2), (g == 2)
    assert abs(r["lvb"]["hd95"] - brute_hd95(*lvb, (1.25, 1.25))) < 1e-3


# --- medpy itself, when installed (not a requirement) ------------------------------------------


def test_agrees_with_medpy_when_installed():
    binary = pytest.importorskip("medpy.metric.binary")
    rng = np.random.default_rng(12)
    for shape, spacing in [((40, 36), (0.7, 1.3)), ((14, 16, 12), (1.0, 1.0, 2.5))]:
        for kind in ("blob", "sparse"):
            p, g = pair(rng, shape, kind)
            assert abs(M.hd95(p, g, spacing) - binary.hd95(p, g, voxelspacing=spacing)) < 1e-9
            assert abs(M.dice(p, g) - binary.dc(p, g)) < 1e-12
