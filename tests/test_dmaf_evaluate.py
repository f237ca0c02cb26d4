"""DMAF-Net evaluation and prediction: windows (spec 7.1, 11.18), the shared-encoder inference,
compilation counts, the evaluation outputs and NIfTI predictions for cases with missing files.

Untrained smoke models saved as checkpoints stand in for training; compiled programs are shared
within the module (one SlidingWindow per dataset, same shapes as evaluation's, so evaluation
hits the persistent compilation cache)."""

from __future__ import annotations

import csv
import itertools
import json
import math
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from common import metrics
from configs import dmaf_brats2020, dmaf_myops2020
from dmaf_jax import evaluate, experiment, predict, preprocess, synthetic
from dmaf_jax.inference import (
    PerCombinationWindow,
    pad_to_window,
    to_model_input,
    window_starts,
)
from dmaf_jax.modalities import BRATS, MYOPS

REPO = pathlib.Path(__file__).resolve().parents[1]


def brats_config():
    cfg = dmaf_brats2020.get_config("smoke")
    cfg.data.synthetic_cases = 8  # 2 test cases of different shapes
    cfg.eval.windows_per_call = 3  # 2 windows per case: the last call is padded
    cfg.eval.overlays = 1
    return cfg


def myops_config():
    cfg = dmaf_myops2020.get_config("smoke")
    cfg.eval.windows_per_call = 3
    cfg.eval.overlays = 1
    return cfg


def _save_untrained(cfg, workdir: pathlib.Path):
    state, _ = experiment.create_state(cfg)
    ckpt = experiment.checkpointer(workdir)
    ckpt.save(0, state, {"step": 0, "epoch": 0, "config": cfg.to_dict()}, metrics={"dice": 0.0})
    ckpt.close()
    return state.params


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    cfg = brats_config()
    workdir = tmp_path_factory.mktemp("brats")
    params = _save_untrained(cfg, workdir)
    return cfg, workdir, params


@pytest.fixture(scope="module")
def brats_window(brats):
    return experiment.inference_window(brats[0])


@pytest.fixture(scope="module")
def brats_forward(brats):
    """The original's procedure: the whole network on one window per call."""
    cfg = brats[0]
    return PerCombinationWindow(experiment.model(cfg), experiment.model_crop(cfg))


@pytest.fixture(scope="module")
def brats_eval(brats):
    cfg, workdir, _ = brats
    return evaluate.evaluate(cfg, workdir)


@pytest.fixture(scope="module")
def myops(tmp_path_factory):
    cfg = myops_config()
    workdir = tmp_path_factory.mktemp("myops")
    params = _save_untrained(cfg, workdir)
    return cfg, workdir, params


@pytest.fixture(scope="module")
def myops_eval(myops):
    cfg, workdir, _ = myops
    return evaluate.evaluate(cfg, workdir)


ALL = BRATS.combination_masks()


# --- windows -------------------------------------------------------------------------------


def test_window_starts_spec_7_1():
    assert window_starts(160, 80) == [0, 40, 80]
    assert window_starts(192, 80) == [0, 40, 80, 112]
    assert window_starts(144, 80) == [0, 40, 64]
    assert window_starts(155, 80) == [0, 40, 75]
    assert window_starts(81, 80) == [0, 1]
    assert window_starts(80, 80) == [0]
    assert window_starts(50, 80) == [0]  # padded to the window (section 11.18)
    assert window_starts(256, 128) == [0, 64, 128]
    for size in range(81, 400):
        starts = window_starts(size, 80)
        # 0, 40, ... for ceil((S - 80) / 40) steps, plus S - 80
        assert starts == [40 * i for i in range(math.ceil((size - 80) / 40))] + [size - 80]
        assert np.diff(starts).max() <= 40 and starts[-1] + 80 == size


