import csv
import itertools

import numpy as np
import pytest
from PIL import Image

from common.loader import iterate
from famf_jax import pipeline, synthetic
from famf_jax.dataset import Record


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    synthetic.generate(out, n_patients=10, image_size=96, seed=5)
    return [
        Record(
            f"P{i:04d}",
            str(out / f"data/P{i:04d}/gray.jpg"),
            str(out / f"data/P{i:04d}/elastic.jpg"),
            0,
        )
        for i in range(10)
    ]


CFG = pipeline.ImageConfig(image_size=32, paired_crop=False)


def take(ds, workers, n, batch_size, drop_remainder=True):
    batches = iterate(ds, workers, batch_size=batch_size, drop_remainder=drop_remainder)
    return list(itertools.islice(iter(batches), n))


def test_train_batches_shapes_range(records):
    ds = pipeline.train_dataset(records, CFG, seed=1, epochs=None)
    b = take(ds, 0, 3, 4)[0]
    assert b["bmode"].shape == (4, 32, 32, 3) and b["swe"].shape == (4, 32, 32, 3)
    assert b["bmode"].dtype == np.float32 and b["label"].shape == (4,)
    assert -1 <= b["bmode"].min() and b["bmode"].max() <= 1
    # 10 records, batch 4: 2 full batches an epoch, every record at most once per epoch.
    first_epoch = np.concatenate([x["index"] for x in take(ds, 0, 2, 4)])
    assert len(set(first_epoch.tolist())) == 8


def test_same_batches_with_0_and_2_workers(records):
    ds = pipeline.train_dataset(records, CFG, seed=7, epochs=None)
    a, b = take(ds, 0, 6, 2), take(ds, 2, 6, 2)
    for x, y in zip(a, b):
        for k in ("bmode", "swe", "index"):
            np.testing.assert_array_equal(x[k], y[k])
    other = take(pipeline.train_dataset(records, CFG, seed=8, epochs=None), 0, 1, 2)[0]
    assert not np.array_equal(other["bmode"], a[0]["bmode"])


def test_paired_crop_and_eval(records):
    same = [Record("x", records[0].bmode, records[0].bmode, 0)] * 4
    paired = pipeline.ImageConfig(image_size=32, paired_crop=True)
    b = take(pipeline.train_dataset(same, paired, seed=0, epochs=None), 0, 1, 4)[0]
    np.testing.assert_array_equal(b["bmode"], b["swe"])
    indep = take(pipeline.train_dataset(same, CFG, seed=0, epochs=None), 0, 1, 4)[0]
    assert not np.array_equal(indep["bmode"], indep["swe"])
    ev = take(pipeline.eval_dataset(records, CFG), 0, 3, 4, drop_remainder=False)
    assert [len(x["label"]) for x in ev] == [4, 4, 2]
    again = take(pipeline.eval_dataset(records, CFG), 0, 1, 4)[0]
    np.testing.assert_array_equal(ev[0]["swe"], again["swe"])


def test_unreadable_training_pair_is_replaced_by_the_next_named_and_counted(
    records, tmp_path, caplog
):
    broken = tmp_path / "gray.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    bad = list(records)
    bad[2] = Record(records[2].patient_id, str(broken), records[2].swe, records[2].label)
    load = pipeline.LoadPair(CFG, bad)
    out = load.map((2, bad[2]))
    assert int(out["replaced"]) == 1 and int(out["index"]) == 3
    assert int(load.map((4, bad[4]))["replaced"]) == 0
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "training pair P0002" in warned and str(broken) in warned
    with pytest.raises(ValueError, match=str(broken)):  # evaluation: every case counts
        pipeline.LoadPair(CFG).map((2, bad[2]))


@pytest.mark.parametrize("workers", [0, 2])
def test_each_training_pair_keeps_its_own_swe_and_label(tmp_path, workers):
    # Shuffled, augmented and batched (in process or by worker processes), every sample's
    # B-mode, SWE and label come from the same patient: patient i's images are flat grey
    # levels that encode i (B-mode rising, SWE falling), its label is i % 2.
    from PIL import Image

    recs = []
    for i in range(8):
        paths = []
        for name, level in (("gray", 40 + 20 * i), ("elastic", 200 - 20 * i)):
            path = tmp_path / f"{name}{i}.png"
            Image.fromarray(np.full((96, 96, 3), level, np.uint8)).save(path)
            paths.append(str(path))
        recs.append(Record(f"P{i}", *paths, i % 2))
    ds = pipeline.train_dataset(recs, CFG, seed=3, epochs=None)
    seen = set()
    for b in take(ds, workers, 4, 4):
        centre = lambda x: (x[:, 16, 16, 0] + 1) * 127.5  # noqa: E731 (back to grey levels)
        i_b = np.round((centre(b["bmode"]) - 40) / 20).astype(int)
        i_s = np.round((200 - centre(b["swe"])) / 20).astype(int)
        np.testing.assert_array_equal(i_b, i_s)
        np.testing.assert_array_equal(b["label"], i_b % 2)
        seen.update(i_b.tolist())
    assert len(seen) == 8


def test_generated_set_records_how_it_was_drawn(tmp_path):
    # famf_generalisation.py refuses further patients drawn with the run's own settings: the
    # same seed, count and size redraw the same patients; another count draws others.
    def draw(folder, n):
        synthetic.generate(tmp_path / folder, n_patients=n, image_size=32, seed=3, cue_noise=0.05)
        return (tmp_path / folder / "data/P0000/gray.jpg").read_bytes()

    first = draw("a", 10)
    assert synthetic.generator_settings(tmp_path / "a") == dict(
        seed=3,
        patients=10,
        image_size=32,
        cue_noise=0.05,
        malignant_fraction=synthetic.MALIGNANT_FRACTION,
    )
    assert synthetic.generator_settings(tmp_path / "a/data") is None
    assert draw("b", 10) == first and draw("c", 12) != first


def test_generated_cues_are_the_labels_but_for_the_flipped_ones(tmp_path):
    # cues.csv: one row per manifest patient, in its order; without noise every cue is its
    # label, with noise 0.5 about half are the other class's, and the image shows the recorded
    # one: a stiff lesion puts green to red (not blue) pixels in the SWE box, a soft one none.
    def read(folder, noise):
        out = tmp_path / folder
        synthetic.generate(out, n_patients=40, image_size=32, seed=4, cue_noise=noise)
        with open(out / synthetic.CUES_FILE, newline="") as f:
            rows = list(csv.DictReader(f))
        with open(out / "manifest.csv", newline="") as f:
            labels = {r["patient_id"]: int(r["label"]) for r in csv.DictReader(f)}
        assert [r["patient_id"] for r in rows] == list(labels)
        cues = np.array([[int(r[c]) for c in synthetic.CUES] for r in rows])
        return out, rows, cues, np.array(list(labels.values()))

    _, _, cues, y = read("clean", 0.0)
    assert (cues == y[:, None]).all() and 0 < y.sum() < len(y)
    out, rows, cues, y = read("noisy", 0.5)
    assert 0.3 < np.mean(cues != y[:, None]) < 0.7
    warm = []
    for r in rows:
        rgb = np.asarray(Image.open(out / "data" / r["patient_id"] / "elastic.jpg"), int)
        warm.append(((np.maximum(rgb[..., 0], rgb[..., 1]) - rgb[..., 2]) > 60).sum())
    stiff = cues[:, synthetic.CUES.index("stiff")] == 1
    assert stiff.any() and (~stiff).any()
    assert min(np.array(warm)[stiff]) > 0 and max(np.array(warm)[~stiff]) == 0
