"""Write-back geometry, complete-case bookkeeping, the original's brain box and the zoom
(issue 12 items 5 and 6; issue 7 item 6)."""

import json
import pathlib

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from common import nifti
from dmaf_jax import preprocess, synthetic
from dmaf_jax.modalities import BRATS, MYOPS

AFFINE = np.array(
    [[-0.9, 0, 0, 100.0], [0, -0.9, 0, 120.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]], np.float64
)


def write_raw(folder: pathlib.Path, name: str, arrays: dict, affine=AFFINE, scaled=False):
    """Files with a header the default writer would not produce: q-form code 4 (MNI),
    s-form code 2 (aligned), mm + s units, a TR in pixdim[4], optionally a slope."""
    d = folder / name
    d.mkdir(parents=True, exist_ok=True)
    for suffix, v in arrays.items():
        img = nib.Nifti1Image(v, affine)
        img.set_qform(affine, code=4)
        img.set_sform(affine, code=2)
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = 2.2
        if scaled and suffix != "seg":
            img.header.set_slope_inter(0.5, 0.0)
        nib.save(img, str(d / f"{name}_{suffix}.nii.gz"))
    return d


def brain_case(shape, lo, hi, rng, seg_fn=None):
    """int16 modalities non-zero (1..600) inside the box [lo, hi), zero elsewhere; labels from
    seg_fn(index grids) inside the box (default: a ball of 1/2/4 shells)."""
    inside = np.zeros(shape, bool)
    inside[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    images = {}
    for k, m in enumerate(BRATS.modalities):
        v = rng.integers(1, 600, shape).astype(np.int16) + 50 * k
        images[m] = np.where(inside, v, 0).astype(np.int16)
    grids = np.indices(shape)
    if seg_fn is None:
        c = [(a + b - 1) / 2 for a, b in zip(lo, hi)]
        r = np.sqrt(sum((g - ci) ** 2 for g, ci in zip(grids, c)))
        seg = np.select([r < 1.5, r < 2.5, r < 4.0], [1, 4, 2], 0)
    else:
        seg = seg_fn(grids)
    return images, np.where(inside, seg, 0).astype(np.uint8)


# --- item 5: write-back geometry --------------------------------------------------------------


def test_save_keeps_reference_header(tmp_path):
    ref_img = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    write_raw(tmp_path, "r", {"flair": ref_img}, scaled=True)
    ref = tmp_path / "r" / "r_flair.nii.gz"
    lab = np.random.default_rng(0).integers(0, 5, (4, 5, 6)).astype(np.uint8)
    nifti.save(tmp_path / "lab.nii.gz", lab, reference=ref)
    got, want = nib.load(tmp_path / "lab.nii.gz"), nib.load(ref)
    for key in ("qform_code", "sform_code", "xyzt_units", "pixdim", "srow_x", "quatern_d"):
        np.testing.assert_array_equal(got.header[key], want.header[key], err_msg=key)
    assert got.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(got.dataobj), lab)  # the slope is not applied
    np.testing.assert_array_equal(got.affine, want.affine)
    # Another grid (e.g. the preprocessed one): its affine in both forms, the codes kept.
    grid = AFFINE @ np.diag([2.0, 2.0, 2.0, 1.0])
    nifti.save(tmp_path / "grid.nii.gz", lab[::2, ::2, ::2], grid, reference=ref)
    g = nib.load(tmp_path / "grid.nii.gz")
    np.testing.assert_allclose(g.affine, grid, atol=1e-6)
    np.testing.assert_allclose(g.header.get_qform(), grid, atol=1e-5)
    assert int(g.header["qform_code"]) == 4 and int(g.header["sform_code"]) == 2
    # Without a reference the old behaviour: codes 1.
    nifti.save(tmp_path / "plain.nii.gz", lab, AFFINE)
    plain = nib.load(tmp_path / "plain.nii.gz").header
    assert int(plain["qform_code"]) == 1 and int(plain["sform_code"]) == 1