def test_pad_to_window_uses_each_channels_corner_value(rng):
    vol = rng.normal(size=(20, 32, 28, 4)).astype(np.float32)
    out = pad_to_window(vol, (32, 32, 32))
    assert out.shape == (32, 32, 32, 4) and out.dtype == vol.dtype
    np.testing.assert_array_equal(out[:20, :, :28], vol)
    for c in range(4):
        assert (out[20:, :, :, c] == vol[0, 0, 0, c]).all()
        assert (out[:, :, 28:, c] == vol[0, 0, 0, c]).all()
    assert pad_to_window(vol, (16, 16, 16)) is vol


def test_myops_predicts_only_the_centred_training_crop(myops, rng):
    # Spec 7.3: one forward pass of the centred 256^2 crop per slice, no sliding window.
    cfg, _, params = myops
    window = experiment.inference_window(cfg)
    assert window.centre
    vol = rng.normal(size=(48, 37, 3)).astype(np.float32)  # 32^2 crop at rows 8, cols 2
    masks = MYOPS.combination_masks()
    probs = window.predict(params, vol, masks)
    assert probs.shape == (len(masks), 48, 37, window.model.num_classes)
    forward = PerCombinationWindow(experiment.model(cfg), experiment.model_crop(cfg))
    crop = _direct(forward, params, vol[8:40, 2:34], masks[-1])
    np.testing.assert_allclose(probs[-1, 8:40, 2:34], crop, atol=ATOL)
    outside = np.ones((48, 37), bool)
    outside[8:40, 2:34] = False
    np.testing.assert_array_equal(probs[:, outside, 0], 1.0)
    np.testing.assert_array_equal(probs[:, outside, 1:], 0.0)


# XLA's CPU convolutions give float32 results that depend on the batch size (up to ~1e-5 in
# these probabilities between 1 and 3 windows per call, measured; splitting the network into
# encode + fuse changes nothing at equal batch size). Wrong masks, averaging or padding give
# differences of 1e-3 and more.
ATOL = 3e-5


def _direct(forward: PerCombinationWindow, params, x, mask):
    """A full-volume forward of the whole network, no windows: (*S, K)."""
    out = forward.forward(params, jnp.asarray(x[None]), jnp.asarray(mask[None]))
    return np.asarray(out)[0]


def test_one_window_covering_the_volume_equals_a_direct_forward(
    brats, brats_window, brats_forward, rng
):
    cfg, _, params = brats
    vol = rng.normal(size=(32, 32, 32, 4)).astype(np.float32)
    probs = brats_window.predict(params, vol, ALL)
    assert probs.shape == (15, 32, 32, 32, 4)
    for c in (0, 4, 10, 14):  # one, two, three and four modalities
        np.testing.assert_allclose(probs[c], _direct(brats_forward, params, vol, ALL[c]), atol=ATOL)


def test_smaller_volume_is_padded_with_corner_values_and_cropped_back(
    brats, brats_window, brats_forward, rng
):
    cfg, _, params = brats
    vol = rng.normal(size=(20, 32, 28, 4)).astype(np.float32) + 2.0
    probs = brats_window.predict(params, vol, ALL)
    assert probs.shape == (15, 20, 32, 28, 4)
    padded = _direct(brats_forward, params, pad_to_window(vol, (32, 32, 32)), ALL[14])[:20, :, :28]
    np.testing.assert_allclose(probs[14], padded, atol=ATOL)
    zero = np.zeros((32, 32, 32, 4), np.float32)
    zero[:20, :, :28] = vol
    zero_padded = _direct(brats_forward, params, zero, ALL[14])[:20, :, :28]
    assert np.abs(probs[14] - zero_padded).max() > 1e-4  # the padding value matters


