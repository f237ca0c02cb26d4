import dataclasses
import itertools
import pathlib

import numpy as np
import pytest
from scipy import ndimage

from common.loader import iterate
from dmaf_jax import data, splits
from dmaf_jax.modalities import BRATS, MYOPS


@pytest.mark.parametrize("plane", data.ROTATION_PLANES)
def test_rotation_equals_scipy(plane, rng):
    x = rng.normal(size=(13, 16, 11, 3)).astype(np.float32)
    for angle in (-10, -7, -1, 3, 9):
        want = np.stack(
            [
                ndimage.rotate(
                    x[..., c], angle, axes=plane, reshape=False, order=0, mode="constant", cval=-1
                )
                for c in range(3)
            ],
            -1,
        )
        np.testing.assert_array_equal(data.rotate(x, angle, plane, -1.0), want)


def test_read_crop_through_memmap(tmp_path, rng):
    vol = rng.normal(size=(20, 18, 16, 4)).astype(np.float32)
    np.save(tmp_path / "v.npy", vol)
    got = data.read_crop(str(tmp_path / "v.npy"), (3, 5, 7), (8, 8, 8))
    np.testing.assert_array_equal(got, vol[3:11, 5:13, 7:15])
    padded = data.read_crop(str(tmp_path / "v.npy"), (-2, 0, 10), (24, 8, 8))
    np.testing.assert_array_equal(padded[2:22, :, :6], vol[:, :8, 10:16])
    assert (padded[:2] == 0).all() and (padded[:, :, 6:] == 0).all()
    assert data.crop_origin((20, 10), (8, 16), None, random=False) == [6, -3]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    rng = np.random.default_rng(1)
    out = []
    for i in range(5):
        vol = rng.normal(size=(30, 28, 26, 4)).astype(np.float32)
        seg = rng.integers(0, 4, (30, 28, 26)).astype(np.uint8)
        np.save(root / f"c{i}_vol.npy", vol)
        np.save(root / f"c{i}_seg.npy", seg)
        mask = tuple(bool(b) for b in BRATS.combination_masks()[i * 3])
        out.append(
            data.Case(f"c{i}", str(root / f"c{i}_vol.npy"), str(root / f"c{i}_seg.npy"), mask)
        )
    return out


CFG = data.AugmentConfig(crop=(16, 16, 16))


def batches(cases, workers, n=4, seed=3, cfg=CFG):
    ds = data.train_dataset(BRATS, cases, cfg, seed=seed)
    return list(itertools.islice(iter(iterate(ds, workers, batch_size=2)), n))


def test_batches_shapes_masks(cases):
    for b in batches(cases, 0):
        assert b["image"].shape == (2, 16, 16, 16, 4) and b["image"].dtype == np.float32
        assert b["label"].shape == (2, 16, 16, 16) and b["label"].dtype == np.uint8
        assert b["mask"].shape == (2, 4) and b["mask"].dtype == bool
        for i, idx in enumerate(b["index"]):
            np.testing.assert_array_equal(b["mask"][i], cases[idx].mask)
            missing_channels = ~b["mask"][i]
            assert (b["image"][i][..., missing_channels] == 0).all()
            assert np.abs(b["image"][i][..., ~missing_channels]).sum() > 0
        assert set(np.unique(b["label"])) <= {0, 1, 2, 3}


def test_same_batches_with_0_and_2_workers(cases):
    a, b = batches(cases, 0), batches(cases, 2)
    for x, y in zip(a, b):
        for k in ("image", "label", "mask", "index"):
            np.testing.assert_array_equal(x[k], y[k])
    c = batches(cases, 0, seed=4)
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_plain_crop_without_augmentation(cases):
    cfg = data.AugmentConfig(
        crop=(16, 16, 16), rotation=0, intensity=0, flip=False, mask_mode="random"
    )
    b = batches(cases, 0, n=1, cfg=cfg)[0]
    case = cases[b["index"][0]]
    vol, seg = np.load(case.vol), np.load(case.seg)
    # Find the crop in the full volume: the label crop must appear verbatim.
    image, label, mask = b["image"][0], b["label"][0], b["mask"][0]
    found = False
    for x0, y0, z0 in itertools.product(range(15), range(13), range(11)):
        if np.array_equal(seg[x0 : x0 + 16, y0 : y0 + 16, z0 : z0 + 16], label):
            want = np.where(mask, vol[x0 : x0 + 16, y0 : y0 + 16, z0 : z0 + 16], 0)
            np.testing.assert_array_equal(image, want)
            found = True
            break
    assert found


def test_myops_centre_crop_pads():
    cfg = data.AugmentConfig(crop=(32, 32, 1), random_crop=False)
    assert data.crop_origin((40, 24, 1), cfg.crop, None, random=False) == [4, -4, 0]
    assert MYOPS.num_classes == 6 and BRATS.num_classes == 4


