import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from common import nifti
from conftest import REPO
from dmaf_jax import preprocess, synthetic
from dmaf_jax.modalities import BRATS, MYOPS

AFFINE = synthetic.brats_affine((10, 12, 8))


def write_case(raw: pathlib.Path, name: str, images: dict, seg, affine=AFFINE, seg_name=None):
    d = raw / name
    d.mkdir(parents=True)
    for m, v in images.items():
        nifti.save(d / f"{name}_{m}.nii.gz", v, affine)
    if seg is not None:
        nifti.save(d / (seg_name or f"{name}_seg.nii.gz"), seg, affine)


def box_case(shape=(10, 12, 8), rng=None):
    rng = rng or np.random.default_rng(0)
    images = {}
    for k, m in enumerate(BRATS.modalities):
        v = np.zeros(shape, np.int16)
        v[2:6, 3:9, 1:5] = rng.integers(50, 500, (4, 6, 4)) + 100 * k
        images[m] = v
    seg = np.zeros(shape, np.uint8)
    seg[3, 4, 2], seg[4, 5, 3], seg[5, 6, 2] = 1, 2, 4
    return images, seg


def test_crop_normalise_and_labels(tmp_path):
    images, seg = box_case()
    write_case(tmp_path / "raw", "BraTS20_Training_261", images, seg)
    s = preprocess.preprocess(BRATS, tmp_path / "raw", tmp_path / "out", min_size=6)
    assert s.processed == ["LG_BraTS20_Training_261"] and not s.failed
    vol = np.load(tmp_path / "out/vol/LG_BraTS20_Training_261_vol.npy")
    lab = np.load(tmp_path / "out/seg/LG_BraTS20_Training_261_seg.npy")
    # box rows [2, 6) widened to 6 -> [1, 7); cols [3, 9) kept; slices [1, 5) -> [0, 6)
    assert vol.shape == (6, 6, 6, 4) and vol.dtype == np.float32 and lab.dtype == np.uint8
    raw = np.stack([images[m] for m in BRATS.modalities], -1)[1:7, 3:9, 0:6].astype(np.float64)
    brain = raw.sum(-1) > 0
    for k in range(4):
        x = raw[..., k]
        want = (x - x[brain].mean()) / x[brain].std()
        np.testing.assert_allclose(vol[..., k], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            [vol[..., k][brain].mean(), vol[..., k][brain].std()], [0, 1], atol=1e-5
        )
    assert lab[2, 1, 2] == 1 and lab[3, 2, 3] == 2 and lab[4, 3, 2] == 3
    assert set(np.unique(lab)) == {0, 1, 2, 3}
    meta = json.loads((tmp_path / "out/meta/LG_BraTS20_Training_261.json").read_text())
    assert meta["crop"] == [[1, 7], [3, 9], [0, 6]] and meta["original_shape"] == [10, 12, 8]
    np.testing.assert_allclose(meta["affine"], AFFINE)
    again = preprocess.preprocess(BRATS, tmp_path / "raw", tmp_path / "out", min_size=6)
    assert again.skipped == ["BraTS20_Training_261"]


def test_crop_box_rules():
    nz = np.zeros((4, 20, 9), bool)
    nz[1:3, 5:15, 0:2] = True
    box = preprocess.crop_box(nz, 6)
    assert box[0] == (0, 4, 1, 1)  # smaller than min_size: whole axis, zero-padded
    assert box[1] == (5, 15, 0, 0)  # long enough: inclusive box
    assert box[2] == (0, 6, 0, 0)  # widened around [0, 2), kept inside the volume
    out = preprocess.apply_box(np.ones((4, 20, 9, 2)), box)
    assert out.shape == (6, 10, 6, 2) and out[0].sum() == 0 and out[-1].sum() == 0


def test_bad_cases_reported_by_name(tmp_path):
    raw = tmp_path / "raw"
    rng = np.random.default_rng(1)
    good, seg = box_case(rng=rng)
    write_case(raw, "BraTS20_Training_001", good, seg)
    write_case(raw, "BraTS20_Training_002", {k: v for k, v in good.items() if k != "t1ce"}, seg)
    bad_shape = dict(good, t2=np.zeros((10, 12, 9), np.int16))
    write_case(raw, "BraTS20_Training_003", bad_shape, seg)
    write_case(raw, "BraTS20_Training_004", good, seg.astype(np.uint8) * 0 + 3)
    write_case(raw, "BraTS20_Training_005", {k: v * 0 for k, v in good.items()}, seg)
    nan = {k: v.astype(np.float32) for k, v in good.items()}
    nan["flair"][0, 0, 0] = np.nan
    write_case(raw, "BraTS20_Training_006", nan, seg)
    shifted = AFFINE.copy()
    shifted[0, 3] += 5
    write_case(raw, "BraTS20_Training_007", good, seg)
    nifti.save(raw / "BraTS20_Training_007" / "BraTS20_Training_007_t1.nii.gz", good["t1"], shifted)
    write_case(raw, "BraTS20_Training_355", good, seg, seg_name="W39_1998.09.19_Segm.nii")
    s = preprocess.preprocess(BRATS, raw, tmp_path / "out", min_size=6, workers=2)
    assert s.processed == ["HG_BraTS20_Training_001", "HG_BraTS20_Training_355"]
    assert "W39_1998.09.19_Segm.nii" in s.notes["BraTS20_Training_355"]
    f = s.failed
    assert set(f) == {f"BraTS20_Training_00{i}" for i in range(2, 8)}
    assert "t1ce" in f["BraTS20_Training_002"]
    assert "shape" in f["BraTS20_Training_003"]
    assert "label values [3] outside [0, 1, 2, 4]" in f["BraTS20_Training_004"]
    assert "empty brain" in f["BraTS20_Training_005"]
    assert "NaN" in f["BraTS20_Training_006"]
    assert "affine" in f["BraTS20_Training_007"]