def test_shared_encoder_equals_separate_passes_and_plain_averaging(
    brats, brats_window, brats_forward, rng
):
    cfg, _, params = brats
    vol = rng.normal(size=(40, 36, 32, 4)).astype(np.float32)
    starts = brats_window.windows(vol.shape[:-1])
    assert len(starts) == 4  # two calls of 3 windows, the second padded
    shared = brats_window.predict(params, vol, ALL)
    picks = [3, 8, 12, 14]
    separate = brats_forward.predict(params, vol, ALL[picks])
    np.testing.assert_allclose(shared[picks], separate, atol=ATOL)
    top2 = np.sort(separate, -1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 2 * ATOL
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(shared[picks].argmax(-1)[clear], separate.argmax(-1)[clear])
    # Averaging written out: each window's softmax summed, divided by the cover count.
    c = 8
    acc = np.zeros((40, 36, 32, 4))
    count = np.zeros((40, 36, 32, 1))
    for s in starts:
        sl = tuple(slice(o, o + 32) for o in s)
        acc[sl] += _direct(brats_forward, params, vol[sl], ALL[c])
        count[sl] += 1
    assert count.min() == 1 and count.max() == 4
    np.testing.assert_allclose(shared[c], acc / count, atol=ATOL)
    # The combinations really differ (the masks reach the fusion).
    assert np.abs(shared[0] - shared[14]).max() > 1e-3


def test_attention_maps_are_averaged_weights_of_the_present_modalities(brats, brats_window, rng):
    _, _, params = brats
    vol = rng.normal(size=(36, 32, 32, 4)).astype(np.float32)
    probs, att = brats_window.predict(params, vol, ALL, weights=True)
    assert att.shape == (15, 36, 32, 32, 4)
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)
    missing = ~ALL[:, None, None, None, :]  # (15, 1, 1, 1, 4)
    assert np.where(missing, att, 0).max() < 1e-6
    assert att[np.broadcast_to(~missing, att.shape)].min() > 0
    np.testing.assert_array_equal(probs, brats_window.predict(params, vol, ALL))


# --- combinations and conventions ----------------------------------------------------------


def test_combination_names_and_selection():
    names, masks = evaluate.combinations(BRATS)
    assert len(names) == 15 and names[0] == "t2" and names[3] == "flair"
    assert names[14] == "flair+t1ce+t1+t2" and names[9] == "flair+t1ce"
    np.testing.assert_array_equal(masks, BRATS.combination_masks())
    names, masks = evaluate.combinations(BRATS, "flair+t1ce+t1+t2, t2+flair,0100")
    assert names == ["t1ce", "flair+t2", "flair+t1ce+t1+t2"]  # id order, not the given order
    assert masks.tolist() == [[0, 1, 0, 0], [1, 0, 0, 1], [1, 1, 1, 1]]
    with pytest.raises(ValueError, match="unknown modality 'dwi'"):
        evaluate.combinations(BRATS, "flair+dwi")
    with pytest.raises(ValueError, match="no modality"):
        evaluate.combinations(BRATS, "0000")
    names, _ = evaluate.combinations(MYOPS)
    assert names == ["t2", "lge", "bssfp", "lge+t2", "bssfp+lge", "bssfp+t2", "bssfp+lge+t2"]


def test_hd95_convention_follows_faithful_unless_set():
    cfg = brats_config()
    assert evaluate.hd95_convention(cfg) == "brats"
    cfg.faithful = True
    assert evaluate.hd95_convention(cfg) == "passion"
    cfg.eval.hd95_empty = "brats"
    assert evaluate.hd95_convention(cfg) == "brats"
    cfg.eval.hd95_empty = "nan"
    with pytest.raises(ValueError, match="hd95_empty"):
        evaluate.hd95_convention(cfg)


def test_paper_table_uses_the_papers_column_order():
    names, _ = evaluate.combinations(BRATS, "t1ce,flair+t1")
    r = {k: {"dice": 0.5, "hd95": 3.0} for k in ("wt", "tc", "et", "et_post")}
    result = {"combinations": {n: r for n in names}, "average": r}
    header, rows = evaluate.paper_table(BRATS, result)
    assert header == ["FLAIR", "T1", "T1ce", "T2", "WT", "TC", "ET", "ET (post)"]
    assert rows[0][:4] == ["○", "○", "●", "○"]  # t1ce: third column, second channel
    assert rows[1][:4] == ["●", "●", "○", "○"]  # flair+t1
    assert rows[2][0] == "Avg" and rows[2][4:] == ["50.00"] * 4


