import itertools

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