def run_preprocess(raw, work):
    cmd = [
        sys.executable,
        str(REPO / "run.py"),
        "--config",
        "configs/dmaf_brats2020.py:smoke",
        f"--workdir={work}",
        "--mode=preprocess",
        f"--config.data.raw_dir={raw}",
        f"--compilation_cache={REPO / '.jax_cache'}",
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_run_py_exit_codes(tmp_path):
    """run.py --mode=preprocess with data.raw_dir at the root of the download's nested layout."""
    raw = tmp_path / "raw"
    names = synthetic.write_brats(raw, 3, shape=(40, 44, 36), seed=2, layout="download")
    cases = raw.joinpath(*synthetic.BRATS_DOWNLOAD)
    (cases / names[2] / f"{names[2]}_flair.nii.gz").unlink()
    r = run_preprocess(raw, tmp_path / "w1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cases: 2 ready" in r.stdout
    assert f"failed {names[2]}: missing modality file(s): flair" in r.stdout
    assert (tmp_path / "w1" / "batch_preview.png").exists()
    for n in names[:2]:
        (cases / n / f"{n}_seg.nii.gz").unlink()
        (cases / n / f"{n}_t2.nii.gz").unlink()
    r = run_preprocess(raw, tmp_path / "w2")
    assert r.returncode != 0 and "no case" in r.stderr


def test_brats_download_layout(tmp_path):
    """The BraTS2020 download nests the cases two levels down beside two CSVs; a case is found
    at any depth, whatever its folder is called, and the odd label name of case 355 too."""
    raw = tmp_path / "raw"
    names = synthetic.write_brats(raw, 2, shape=(24, 22, 20), seed=3, layout="download")
    cases = raw.joinpath(*synthetic.BRATS_DOWNLOAD)
    assert (cases / "name_mapping.csv").exists() and (cases / "survival_info.csv").exists()
    assert sorted(p.name for p in cases.iterdir() if p.is_dir()) == names
    images, seg = box_case()
    write_case(cases, "BraTS20_Training_355", images, seg, seg_name="W39_1998.09.19_Segm.nii")
    deeper = raw / "extra" / "deeper"
    write_case(deeper, "BraTS20_Training_200", images, seg)
    (deeper / "BraTS20_Training_200").rename(deeper / "renamed")
    write_case(raw / ".hidden", "BraTS20_Training_201", images, seg)
    # A zipped download unpacked on macOS: `__MACOSX/.../._<file>` beside every file.
    mac = raw / "__MACOSX" / "BraTS20_Training_001"
    mac.mkdir(parents=True)
    (mac / "._BraTS20_Training_001_flair.nii.gz").write_bytes(b"\0\5\26\7")
    (cases / "BraTS20_Training_001" / "._BraTS20_Training_001_t2.nii.gz").write_bytes(b"\0")
    val = raw / "BraTS2020_ValidationData" / "MICCAI_BraTS2020_ValidationData"
    write_case(val, "BraTS20_Validation_001", images, None)  # no labels in the validation set
    found = preprocess.discover(BRATS, raw)
    assert [c.name for c in found] == [
        "BraTS20_Training_001",
        "BraTS20_Training_002",
        "BraTS20_Training_200",
        "BraTS20_Training_355",
        "BraTS20_Validation_001",
    ]
    assert list(found[0].images) == ["flair", "t1ce", "t1", "t2"]
    assert found[3].label.name == "W39_1998.09.19_Segm.nii"
    s = preprocess.preprocess(BRATS, raw, tmp_path / "out", min_size=6)
    assert s.processed == [
        "HG_BraTS20_Training_001",
        "HG_BraTS20_Training_002",
        "HG_BraTS20_Training_200",
        "HG_BraTS20_Training_355",
    ]
    assert s.failed == {
        "BraTS20_Validation_001": "no label file BraTS20_Validation_001_seg.nii(.gz)"
    }
    with pytest.raises(FileNotFoundError, match="no case files"):
        preprocess.preprocess(BRATS, tmp_path / "out", tmp_path / "out2")


def test_myops_layouts_agree(tmp_path):
    """Per-subject folders (spec 1.6) and the flat release (train25/ with the labels in
    train25_myops_gd/) give the same preprocessed slices."""
    synthetic.write_myops(tmp_path / "a", 2, shape=(32, 28, 2), seed=4)
    synthetic.write_myops(tmp_path / "b", 2, shape=(32, 28, 2), seed=4, layout="release")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["train25", "train25_myops_gd"]
    assert (tmp_path / "b/train25_myops_gd/myops_training_102_gd.nii.gz").exists()
    assert (tmp_path / "b/train25/myops_training_102_DE.nii.gz").exists()
    sa = preprocess.preprocess(MYOPS, tmp_path / "a", tmp_path / "oa")
    sb = preprocess.preprocess(MYOPS, tmp_path / "b", tmp_path / "ob")
    assert sa.processed == sb.processed and len(sb.processed) == 4 and not sb.failed
    for n in sb.processed:
        for sub in ("vol", "seg"):
            a = np.load(tmp_path / "oa" / sub / f"{n}_{sub}.npy")
            b = np.load(tmp_path / "ob" / sub / f"{n}_{sub}.npy")
            np.testing.assert_array_equal(a, b)
    # A flat folder whose subject lacks its label elsewhere: reported by name.
    (tmp_path / "b/train25_myops_gd/myops_training_101_gd.nii.gz").unlink()
    s = preprocess.preprocess(MYOPS, tmp_path / "b", tmp_path / "oc")
    assert s.failed == {"myops_training_101": "no label file myops_training_101_gd.nii(.gz)"}


def test_synthetic_brats_contrasts():
    images, seg = synthetic.brats_case(np.random.default_rng(3), (64, 64, 48))
    assert set(np.unique(seg)) <= {0, 1, 2, 4} and {1, 2, 4} <= set(np.unique(seg))
    mean = {m: {k: images[m][seg == k].mean() for k in (1, 2, 4)} for m in images}
    wm = {m: np.median(images[m][(seg == 0) & (images[m] > 0)]) for m in images}
    assert mean["flair"][2] > 1.3 * wm["flair"] and mean["t2"][2] > 1.3 * wm["t2"]  # oedema
    assert mean["t1ce"][4] > 1.5 * wm["t1ce"]  # enhancing rim
    assert mean["t1"][1] < 0.6 * wm["t1"]  # necrotic core dark in T1
    assert all(v.dtype == np.int16 for v in images.values())


def test_myops_slices(tmp_path):
    synthetic.write_myops(tmp_path / "raw", 2, shape=(40, 36, 3), seed=0)
    s = preprocess.preprocess(MYOPS, tmp_path / "raw", tmp_path / "out")
    assert len(s.processed) == 6 and not s.failed
    vol = np.load(tmp_path / "out/vol/myops_training_101_slice_1_vol.npy")
    seg = np.load(tmp_path / "out/seg/myops_training_101_slice_1_seg.npy")
    assert vol.shape == (40, 36, 1, 3) and seg.shape == (40, 36, 1)
    assert set(np.unique(seg)) <= set(range(6)) and 5 in np.unique(seg)


@pytest.mark.parametrize(
    "n,prefix", [(1, "HG_"), (259, "HG_"), (260, "LG_"), (335, "LG_"), (336, "HG_"), (369, "HG_")]
)
def test_prefix_rule(n, prefix):
    assert preprocess.brats_prefix(f"BraTS20_Training_{n:03d}") == prefix


def test_invalid_config_fails_before_any_work(tmp_path):
    from configs import dmaf_brats2020
    from dmaf_jax import dataset

    cfg = dmaf_brats2020.get_config("smoke")
    cfg.data.mask_mode = "drop"
    with pytest.raises(ValueError, match="data.mask_mode must be one of fixed, sub, random"):
        dataset.prepare(cfg, tmp_path)
    cfg = dmaf_brats2020.get_config("smoke")
    cfg.data.missing_rate = "mr24"
    with pytest.raises(ValueError, match="4 digits"):
        dataset.prepare(cfg, tmp_path)
    cfg = dmaf_brats2020.get_config("smoke")
    cfg.data.brain_box = "rfnet"
    with pytest.raises(ValueError, match="data.brain_box must be ours or original"):
        dataset.prepare(cfg, tmp_path)
    cfg = dmaf_brats2020.get_config("smoke")
    cfg.data.zoom = 0.0
    with pytest.raises(ValueError, match="data.zoom must be positive"):
        dataset.prepare(cfg, tmp_path)
    assert not (tmp_path / "raw").exists()