# --- evaluation ----------------------------------------------------------------------------


def test_evaluation_compiles_its_inference_functions_once(brats, brats_eval, brats_window, rng):
    cfg, workdir, params = brats
    assert brats_eval["cases"] == 2
    assert brats_eval["compilations"] == {"encode": 1, "fuse": 1, "fuse_weights": 1}
    test = (workdir / "splits" / "test.txt").read_text().split()
    vol = np.load(workdir / "preprocessed" / "vol" / f"{test[0]}_vol.npy", mmap_mode="r")
    # 2 windows per case at 3 per call: the padded last call ran
    assert len(brats_window.windows(vol.shape[:3])) % cfg.eval.windows_per_call
    # The same holds across volume shapes and window counts (1 padded, 4 windows).
    for shape in ((20, 32, 28), (40, 36, 32)):
        x = rng.normal(size=(*shape, 4)).astype(np.float32)
        brats_window.predict(params, x, ALL, weights=shape[0] == 20)
    assert brats_window.compilations() == {"encode": 1, "fuse": 1, "fuse_weights": 1}


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluation_outputs_and_metrics_json(brats, brats_eval):
    cfg, workdir, _ = brats
    for name in ("results.csv", "table.md", "table.csv", "metrics.json", "report.md"):
        assert (workdir / name).is_file(), name
    m = json.loads((workdir / "metrics.json").read_text())
    names, _ = evaluate.combinations(BRATS)
    assert list(m["combinations"]) == names
    for name in names:
        for region in ("wt", "tc", "et", "et_post"):
            assert set(m["combinations"][name][region]) >= {"dice", "hd95"}
    rows = _read_csv(workdir / "results.csv")
    assert len(rows) == 2 * 15
    for name in names:
        mine = [r for r in rows if r["combination"] == name]
        for region in ("wt", "et_post"):
            for k in ("dice", "hd95"):
                mean = np.mean([float(r[f"{region}_{k}"]) for r in mine])
                assert m["combinations"][name][region][k] == pytest.approx(mean, abs=1e-5)
    for region in ("wt", "tc", "et", "et_post"):
        avg = np.mean([m["combinations"][n][region]["dice"] for n in names])
        assert m["average"][region]["dice"] == pytest.approx(avg, abs=1e-12)
    assert m["conventions"]["hd95_empty"] == "brats"
    assert m["conventions"]["hd95_one_empty_value"] == pytest.approx(373.12866, abs=1e-5)
    table = list(csv.reader((workdir / "table.csv").open(newline="")))
    assert table[0] == ["FLAIR", "T1", "T1ce", "T2", "WT", "TC", "ET", "ET (post)"]
    assert len(table) == 1 + 15 + 1 and table[-1][0] == "Avg"
    row = table[1 + names.index("flair+t1ce")]
    assert row[:4] == ["●", "○", "●", "○"]
    assert float(row[4]) == pytest.approx(
        100 * m["combinations"]["flair+t1ce"]["wt"]["dice"], abs=0.006
    )
    md = (workdir / "table.md").read_text().splitlines()
    assert len(md) == 2 + 15 + 1 and md[-1].startswith("| **Avg**")
    report = (workdir / "report.md").read_text()
    for fig in ("predictions", "attention"):
        refs = [line for line in report.splitlines() if f"_{fig}.png" in line]
        assert refs
        for ref in refs:
            assert (workdir / ref.split("(")[1].rstrip(")")).is_file()