def test_splits():
    paper = splits.read_lists(splits.SHIPPED / "brats2020")
    assert [len(paper[s]) for s in ("train", "val", "test")] == [219, 50, 100]
    assert paper["train"][0].startswith(("HG_", "LG_"))
    myops = splits.read_lists(splits.SHIPPED / "myops2020")
    assert len(myops["train"]) == 80 and len(myops["test"]) == 22
    names = [f"myops_training_{c}_slice_{i}" for c in range(101, 111) for i in range(3)]
    s = splits.fresh_split(names, seed=0)
    assert s == splits.fresh_split(list(reversed(names)), seed=0)
    subjects = {k: {splits.subject_of(n) for n in v} for k, v in s.items()}
    assert not (subjects["train"] & subjects["test"]) and not (subjects["val"] & subjects["test"])
    assert sorted(sum(s.values(), [])) == sorted(names)


def test_myops_prepare_end_to_end(tmp_path):
    from configs import dmaf_myops2020
    from dmaf_jax import dataset

    cfg = dmaf_myops2020.get_config("smoke")
    prep = dataset.prepare(cfg, tmp_path)
    assert prep.summary["processed"] == 12 and not prep.summary["failed"]
    train = prep.cases("train")
    test_subjects = {splits.subject_of(c.name) for c in prep.cases("test")}
    assert test_subjects and not test_subjects & {splits.subject_of(c.name) for c in train}
    ds = data.train_dataset(prep.spec, train, dataset.augment_config(cfg), cfg.seed)
    b = next(iter(iterate(ds, batch_size=2)))
    assert b["image"].shape == (2, 32, 32, 1, 3) and b["label"].shape == (2, 32, 32, 1)
    assert b["label"].max() <= 5


def _label_of(x, y, z):
    """A label that changes under any flip or rotation of the grid (1..251, 0 stays fill)."""
    return ((x * 31 + y * 17 + z * 7) % 251 + 1).astype(np.uint8)


def _coordinate_case(tmp_path, shape):
    """Image channels 0-2 hold each voxel's coordinates + 1, channel 3 holds 1; the label is
    `_label_of` the coordinates. Any transform applied to one and not the other breaks the
    relation between them."""
    x, y, z = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    vol = np.stack([x + 1, y + 1, z + 1, np.ones(shape)], -1).astype(np.float32)
    np.save(tmp_path / "v.npy", vol)
    np.save(tmp_path / "s.npy", _label_of(x, y, z))
    return data.Case("c", str(tmp_path / "v.npy"), str(tmp_path / "s.npy"), (True,) * 4)


def _check_sample(out, shape):
    image, label = out["image"], out["label"]
    inside = label > 0
    coords = np.rint(image[..., :3]).astype(np.int64) - 1
    np.testing.assert_array_equal(image[..., :3][inside], coords[inside] + 1)  # no blending
    for a, s in enumerate(shape):
        assert (coords[..., a][inside] >= 0).all() and (coords[..., a][inside] < s).all()
    want = _label_of(coords[..., 0], coords[..., 1], coords[..., 2])
    np.testing.assert_array_equal(label[inside], want[inside])
    # Label fill (0: rotated in from outside, or padding) exactly where the image is fill.
    np.testing.assert_array_equal(~inside, np.isin(image[..., 3], (0.0, -1.0)))


def _orientation(image, inside):
    """Per axis a: +1 if coordinate a increases along axis a (not flipped), -1 if it decreases."""
    signs = []
    for a in range(3):
        if image.shape[a] == 1:
            signs.append(0)
            continue
        d = np.diff(image[..., a], axis=a)
        ok = np.diff(inside.astype(int), axis=a) == 0
        signs.append(int(np.sign(d[ok & np.take(inside, range(1, image.shape[a]), a)].sum())))
    return tuple(signs)


def _rotated_planes(image, inside):
    """Planes (a, b) in which coordinate a varies along axis b (a rotation there)."""
    planes = set()
    for a, b in itertools.permutations(range(3), 2):
        if image.shape[b] > 1:
            d = np.diff(image[..., a], axis=b)
            ok = np.take(inside, range(1, image.shape[b]), b) & np.take(
                inside, range(image.shape[b] - 1), b
            )
            if (d[ok] != 0).any():
                planes.add(tuple(sorted((a, b))))
    return planes


def test_augmented_label_matches_image_3d(tmp_path):
    shape = (20, 18, 16)
    case = _coordinate_case(tmp_path, shape)
    cfg = data.AugmentConfig(crop=(12, 12, 12), intensity=0)
    t = data.TrainTransform(BRATS, cfg)
    orientations, planes = set(), set()
    for seed in range(60):
        out = t.random_map((0, case), np.random.default_rng(seed))
        _check_sample(out, shape)
        inside = out["label"] > 0
        orientations.add(_orientation(out["image"], inside))
        planes |= _rotated_planes(out["image"], inside)
    for a in range(3):  # the test is not vacuous: every axis was seen flipped and not
        assert {o[a] for o in orientations} == {-1, 1}, orientations
    assert planes == set(data.ROTATION_PLANES)