def test_prediction_back_in_raw_geometry(tmp_path):
    """Preprocess, map the stored labels back: the raw label exactly, written with the raw
    image's header; the same from the recorded fields when the raw file has moved."""
    rng = np.random.default_rng(1)
    images, seg = brain_case((18, 16, 12), (3, 2, 1), (14, 13, 9), rng)
    write_raw(tmp_path / "raw", "BraTS20_Training_010", {**images, "seg": seg})
    preprocess.preprocess(BRATS, tmp_path / "raw", tmp_path / "out", min_size=8)
    meta = json.loads((tmp_path / "out/meta/HG_BraTS20_Training_010.json").read_text())
    flair = tmp_path / "raw/BraTS20_Training_010/BraTS20_Training_010_flair.nii.gz"
    assert meta["reference"] == str(flair.resolve())
    assert meta["raw_files"]["t2"].endswith("BraTS20_Training_010_t2.nii.gz")
    assert meta["label_file"].endswith("BraTS20_Training_010_seg.nii.gz")
    pre = np.load(tmp_path / "out/seg/HG_BraTS20_Training_010_seg.npy")
    classes = np.array([0, 1, 2, 0, 3], np.uint8)[seg]
    np.testing.assert_array_equal(preprocess.to_original(pre, meta), classes)
    np.testing.assert_array_equal(preprocess.to_original(pre, meta, raw_labels=True), seg)
    preprocess.save_original(tmp_path / "pred.nii.gz", pre, meta)
    got, want = nib.load(tmp_path / "pred.nii.gz"), nib.load(flair)
    np.testing.assert_array_equal(np.asanyarray(got.dataobj), seg)
    assert got.get_data_dtype() == np.uint8
    for key in ("qform_code", "sform_code", "xyzt_units", "pixdim"):
        np.testing.assert_array_equal(got.header[key], want.header[key], err_msg=key)
    meta["reference"] = str(tmp_path / "moved.nii.gz")
    preprocess.save_original(tmp_path / "pred2.nii.gz", pre, meta)
    got2 = nib.load(tmp_path / "pred2.nii.gz")
    for key in ("qform_code", "sform_code", "xyzt_units", "pixdim"):
        np.testing.assert_array_equal(got2.header[key], want.header[key], err_msg=key)
    np.testing.assert_allclose(got2.affine, want.affine, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        preprocess.to_original(pre[1:], meta)


def write_small(raw, n=2, seed=0):
    return synthetic.write_brats(raw, n, shape=(24, 22, 20), seed=seed)


def test_metadata_complete_cases_and_settings(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    names = write_small(raw)
    s = preprocess.preprocess(BRATS, raw, out, min_size=12)
    assert s.skipped == [] and len(s.processed) == 2
    done = [f"HG_{n}" for n in names]
    assert preprocess.available_cases(out) == done
    assert not list((out / "meta").glob("*tmp*"))  # the temporary names are renamed
    # Same settings: skipped. Each setting changed: done again, with the new settings recorded.
    assert preprocess.preprocess(BRATS, raw, out, min_size=12).skipped == names
    for kw, key, value in (
        ({"min_size": 14}, "min_size", 14),
        ({"min_size": 14, "zoom": 0.5}, "zoom", 0.5),
        ({"min_size": 14, "zoom": 0.5, "brain_box": "original"}, "brain_box", "original"),
    ):
        s = preprocess.preprocess(BRATS, raw, out, **kw)
        assert s.skipped == [] and s.processed == done, kw
        meta = json.loads((out / "meta" / f"{done[0]}.json").read_text())
        assert meta["settings"][key] == value
    # A truncated metadata file is not a done case: not available, and preprocessed again.
    path = out / "meta" / f"{done[1]}.json"
    path.write_text(path.read_text()[:50])
    assert preprocess.available_cases(out) == done[:1]
    s = preprocess.preprocess(BRATS, raw, out, min_size=14, zoom=0.5, brain_box="original")
    assert s.skipped == names[:1] and s.processed == done
    assert preprocess.available_cases(out) == done
    # A volume whose label or metadata is missing is not a case.
    np.save(out / "vol" / "HG_BraTS20_Training_099_vol.npy", np.zeros((2, 2, 2, 4), np.float32))
    (out / "seg" / f"{done[0]}_seg.npy").unlink()
    assert preprocess.available_cases(out) == done[1:]


def test_available_cases_of_another_code_base(tmp_path):
    """Arrays preprocessed by the original code (no meta/): every name with vol and seg."""
    for sub in ("vol", "seg"):
        (tmp_path / sub).mkdir()
    for n in ("HG_a", "LG_b", "HG_c"):
        np.save(tmp_path / "vol" / f"{n}_vol.npy", np.zeros((2, 2, 2, 4), np.float32))
    for n in ("HG_a", "LG_b"):
        np.save(tmp_path / "seg" / f"{n}_seg.npy", np.zeros((2, 2, 2), np.uint32))
    assert preprocess.available_cases(tmp_path) == ["HG_a", "LG_b"]


def test_uint32_labels_read_as_uint8(tmp_path):
    """The original MyoPS code stores uint32 labels: raw NIfTI or preprocessed arrays, we hand
    on uint8."""
    from dmaf_jax import data

    synthetic.write_myops(tmp_path / "raw", 1, shape=(24, 20, 2), seed=0)
    gd = tmp_path / "raw/myops_training_101/myops_training_101_gd.nii.gz"
    lab = np.asanyarray(nib.load(gd).dataobj).astype(np.uint32)
    nifti.save(gd, lab, reference=gd)
    assert nib.load(gd).get_data_dtype() == np.uint32
    s = preprocess.preprocess(MYOPS, tmp_path / "raw", tmp_path / "out")
    assert not s.failed
    seg = np.load(tmp_path / "out/seg/myops_training_101_slice_0_seg.npy")
    lut = np.zeros(2222, np.uint8)
    lut[[200, 500, 600, 1220, 2221]] = [1, 2, 3, 4, 5]
    assert seg.dtype == np.uint8
    np.testing.assert_array_equal(seg[..., 0], lut[lab[..., 0]])
    vol = np.load(tmp_path / "out/vol/myops_training_101_slice_0_vol.npy")
    np.save(tmp_path / "theirs_seg.npy", seg.astype(np.uint32))
    case = data.Case(
        "x",
        str(tmp_path / "out/vol/myops_training_101_slice_0_vol.npy"),
        str(tmp_path / "theirs_seg.npy"),
        (True, True, True),
    )
    cfg = data.AugmentConfig(
        crop=(16, 16, 1), random_crop=False, rotation=0, intensity=0, flip=False
    )
    sample = data.TrainTransform(MYOPS, cfg).random_map((0, case), np.random.default_rng(0))
    assert sample["label"].dtype == np.uint8
    np.testing.assert_array_equal(sample["label"], seg[4:20, 2:18])
    assert vol.shape == (24, 20, 1, 3)


# --- item 6: the original's brain box ---------------------------------------------------------


def original_preprocess(images: dict, seg: np.ndarray, min_size: int):
    """RFNet/PASSION `preprocess.py` (spec 1.1) transcribed, with 128 -> min_size."""

    def sup(xmin, xmax):
        if xmax - xmin < min_size:
            ecart = int((min_size - (xmax - xmin)) / 2)
            xmax = xmax + ecart + 1
            xmin = xmin - ecart
        if xmin < 0:
            xmax -= xmin
            xmin = 0
        return xmin, xmax

    vol = np.stack([images[m] for m in ("flair", "t1ce", "t1", "t2")], axis=0).astype(np.float32)
    nz = np.where(np.amax(vol, axis=0) != 0)
    (x0, x1), (y0, y1), (z0, z1) = (sup(np.amin(i), np.amax(i)) for i in nz)
    vol1 = vol[:, x0:x1, y0:y1, z0:z1]
    mask = vol1.sum(0) > 0
    for k in range(4):
        x = vol1[k, ...]
        y = x[mask]
        vol1[k, ...] = (x - y.mean()) / y.std()
    seg1 = seg.astype(np.uint8)[x0:x1, y0:y1, z0:z1]
    seg1[seg1 == 4] = 3
    return vol1.transpose(1, 2, 3, 0), seg1


@pytest.mark.parametrize(
    "lo,hi,orig_shape,ours_shape",
    [
        # (min_size 10 has 128's parity.) Axis 0 wide: the original drops the last slice;
        # axis 1 narrow with an even gap: widened to min_size + 1, shifted to start at 0;
        # axis 2 narrow at the upper end: the original's stop passes the end, no clamp.
        ((3, 1, 10), (15, 6, 14), (12, 11, 7), (13, 10, 10)),
        # odd gaps: widened to exactly min_size, the same box as ours
        ((4, 6, 2), (9, 10, 8), (10, 10, 10), (10, 10, 10)),
    ],
)
def test_original_brain_box_exactly(tmp_path, lo, hi, orig_shape, ours_shape):
    rng = np.random.default_rng(2)
    images, seg = brain_case((20, 18, 14), lo, hi, rng)
    # A voxel set in T2 alone at the first row still counts as brain (any channel != 0).
    edge = (lo[0] - 1, (lo[1] + hi[1]) // 2, (lo[2] + hi[2]) // 2)
    images["t2"][edge] = 77
    write_raw(tmp_path / "raw", "BraTS20_Training_300", {**images, "seg": seg})
    for mode in ("original", "ours"):
        preprocess.preprocess(BRATS, tmp_path / "raw", tmp_path / mode, min_size=10, brain_box=mode)
    load = lambda mode, sub: np.load(tmp_path / mode / sub / f"LG_BraTS20_Training_300_{sub}.npy")  # noqa: E731
    want_vol, want_seg = original_preprocess(images, seg, 10)
    assert want_vol.shape[:3] == orig_shape
    np.testing.assert_array_equal(load("original", "vol"), want_vol)  # bit for bit
    np.testing.assert_array_equal(load("original", "seg"), want_seg)
    ours = load("ours", "vol")
    assert ours.shape[:3] == ours_shape
    meta = json.loads((tmp_path / "original/meta/LG_BraTS20_Training_300.json").read_text())
    back = preprocess.to_original(load("original", "seg"), meta, raw_labels=True)
    inside = np.zeros(seg.shape, bool)
    inside[tuple(slice(a, b) for a, b in meta["crop"])] = True
    np.testing.assert_array_equal(back[inside], seg[inside])
    assert (back[~inside] == 0).all()


def test_original_box_rule():
    nz = np.zeros((200, 150, 140), bool)
    nz[20:180, 30:60, 100:130] = True  # rows 20..179, cols 30..59, slices 100..129
    box = preprocess.crop_box_original(nz, 128)
    assert box[0] == (20, 179, 0, 0)  # exclusive maximum: row 179 dropped
    # cols: 59 - 30 = 29 < 128, ecart = 49 -> [-19, 109) -> shifted to [0, 128)
    assert box[1] == (0, 128, 0, 0)
    # slices: 129 - 100 = 29 -> ecart 49 -> [51, 179): not clamped, the slice ends at 140
    assert box[2] == (51, 140, 0, 0)
    nz = np.zeros((200, 150, 140), bool)
    nz[40:70, 10:40, 5:35] = True  # gap 29 (odd) -> 128; a gap of 30 (even) -> 129
    nz[40, 10:41, 5:35] = True
    box = preprocess.crop_box_original(nz, 128)
    assert box[0][1] - box[0][0] == 128 and box[1][1] - box[1][0] == 129


def test_ours_and_original_differ_slightly(tmp_path):
    """On a brain larger than min_size the boxes differ by the dropped last slice per axis,
    and the z-scores by the statistics of that slice."""
    rng = np.random.default_rng(5)
    images, seg = brain_case((20, 18, 16), (2, 3, 1), (18, 16, 15), rng)
    write_raw(tmp_path / "raw", "BraTS20_Training_001", {**images, "seg": seg})
    out = {}
    for mode in ("original", "ours"):
        preprocess.preprocess(BRATS, tmp_path / "raw", tmp_path / mode, min_size=9, brain_box=mode)
        out[mode] = np.load(tmp_path / mode / "vol/HG_BraTS20_Training_001_vol.npy")
    assert out["ours"].shape == (16, 13, 14, 4) and out["original"].shape == (15, 12, 13, 4)
    diff = np.abs(out["ours"][:15, :12, :13] - out["original"])
    assert 0 < diff.max() < 0.1


# --- issue 7 item 6: the zoom ----------------------------------------------------------------


def test_resample_image_is_block_mean_and_labels_majority():
    rng = np.random.default_rng(3)
    vol = rng.normal(size=(8, 6, 4, 2)).astype(np.float32)
    got = preprocess.resample_image(vol, (4, 3, 2))
    want = vol.reshape(4, 2, 3, 2, 2, 2, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    seg = np.zeros((4, 4, 2), np.uint8)
    seg[:2, :2, :] = 2
    seg[0, 0, :] = 1  # 2 of 8 votes: the block stays 2
    seg[2:, :2, :] = np.array([[[3, 3], [3, 0]], [[0, 0], [0, 0]]])  # 3 of 8 -> 0 wins
    seg[:2, 2:, :] = np.array([[[1, 1], [1, 1]], [[0, 0], [0, 0]]])  # 4 to 4: the lower class
    out = preprocess.resample_labels(seg, (2, 2, 1))
    np.testing.assert_array_equal(out[..., 0], [[2, 0], [0, 0]])


def test_zoom_round_trip_exact_on_blocks_and_one(tmp_path):
    """Labels constant on 2x2x2 blocks of the crop come back exactly after zoom 0.5; with zoom
    1.0 any labels come back exactly; the grid is recorded with its spacing."""
    rng = np.random.default_rng(4)

    def blocks(g):
        return np.array([0, 1, 2, 4])[(g[0] // 2 + 3 * (g[1] // 2) + 5 * (g[2] // 2)) % 4]

    images, seg = brain_case((16, 12, 10), (0, 0, 0), (16, 12, 10), rng, seg_fn=blocks)
    write_raw(tmp_path / "raw", "BraTS20_Training_002", {**images, "seg": seg})
    for zoom in (0.5, 1.0):
        out = tmp_path / f"z{zoom}"
        preprocess.preprocess(BRATS, tmp_path / "raw", out, min_size=8, zoom=zoom)
        meta = json.loads((out / "meta/HG_BraTS20_Training_002.json").read_text())
        pre = np.load(out / "seg/HG_BraTS20_Training_002_seg.npy")
        vol = np.load(out / "vol/HG_BraTS20_Training_002_vol.npy")
        shape = [int(n * zoom) for n in (16, 12, 10)]
        assert list(pre.shape) == shape == meta["shape"] and vol.shape == (*shape, 4)
        assert meta["zoom"] == zoom and meta["settings"]["zoom"] == zoom
        np.testing.assert_allclose(meta["spacing"], np.array([0.9, 0.9, 2.5]) / zoom)
        back = preprocess.to_original(pre, meta, raw_labels=True)
        np.testing.assert_array_equal(back, seg)
        # The grid's affine puts voxel i at the centre of the raw voxels it covers.
        grid = np.array(meta["grid_affine"])
        i = np.array([1, 2, 3, 1.0])
        raw_centre = (i[:3] + 0.5) / zoom - 0.5
        np.testing.assert_allclose(grid @ i, AFFINE @ np.r_[raw_centre, 1])
        # Brain statistics: z-scored.
        np.testing.assert_allclose(vol.reshape(-1, 4).mean(0), 0, atol=1e-5)


def test_zoom_round_trip_up_to_resolution(tmp_path):
    """Any labels after zoom 0.5 and back: different only within the coarse grid's resolution
    (2 raw voxels) of a label boundary, odd crop sizes included; the prediction lands in the
    raw-size volume."""
    rng = np.random.default_rng(6)
    images, seg = brain_case((21, 19, 15), (3, 2, 1), (18, 17, 12), rng)
    write_raw(tmp_path / "raw", "BraTS20_Training_003", {**images, "seg": seg})
    preprocess.preprocess(BRATS, tmp_path / "raw", tmp_path / "out", min_size=9, zoom=0.5)
    meta = json.loads((tmp_path / "out/meta/HG_BraTS20_Training_003.json").read_text())
    pre = np.load(tmp_path / "out/seg/HG_BraTS20_Training_003_seg.npy")
    assert meta["cropped_shape"] == [15, 15, 11] and list(pre.shape) == [8, 8, 6]
    back = preprocess.to_original(pre, meta, raw_labels=True)
    assert back.shape == seg.shape
    wrong = back != seg
    near = np.zeros(seg.shape, bool)  # within 2 voxels (Chebyshev) of another label
    for v in np.unique(seg):
        region = seg == v
        near |= region & ndimage.binary_dilation(~region, np.ones((5, 5, 5)))
    assert wrong.any() and not (wrong & ~near).any()
    assert wrong.mean() < 0.05


def test_myops_zoom_in_plane(tmp_path):
    synthetic.write_myops(tmp_path / "raw", 1, shape=(40, 36, 3), seed=0)
    preprocess.preprocess(MYOPS, tmp_path / "raw", tmp_path / "out", zoom=0.5)
    meta = json.loads((tmp_path / "out/meta/myops_training_101.json").read_text())
    assert meta["shape"] == [20, 18, 3] and meta["outputs"] == meta["slices"]
    np.testing.assert_allclose(meta["spacing"], [2.5, 2.5, 8.0])
    slices = [np.load(tmp_path / f"out/seg/{n}_seg.npy") for n in meta["outputs"]]
    assert slices[0].shape == (20, 18, 1)
    back = preprocess.to_original(np.concatenate(slices, axis=2), meta, raw_labels=True)
    raw = np.asanyarray(nib.load(meta["label_file"]).dataobj)
    assert back.shape == raw.shape == (40, 36, 3)
    assert (back == raw).mean() > 0.9
    preprocess.preprocess(MYOPS, tmp_path / "raw", tmp_path / "one", zoom=1.0)
    meta = json.loads((tmp_path / "one/meta/myops_training_101.json").read_text())
    slices = [np.load(tmp_path / f"one/seg/{n}_seg.npy") for n in meta["outputs"]]
    back = preprocess.to_original(np.concatenate(slices, axis=2), meta, raw_labels=True)
    np.testing.assert_array_equal(back, raw)


def test_config_fields_reach_preprocessing(tmp_path):
    from configs import dmaf_brats2020
    from dmaf_jax import dataset

    cfg = dmaf_brats2020.get_config("smoke")
    assert cfg.data.zoom == 1.0 and cfg.data.brain_box == "ours"
    cfg.data.zoom, cfg.data.brain_box = 0.5, "original"
    prep = dataset.prepare(cfg, tmp_path)
    metas = sorted((prep.root / "meta").glob("*.json"))
    assert len(metas) == cfg.data.synthetic_cases
    meta = json.loads(metas[0].read_text())
    assert meta["settings"] == {"min_size": 32, "zoom": 0.5, "brain_box": "original"}
    seg = np.load(prep.root / "seg" / f"{meta['name']}_seg.npy")
    assert list(seg.shape) == meta["shape"] and meta["shape"] != meta["cropped_shape"]