def test_evaluation_metrics_are_those_of_the_predictions(brats, brats_eval, brats_window):
    """One case recomputed outside evaluate: argmax of the averaged probabilities, scored on
    the preprocessed grid with region_metrics."""
    cfg, workdir, params = brats
    rows = _read_csv(workdir / "results.csv")
    case = rows[0]["case"]
    root = workdir / "preprocessed"
    vol = np.load(root / "vol" / f"{case}_vol.npy")
    seg = np.load(root / "seg" / f"{case}_seg.npy")
    labels = brats_window.predict(params, vol, ALL).argmax(-1)
    names, _ = evaluate.combinations(BRATS)
    for c in (0, 9, 14):
        want = metrics.region_metrics(labels[c], seg, metrics.BRATS_REGIONS, (1.0, 1.0, 1.0))
        got = next(r for r in rows if r["case"] == case and r["combination"] == names[c])
        for region in ("wt", "tc", "et", "et_post"):
            for k in metrics.SEGMENTATION_KEYS:
                assert float(got[f"{region}_{k}"]) == pytest.approx(want[region][k], abs=2e-6)


def test_myops_slices_and_volumes_with_the_grid_spacing(myops, myops_eval):
    cfg, workdir, params = myops
    m = myops_eval
    names, masks = evaluate.combinations(MYOPS)
    assert list(m["combinations"]) == names and list(m["volumes"]) == names
    regions = ("lvb", "rvb", "myo", "scar", "scar_oedema")
    assert set(m["average"]) == set(regions) and set(m["volumes_average"]) == set(regions)
    assert m["compilations"]["encode"] == 1 and m["compilations"]["fuse"] == 1
    rows = _read_csv(workdir / "results.csv")
    vrows = _read_csv(workdir / "results_volumes.csv")
    slices = sorted({r["case"] for r in rows}, key=lambda n: int(n.rsplit("_", 1)[1]))
    subject = rows[0]["subject"]
    assert len(rows) == len(slices) * 7 and len(vrows) == 7 and m["subjects"] == 1
    root = workdir / "preprocessed"
    meta = json.loads((root / "meta" / f"{subject}.json").read_text())
    assert meta["spacing"] == [1.25, 1.25, 8.0]  # the synthetic MyoPS grid
    window = experiment.inference_window(cfg)
    preds, gts = [], []
    for name in slices:
        vol = to_model_input(np.load(root / "vol" / f"{name}_vol.npy"), 2)
        preds.append(window.predict(params, vol, masks).argmax(-1))
        gts.append(np.load(root / "seg" / f"{name}_seg.npy")[:, :, 0])
    c = names.index("bssfp")
    got = next(r for r in rows if r["case"] == slices[0] and r["combination"] == "bssfp")
    want = metrics.region_metrics(preds[0][c], gts[0], metrics.MYOPS_REGIONS, (1.25, 1.25))
    for region in regions:
        assert float(got[f"{region}_hd95"]) == pytest.approx(want[region]["hd95"], abs=2e-6)
        assert float(got[f"{region}_dice"]) == pytest.approx(want[region]["dice"], abs=2e-6)
    vol_pred = np.stack([p[c] for p in preds], -1)
    vol_gt = np.stack(gts, -1)
    want = metrics.region_metrics(vol_pred, vol_gt, metrics.MYOPS_REGIONS, (1.25, 1.25, 8.0))
    got = next(r for r in vrows if r["combination"] == "bssfp")
    for region in regions:
        assert float(got[f"{region}_hd95"]) == pytest.approx(want[region]["hd95"], abs=2e-6)
    means = np.mean([float(r["myo_dice"]) for r in rows if r["combination"] == "bssfp"])
    assert m["combinations"]["bssfp"]["myo"]["dice"] == pytest.approx(means, abs=1e-5)
    table = list(csv.reader((workdir / "table.csv").open(newline="")))
    assert table[0][:3] == ["bSSFP", "LGE", "T2"] and len(table) == 1 + 7 + 1


# --- prediction ----------------------------------------------------------------------------


