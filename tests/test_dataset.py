import csv
import pathlib

import numpy as np
import pytest
from PIL import Image

from famf_jax import dataset


def write_patient(root: pathlib.Path, pid: str, label: int, size: int = 40):
    d = root / pid
    d.mkdir(parents=True)
    for name in ("gray.jpg", "elastic.jpg"):
        Image.fromarray(np.full((size, size, 3), 100, np.uint8)).save(d / name)
    np.save(d / "label.npy", np.array(float(label)))


def test_stratified_folds_are_disjoint_and_balanced():
    labels = {f"p{i}": int(i % 8 == 0) for i in range(80)}  # 10 positives
    folds = dataset.stratified_folds(sorted(labels), labels, 5, seed=3)
    all_ids = [i for f in folds for i in f]
    assert sorted(all_ids) == sorted(labels) and len(set(all_ids)) == 80
    for f in folds:
        assert len(f) == 16 and sum(labels[i] for i in f) == 2


@pytest.mark.parametrize("folds", [1, 5])
def test_plan_keeps_test_fixed_and_patients_separate(folds):
    labels = {f"p{i:03d}": int(i % 7 == 0) for i in range(100)}
    plan = dataset.plan_splits(labels, None, folds, seed=0)
    assert len(plan) == folds
    tests = {tuple(f["test"]) for f in plan}
    assert len(tests) == 1
    valid_union = set()
    for f in plan:
        tr, va, te = set(f["train"]), set(f["valid"]), set(f["test"])
        assert not (tr & va) and not (tr & te) and not (va & te)
        assert tr | va | te == set(labels)
        assert sum(labels[i] for i in va) >= 1
        valid_union |= va
    if folds > 1:
        assert valid_union == set(labels) - set(
            plan[0]["test"]
        )  # every pool patient validated once
    given = [{"train": ["p001", "p002", "p003"], "valid": ["p004"], "test": ["p000"]}]
    plan = dataset.plan_splits(labels, given, 1, seed=0)
    assert plan == [{"train": ["p001", "p002", "p003"], "valid": ["p004"], "test": ["p000"]}]


def test_layout_split_lists_hidden_and_broken(tmp_path):
    root, splits = tmp_path / "data", tmp_path / "splits"
    for i in range(6):
        write_patient(root, f"P{i}", i % 2)
    (root / "P5" / "elastic.jpg").write_bytes(b"not a jpeg")
    (root / ".DS_Store").mkdir()
    for s, ids in {"train": ["P0", "P1", "P5"], "valid": ["P2"], "test": ["P3", "P4"]}.items():
        (splits / s).mkdir(parents=True)
        for i in ids:
            (splits / s / i).touch()
    (splits / "train" / ".DS_Store").touch()
    data = dataset.load(
        root=str(root),
        splits=str(splits),
        manifest=None,
        folds=1,
        seed=0,
        workdir=tmp_path / "work",
    )
    assert data.folds[0] == {"train": ["P0", "P1"], "valid": ["P2"], "test": ["P3", "P4"]}
    text = "\n".join(data.problems)
    assert "P5" in text and "elastic.jpg" in text and "unreadable" in text
    assert ".DS_Store" in text
    assert (tmp_path / "work" / "splits.json").exists()


def test_ac_k_fold_folders(tmp_path):
    root, splits = tmp_path / "data", tmp_path / "splits"
    for i in range(8):
        write_patient(root, f"P{i}", i % 2)
    for k in range(2):
        for s, ids in {
            "train": [f"P{k}", f"P{k + 2}"],
            "valid": [f"P{4 + k}"],
            "test": ["P6", "P7"],
        }.items():
            (splits / f"ac_k_fold_{k}" / s).mkdir(parents=True)
            for i in ids:
                (splits / f"ac_k_fold_{k}" / s / i).touch()
    data = dataset.load(
        root=str(root), splits=str(splits), manifest=None, folds=2, seed=0, workdir=tmp_path / "w"
    )
    assert [f["valid"] for f in data.folds] == [["P4"], ["P5"]]


def test_manifest(tmp_path):
    root = tmp_path / "imgs"
    for i in range(4):
        write_patient(root, f"Q{i}", i % 2)
    m = tmp_path / "m.csv"
    with m.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "bmode", "swe", "label", "split"])
        for i, s in enumerate(["train", "train", "val", "test"]):
            w.writerow([f"Q{i}", f"imgs/Q{i}/gray.jpg", f"imgs/Q{i}/elastic.jpg", i % 2, s])
        w.writerow(["Q9", "imgs/none.jpg", "imgs/none.jpg", 1, "train"])
        w.writerow(["Q8", "imgs/Q0/gray.jpg", "imgs/Q0/gray.jpg", 3, "train"])
    data = dataset.load(
        root=None, splits=None, manifest=str(m), folds=1, seed=0, workdir=tmp_path / "w"
    )
    assert data.folds[0] == {"train": ["Q0", "Q1"], "valid": ["Q2"], "test": ["Q3"]}
    text = "\n".join(data.problems)
    assert "Q9" in text and "missing" in text and "label 3" in text
    with pytest.raises(dataset.DataError, match="columns"):
        bad = tmp_path / "bad.csv"
        bad.write_text("id,image\n1,a.jpg\n")
        dataset.load(root=None, splits=None, manifest=str(bad), folds=1, seed=0, workdir=tmp_path)


def _flat_splits(splits, lists):
    for s, ids in lists.items():
        (splits / s).mkdir(parents=True, exist_ok=True)
        for i in ids:
            (splits / s / i).touch()


def test_given_splits_must_not_share_patients(tmp_path):
    root, splits = tmp_path / "data", tmp_path / "splits"
    for i in range(5):
        write_patient(root, f"P{i}", i % 2)
    _flat_splits(splits, {"train": ["P0", "P1", "P4"], "valid": ["P2"], "test": ["P3", "P4"]})
    with pytest.raises(dataset.DataError, match="both the train and the test split: P4"):
        dataset.load(
            root=str(root), splits=str(splits), manifest=None, folds=1, seed=0, workdir=tmp_path
        )


def test_saved_plan_is_reused_only_for_the_same_settings(tmp_path):
    root = tmp_path / "data"
    for i in range(10):
        write_patient(root, f"P{i}", i % 2)
    work = tmp_path / "w"
    kw = dict(root=str(root), splits=None, manifest=None, workdir=work)
    first = dataset.load(**kw, folds=2, seed=0)
    assert dataset.load(**kw, folds=2, seed=0).folds == first.folds
    with pytest.raises(dataset.DataError, match="folds 2 -> 3"):
        dataset.load(**kw, folds=3, seed=0)
    with pytest.raises(dataset.DataError, match="seed 0 -> 1"):
        dataset.load(**kw, folds=2, seed=1)
    # The same data addressed another way (a moved workdir, a relative path) is the same plan.
    moved = tmp_path / "moved"
    root.rename(moved)
    again = dataset.load(
        root=f"{moved}/../moved", splits=None, manifest=None, workdir=work, folds=2, seed=0
    )
    assert again.folds == first.folds
    write_patient(moved, "P10", 1)  # other data: another plan
    with pytest.raises(dataset.DataError, match="patients"):
        dataset.load(root=str(moved), splits=None, manifest=None, workdir=work, folds=2, seed=0)