def test_myops_rotates_every_slice_in_plane(tmp_path):
    from configs import dmaf_brats2020, dmaf_myops2020
    from dmaf_jax import dataset

    assert dataset.augment_config(dmaf_brats2020.get_config()).rotation_planes == (
        (0, 1),
        (1, 2),
        (0, 2),
    )
    cfg = dmaf_myops2020.get_config()
    assert cfg.data.rotation_planes == ((0, 1),)
    aug = dataset.augment_config(cfg)
    assert aug.rotation_planes == ((0, 1),)
    shape = (60, 70, 1)  # padded along H, cropped along W; 64 wide: a 1-degree turn shows
    case = _coordinate_case(tmp_path, shape)
    aug = dataclasses.replace(aug, crop=(64, 64, 1), intensity=0)
    t = data.TrainTransform(MYOPS, aug)
    rotated, orientations = 0, set()
    n = 60
    for seed in range(n):
        out = t.random_map((0, case), np.random.default_rng(seed))
        _check_sample(out, shape)
        inside = out["label"] > 0
        rotated += _rotated_planes(out["image"], inside) == {(0, 1)}
        orientations.add(_orientation(out["image"], inside)[:2])
    # Angles are integers in [-10, 10): 19 in 20 samples rotate (a third if planes touching
    # the size-1 depth axis were drawn and skipped).
    assert rotated >= 0.85 * n, rotated
    assert {o[0] for o in orientations} == {o[1] for o in orientations} == {-1, 1}


def test_rotation_plane_from_config(tmp_path, rng):
    vol = rng.normal(size=(12, 12, 12, 2)).astype(np.float32)
    seg = rng.integers(0, 4, (12, 12, 12)).astype(np.uint8)
    np.save(tmp_path / "v.npy", vol)
    np.save(tmp_path / "s.npy", seg)
    case = data.Case("c", str(tmp_path / "v.npy"), str(tmp_path / "s.npy"), (True, True))
    cfg = data.AugmentConfig(crop=(12, 12, 12), intensity=0, flip=False, rotation_planes=((1, 2),))
    spec = dataclasses.replace(BRATS, modalities=("a", "b"), combinations=("01", "10", "11"))
    t = data.TrainTransform(spec, cfg)
    for seed in range(5):
        out = t.random_map((0, case), np.random.default_rng(seed))
        matches = [
            a
            for a in range(-10, 10)
            if np.array_equal(out["label"], data.rotate(seg, a, (1, 2), 0))
            and np.array_equal(out["image"], data.rotate(vol, a, (1, 2), -1.0))
        ]
        assert matches, seed


def test_bad_rotation_planes_fail_at_once(tmp_path):
    from configs import dmaf_myops2020
    from dmaf_jax import dataset

    cfg = dmaf_myops2020.get_config("smoke")
    cfg.data.rotation_planes = ((0, 0),)
    with pytest.raises(ValueError, match="data.rotation_planes"):
        dataset.prepare(cfg, tmp_path)


def test_foreground_crops_hold_a_labelled_voxel(tmp_path):
    from dmaf_jax.data import foreground_origin

    seg = np.zeros((40, 36, 30), np.uint8)
    seg[3, 30, 25] = 2  # one labelled voxel near a corner
    np.save(tmp_path / "seg.npy", seg)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        o = foreground_origin(str(tmp_path / "seg.npy"), seg.shape, (16, 16, 16), rng)
        assert all(0 <= a <= s - 16 for a, s in zip(o, seg.shape))
        assert all(a <= v < a + 16 for a, v in zip(o, (3, 30, 25)))
    np.save(tmp_path / "empty.npy", np.zeros_like(seg))
    rng = np.random.default_rng(0)
    assert foreground_origin(str(tmp_path / "empty.npy"), seg.shape, (16,) * 3, rng) is None


def test_unusable_cases_are_replaced_by_the_next_named_and_counted(cases, tmp_path, caplog):
    # A truncated volume and one full of NaN: a sample that draws them holds the next usable
    # case instead and counts the replacement; a warning names the case and the file.
    bad = list(cases)
    truncated = tmp_path / "c1_vol.npy"
    truncated.write_bytes(pathlib.Path(cases[1].vol).read_bytes()[:500])
    nan_vol = np.load(cases[3].vol)
    nan_vol[:] = np.nan
    np.save(tmp_path / "c3_vol.npy", nan_vol)
    bad[1] = dataclasses.replace(cases[1], vol=str(truncated))
    bad[3] = dataclasses.replace(cases[3], vol=str(tmp_path / "c3_vol.npy"))
    t = data.TrainTransform(BRATS, CFG, bad)
    for i in range(5):
        out = t.random_map((i, bad[i]), np.random.default_rng(i))
        replaced = i in (1, 3)
        assert int(out["replaced"]) == replaced and int(out["index"]) == i + replaced
        assert np.isfinite(out["image"]).all()
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "training case c1" in warned and str(truncated) in warned
    assert "training case c3" in warned and "NaN" in warned
    everything_bad = [dataclasses.replace(c, vol=str(truncated)) for c in cases]
    with pytest.raises(ValueError, match="5 data elements in a row are unusable: training case"):
        t = data.TrainTransform(BRATS, CFG, everything_bad)
        t.random_map((0, cases[0]), np.random.default_rng(0))