def _write_case(folder: pathlib.Path, name: str, keep: tuple[str, ...], seed: int):
    """A synthetic BraTS case renamed to `name`, with only the `keep` modality files."""
    synthetic.write_brats(folder / "tmp", 1, (40, 44, 36), seed=seed, first_id=500)
    src = folder / "tmp" / "BraTS20_Training_500"
    dst = folder / name
    dst.mkdir(parents=True)
    for suffix in keep:
        (src / f"BraTS20_Training_500_{suffix}.nii.gz").rename(dst / f"{name}_{suffix}.nii.gz")
    for p in src.iterdir():
        p.unlink()
    src.rmdir()
    (folder / "tmp").rmdir()
    return dst


def test_predict_cache_keeps_missing_channels_zero_and_redoes_changed_inputs(tmp_path):
    case = _write_case(tmp_path / "in", "BraTS20_Validation_001", ("flair", "t2", "seg"), 3)
    out = tmp_path / "cache"
    s = preprocess.preprocess(BRATS, tmp_path / "in", out, 32, for_prediction=True)
    assert s.processed == ["BraTS20_Validation_001"] and not s.failed
    meta = json.loads((out / "meta" / "BraTS20_Validation_001.json").read_text())
    assert meta["present"] == [True, False, False, True] and meta["label_file"] is None
    vol = np.load(out / "vol" / "BraTS20_Validation_001_vol.npy")
    assert (vol[..., 1:3] == 0).all() and vol[..., 0].std() > 0.5 and vol[..., 3].std() > 0.5
    again = preprocess.preprocess(BRATS, tmp_path / "in", out, 32, for_prediction=True)
    assert again.skipped == ["BraTS20_Validation_001"]
    (case / "BraTS20_Validation_001_t2.nii.gz").unlink()
    third = preprocess.preprocess(BRATS, tmp_path / "in", out, 32, for_prediction=True)
    assert not third.skipped
    meta = json.loads((out / "meta" / "BraTS20_Validation_001.json").read_text())
    assert meta["present"] == [True, False, False, False]
    # Training preprocessing still refuses the incomplete case.
    s = preprocess.preprocess(BRATS, tmp_path / "in", tmp_path / "train", 32)
    assert "missing modality" in s.failed["BraTS20_Validation_001"]


def _header_fields(img):
    h = img.header
    return (
        img.shape,
        h["pixdim"][1:4].tolist(),
        int(h["qform_code"]),
        int(h["sform_code"]),
        int(h["xyzt_units"]),
    )


def test_predict_two_modality_case_in_the_download_layout(brats, brats_window, tmp_path):
    cfg, workdir, params = brats
    cfg = brats_config()
    src = tmp_path / "input" / "MICCAI_BraTS2020_ValidationData"
    two = _write_case(src, "BraTS20_Validation_007", ("flair", "t2"), 11)
    full = _write_case(src / "deeper", "BraTS20_Validation_008", ("flair", "t1ce", "t1", "t2"), 12)
    cfg.predict.input = str(tmp_path / "input")
    cfg.predict.output = str(tmp_path / "out")
    cfg.predict.probabilities = True
    results = {r["case"]: r for r in predict.predict_folder(cfg, workdir)}
    assert set(results) == {"BraTS20_Validation_007", "BraTS20_Validation_008"}
    r = results["BraTS20_Validation_007"]
    assert r["present"] == [True, False, False, True] and r["missing"] == ["t1ce", "t1"]
    assert results["BraTS20_Validation_008"]["missing"] == []
    for name, folder in (("BraTS20_Validation_007", two), ("BraTS20_Validation_008", full)):
        ref = nib.load(folder / f"{name}_flair.nii.gz")
        out = nib.load(tmp_path / "out" / f"{name}_pred.nii.gz")
        assert _header_fields(out) == _header_fields(ref)
        np.testing.assert_allclose(out.affine, ref.affine)
        labels = np.asarray(out.dataobj)
        assert set(np.unique(labels)) <= {0, 1, 2, 4} and out.get_data_dtype() == np.uint8
    # The written probabilities are those of the two-modality mask, not of all four.
    cache = workdir / "predict_cache"
    meta = json.loads((cache / "meta" / "BraTS20_Validation_007.json").read_text())
    vol = np.load(cache / "vol" / "BraTS20_Validation_007_vol.npy")
    mask = np.array([[1, 0, 0, 1]], bool)
    want = predict.probabilities_to_original(brats_window.predict(params, vol, mask)[0], meta)
    prob = np.asarray(nib.load(tmp_path / "out" / "BraTS20_Validation_007_prob.nii.gz").dataobj)
    assert prob.shape == (40, 44, 36, 4)
    np.testing.assert_allclose(prob, want, atol=1e-6)  # same windows per call: same numbers
    # Of the 15 combinations, only flair+t2 gives these numbers (the untrained network's
    # combinations differ by ~1e-4 here, against ~0 for the right one).
    every = brats_window.predict(params, vol, ALL)
    dist = [np.abs(prob - predict.probabilities_to_original(p, meta)).max() for p in every]
    assert int(np.argmin(dist)) == BRATS.combination_id([1, 0, 0, 1])
    assert sorted(dist)[1] > 10 * max(sorted(dist)[0], 1e-6)
    labels = np.asarray(nib.load(tmp_path / "out" / "BraTS20_Validation_007_pred.nii.gz").dataobj)
    np.testing.assert_array_equal(labels, np.array([0, 1, 2, 4])[want.argmax(-1)])
    listed = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert {c["case"]: c["present"] for c in listed["cases"]}["BraTS20_Validation_007"] == [
        True,
        False,
        False,
        True,
    ]


