"""Raw label values -> stored classes, value by value, through preprocessing (spec 1.1, 1.6).

A permuted label map keeps the set of stored classes and their count, so only a check of each
raw value at known voxels catches it.
"""

import nibabel as nib
import numpy as np
import pytest

from dmaf_jax import preprocess
from dmaf_jax.modalities import BRATS, MYOPS

MYOPS_MAP = {0: 0, 200: 1, 500: 2, 600: 3, 1220: 4, 2221: 5}  # spec 1.6, written out again
BRATS_MAP = {0: 0, 1: 1, 2: 2, 4: 3}  # spec 1.1


def _label_volume(shape, values, rng):
    """Each value on its own blocks, in an order that differs per slice along the last axis."""
    raw = np.zeros(shape, np.int16)
    blocks = [(i, j) for i in range(0, shape[0], 3) for j in range(0, shape[1], 3)]
    for k in range(shape[2]):
        order = rng.permutation(len(blocks))
        for b, idx in enumerate(order):
            i, j = blocks[idx]
            raw[i : i + 3, j : j + 3, k] = values[b % len(values)]
    return raw


def _write_case(folder, case, suffixes, label_suffix, label, rng):
    folder.mkdir(parents=True)
    affine = np.diag([1.25, 1.25, 5.0, 1.0])
    for s in suffixes:  # positive everywhere: every voxel is foreground for the z-scores
        img = rng.uniform(10, 100, label.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(img, affine), folder / f"{case}_{s}.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / f"{case}_{label_suffix}.nii.gz")


def test_label_maps_are_the_spec():
    assert MYOPS.label_map == MYOPS_MAP and BRATS.label_map == BRATS_MAP


def test_myops_label_values_one_by_one(tmp_path):
    rng = np.random.default_rng(0)
    case = "myops_training_101"
    raw = _label_volume((18, 15, 3), list(MYOPS_MAP), rng)
    _write_case(tmp_path / "raw" / case, case, MYOPS.file_suffixes, "gd", raw, rng)
    result = preprocess.preprocess(MYOPS, tmp_path / "raw", tmp_path / "out")
    assert not result.failed, result.failed
    for k in range(raw.shape[2]):
        seg = np.load(tmp_path / "out" / "seg" / f"{case}_slice_{k}_seg.npy")
        assert seg.shape == raw.shape[:2] + (1,) and seg.dtype == np.uint8
        for value, cls in MYOPS_MAP.items():
            where = raw[..., k] == value
            assert where.any()
            np.testing.assert_array_equal(
                seg[..., 0][where], cls, err_msg=f"raw {value} in slice {k}"
            )


@pytest.mark.parametrize("seed", [0, 1])
def test_brats_label_values_one_by_one(tmp_path, seed):
    rng = np.random.default_rng(seed)
    case = "BraTS20_Training_001"
    raw = _label_volume((12, 12, 8), list(BRATS_MAP), rng)
    _write_case(tmp_path / "raw" / case, case, BRATS.file_suffixes, "seg", raw, rng)
    # The brain fills the volume and min_size fits it: the crop is the whole volume.
    result = preprocess.preprocess(BRATS, tmp_path / "raw", tmp_path / "out", min_size=8)
    assert not result.failed, result.failed
    seg = np.load(tmp_path / "out" / "seg" / f"HG_{case}_seg.npy")
    assert seg.shape == raw.shape and seg.dtype == np.uint8
    for value, cls in BRATS_MAP.items():
        where = raw == value
        assert where.any()
        np.testing.assert_array_equal(seg[where], cls, err_msg=f"raw {value}")