def test_predict_myops_single_sequence(myops, tmp_path):
    cfg, workdir, _ = myops
    cfg = myops_config()
    synthetic.write_myops(tmp_path / "in", 1, (48, 40, 3), seed=4, first_id=130)
    case = tmp_path / "in" / "myops_training_130"
    for s in ("DE", "T2", "gd"):
        (case / f"myops_training_130_{s}.nii.gz").unlink()
    cfg.predict.input = str(tmp_path / "in")
    (r,) = predict.predict_folder(cfg, workdir)
    assert r["present"] == [True, False, False] and r["missing"] == ["lge", "t2"]
    ref = nib.load(case / "myops_training_130_C0.nii.gz")
    out = nib.load(r["prediction"])
    assert _header_fields(out) == _header_fields(ref)
    np.testing.assert_allclose(out.affine, ref.affine)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 200, 500, 600, 1220, 2221}


def test_predict_needs_an_input_folder(brats, tmp_path):
    cfg, workdir, _ = brats
    cfg = brats_config()
    with pytest.raises(ValueError, match="predict.input"):
        predict.predict_folder(cfg, workdir)
    cfg.predict.input = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no case files"):
        predict.predict_folder(cfg, workdir)


# --- run.py end to end ---------------------------------------------------------------------


def _run(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "run.py", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.mark.slow
def test_run_py_evaluate_and_predict(tmp_path):
    cfg = dmaf_brats2020.get_config("smoke")
    workdir = tmp_path / "run"
    _save_untrained(cfg, workdir)
    common = ["--config=configs/dmaf_brats2020.py:smoke", f"--workdir={workdir}"]
    p = _run(*common, "--mode=evaluate", "--config.eval.combinations=flair,flair+t1ce+t1+t2")
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((workdir / "metrics.json").read_text())
    assert list(m["combinations"]) == ["flair", "flair+t1ce+t1+t2"]
    assert "| **Avg**" in p.stdout
    src = tmp_path / "new"
    _write_case(src, "BraTS20_Validation_002", ("t1ce", "t2"), 5)
    p = _run(*common, "--mode=predict", f"--config.predict.input={src}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "missing: flair, t1" in p.stdout
    out = nib.load(workdir / "predictions" / "BraTS20_Validation_002_pred.nii.gz")
    assert out.shape == (40, 44, 36)


def test_combination_masks_product_is_complete():
    # Every non-empty subset of the modalities is one of the 15 combinations, once.
    subsets = {m for m in itertools.product([False, True], repeat=4) if any(m)}
    assert {tuple(m) for m in ALL} == subsets and len(ALL) == 15
