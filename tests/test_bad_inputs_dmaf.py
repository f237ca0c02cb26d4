"""Bad inputs to every DMAF-Net run.py mode (issue 10 items 1 and 2): each run ends with a
non-zero exit and one last stderr line `error: ...` naming the culprit, without a traceback,
before any JAX compilation, and leaves its folder exactly as it found it.

Every kind is one `run.py` subprocess in a folder of its own. The runs are started together
(a few at a time) by the module fixture, only for the kinds pytest selected, then each test
checks its own run. Data: 3 synthetic BraTS cases of 32^3 and 2 MyoPS subjects of 32 x 32 x 2
slices in the real raw layouts, and a checkpoint folder whose state is a stand-in (every run
that reads one stops before restoring arrays: a run that got further fails its test).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import shutil

import nibabel as nib
import numpy as np
import pytest

from common import nifti
from common.checkpoint import Checkpointer
from configs import dmaf_brats2020
from conftest import assert_one_line_error, run_py
from dmaf_jax import synthetic

BRATS = "configs/dmaf_brats2020.py:smoke"
MYOPS = "configs/dmaf_myops2020.py:smoke"
CASES = [f"BraTS20_Training_00{i}" for i in (1, 2, 3)]
BAD = CASES[1]  # the case a per-case kind damages


@dataclasses.dataclass
class Data:
    brats: pathlib.Path  # raw BraTS: <case>/<case>_{flair,t1ce,t1,t2,seg}.nii.gz
    myops: pathlib.Path  # raw MyoPS: <case>/<case>_{C0,DE,T2,gd}.nii.gz
    ckpt: pathlib.Path  # a workdir holding checkpoints/0 with the smoke config recorded


@dataclasses.dataclass
class Run:
    args: list[str]
    culprits: tuple[str, ...]


KINDS = {}


def kind(name: str):
    def register(fn):
        KINDS[name] = fn
        return fn

    return register


def cmd(config: str, mode: str, workdir: pathlib.Path, *extra: str) -> list[str]:
    return ["--config", config, f"--mode={mode}", f"--workdir={workdir}", *extra]


def raw_copy(data: Data, d: pathlib.Path) -> pathlib.Path:
    shutil.copytree(data.brats, d / "raw")
    return d / "raw"


def case_file(raw: pathlib.Path, suffix: str, case: str = BAD) -> pathlib.Path:
    return raw / case / f"{case}_{suffix}.nii.gz"


def rewrite(path: pathlib.Path, change) -> None:
    """The NIfTI at `path` written again with change(data, affine) -> (data, affine)."""
    img = nib.load(path)
    data, affine = change(np.asarray(img.dataobj).copy(), img.affine.copy())
    nifti.save(path, data, affine)


def one_bad_case(data: Data, d: pathlib.Path, damage, mode: str = "preprocess") -> list[str]:
    """The 3 cases with BAD damaged. train: the 2 left give a fresh split with 1 training
    case, fewer than the smoke batch of 2. preprocess: lists whose train.txt names BAD alone.
    evaluate: lists whose test.txt names BAD alone."""
    raw = raw_copy(data, d)
    damage(raw)
    args = cmd(BRATS, mode, d / "work", f"--config.data.raw_dir={raw}")
    others = [hg(CASES[0]), hg(CASES[2])]
    if mode == "preprocess":
        args.append(f"--config.data.splits={lists(d, train=[hg(BAD)], test=others)}")
    elif mode == "evaluate":
        shutil.copytree(data.ckpt, d / "work")
        args.append(f"--config.data.splits={lists(d, train=others, test=[hg(BAD)])}")
    return args


def lists(d: pathlib.Path, **split: list[str]) -> pathlib.Path:
    folder = d / "lists"
    folder.mkdir()
    for s, names in split.items():
        (folder / f"{s}.txt").write_text("".join(f"{n}\n" for n in names))
    return folder


def hg(name: str) -> str:
    return f"HG_{name}"


# --- config values ---------------------------------------------------------------------------


@kind("unknown dataset")
def _(data, d):
    args = cmd(BRATS, "predict", d / "work", f"--config.predict.input={data.brats}")
    return Run(args + ["--config.dataset=brats2021"], ("dataset", "brats2021", "brats2020"))


@kind("unknown config variant")
def _(data, d):
    args = cmd("configs/dmaf_brats2020.py:tiny", "train", d / "work")
    return Run(args, ("variant 'tiny'", "paper, demo or smoke"))


@kind("crop not divisible by the downsampling")
def _(data, d):
    args = cmd(BRATS, "train", d / "work", f"--config.data.raw_dir={data.brats}")
    return Run(
        args + ["--config.data.crop=(24,32,32)"], ("data.crop (24, 32, 32)", "multiple of 16")
    )


@kind("batch size 0")
def _(data, d):
    args = cmd(BRATS, "train", d / "work", f"--config.data.raw_dir={data.brats}")
    return Run(args + ["--config.data.batch_size=0"], ("data.batch_size", "at least 1", "not 0"))


@kind("probability above 1 (data.foreground_crop)")
def _(data, d):
    args = cmd(BRATS, "preprocess", d / "work", f"--config.data.raw_dir={data.brats}")
    return Run(args + ["--config.data.foreground_crop=1.5"], ("data.foreground_crop", "[0, 1]"))


# --- folders -----------------------------------------------------------------------------------


@kind("data.raw_dir missing")
def _(data, d):
    args = cmd(BRATS, "preprocess", d / "work", f"--config.data.raw_dir={d / 'nowhere'}")
    return Run(args, ("data.raw_dir", str(d / "nowhere"), "does not exist"))


@kind("raw folder without case files")
def _(data, d):
    (d / "raw" / "docs").mkdir(parents=True)
    (d / "raw" / "docs" / "README.txt").write_text("the images are elsewhere\n")
    (d / "raw" / "scan.nii.gz").write_bytes(b"")
    args = cmd(BRATS, "preprocess", d / "work", f"--config.data.raw_dir={d / 'raw'}")
    return Run(args, ("data.raw_dir", "no case files", "_{flair,t1ce,t1,t2}", "scan.nii.gz"))


@kind("data.root missing")
def _(data, d):
    args = cmd(BRATS, "train", d / "work", f"--config.data.root={d / 'pre'}")
    return Run(args, ("data.root", str(d / "pre"), "does not exist"))


# --- raw cases: one bad case leaves too few for a batch (item 2) ------------------------------


def _fewer_than_a_batch(reason: str) -> tuple[str, ...]:
    return ("only 1 training case", "data.batch_size 2", "1 case left out", f"{BAD} ({reason}")


def _no_training_case(reason: str) -> tuple[str, ...]:
    return ("no training case: 1 case left out", f"{BAD} ({reason}")


def _no_test_case(reason: str) -> tuple[str, ...]:
    return ("no test case: 1 case left out", f"{BAD} ({reason}")


@kind("case missing a modality file")
def _(data, d):
    args = one_bad_case(data, d, lambda raw: case_file(raw, "t1ce").unlink(), "train")
    return Run(args, _fewer_than_a_batch("missing modality file(s): t1ce"))


@kind("case missing its label file")
def _(data, d):
    args = one_bad_case(data, d, lambda raw: case_file(raw, "seg").unlink(), "evaluate")
    return Run(args, _no_test_case(f"no label file {BAD}_seg.nii(.gz)"))


@kind("truncated .nii.gz")
def _(data, d):
    def damage(raw):
        p = case_file(raw, "t2")
        p.write_bytes(p.read_bytes()[:2000])

    args = one_bad_case(data, d, damage)
    return Run(args, _no_training_case(f"cannot read {BAD}_t2.nii.gz: EOFError"))


@kind("file that is no NIfTI")
def _(data, d):
    args = one_bad_case(data, d, lambda raw: case_file(raw, "flair").write_bytes(b"<html>"))
    return Run(args, _no_training_case(f"cannot read {BAD}_flair.nii.gz"))


@kind("modalities of different shapes")
def _(data, d):
    def damage(raw):
        rewrite(case_file(raw, "t1"), lambda x, a: (x[:, :, :30], a))

    args = one_bad_case(data, d, damage)
    shapes = f"shape (32, 32, 30) of {BAD}_t1.nii.gz differs from (32, 32, 32)"
    return Run(args, _no_training_case(shapes))


@kind("modalities with different affines")
def _(data, d):
    def damage(raw):
        def shift(x, a):
            a[0, 3] += 4.0
            return x, a

        rewrite(case_file(raw, "t2"), shift)

    args = one_bad_case(data, d, damage)
    affine = f"affine of {BAD}_t2.nii.gz differs from {BAD}_flair.nii.gz"
    return Run(args, _no_training_case(affine))


@kind("NaN in a volume")
def _(data, d):
    def damage(raw):
        def nan(x, a):
            x = x.astype(np.float32)
            x[3, 4, 5] = np.nan
            return x, a

        rewrite(case_file(raw, "t1ce"), nan)

    args = one_bad_case(data, d, damage)
    return Run(args, _no_training_case(f"{BAD}_t1ce.nii.gz holds NaN"))


@kind("label value outside {0, 1, 2, 4}")
def _(data, d):
    def damage(raw):
        def three(x, a):
            x[x == 1] = 3
            return x, a

        rewrite(case_file(raw, "seg"), three)

    args = one_bad_case(data, d, damage, "train")
    labels = f"label values [3] outside [0, 1, 2, 4] in {BAD}_seg.nii.gz"
    return Run(args, _fewer_than_a_batch(labels))


@kind("MyoPS: no subject can be preprocessed")
def _(data, d):
    shutil.copytree(data.myops, d / "raw")
    a, b = "myops_training_101", "myops_training_102"
    rewrite(d / "raw" / a / f"{a}_gd.nii.gz", lambda x, aff: (np.where(x == 200, 300, x), aff))
    (d / "raw" / b / f"{b}_DE.nii.gz").unlink()
    args = cmd(MYOPS, "preprocess", d / "work", f"--config.data.raw_dir={d / 'raw'}")
    return Run(
        args,
        (
            "no case of data.raw_dir",
            "2 cases left out",
            f"{a} (label values [300]",
            f"{b} (missing modality file(s): DE)",
        ),
    )


# --- split lists -------------------------------------------------------------------------------


@kind("split list naming a case that does not exist")
def _(data, d):
    folder = lists(d, train=[hg(CASES[0]), "HG_BraTS20_Training_01"], test=[hg(CASES[2])])
    args = cmd(BRATS, "preprocess", d / "work", f"--config.data.raw_dir={data.brats}")
    return Run(
        args + [f"--config.data.splits={folder}"],
        ("data.splits", "train.txt", "1 case not found", "HG_BraTS20_Training_01"),
    )


@kind("split lists that overlap")
def _(data, d):
    folder = lists(d, train=[hg(CASES[0]), hg(CASES[1])], test=[hg(CASES[2]), hg(CASES[1])])
    args = cmd(BRATS, "preprocess", d / "work", f"--config.data.raw_dir={data.brats}")
    return Run(
        args + [f"--config.data.splits={folder}"],
        ("data.splits", hg(CASES[1]), "listed twice", "train.txt:2", "test.txt:2"),
    )


# --- missing-rate CSV --------------------------------------------------------------------------

HEADER = "data_name,mask_id,mask,pos_mask_ids\n"


def csv_run(data, d, text: str, mode: str = "preprocess") -> list[str]:
    (d / "masks.csv").write_text(text)
    args = cmd(BRATS, mode, d / "work", f"--config.data.raw_dir={data.brats}")
    return args + [f"--config.data.missing_csv={d / 'masks.csv'}"]


@kind("missing-rate CSV with wrong columns")
def _(data, d):
    args = csv_run(data, d, "name;mask\nHG_BraTS20_Training_001;[True, True, True, True]\n")
    return Run(args, ("data.missing_csv", "masks.csv", "needs the columns", "has name;mask"))


@kind("missing-rate CSV with a typo in a mask")
def _(data, d):
    rows = [f'{hg(c)},14,"[True, True, True, True]",' for c in CASES]
    rows[1] = f'{hg(CASES[1])},14,"[True, Ture, True, True]",'
    args = csv_run(data, d, HEADER + "\n".join(rows) + "\n")
    return Run(args, ("data.missing_csv", "masks.csv:3", hg(CASES[1]), "Ture"))


@kind("missing-rate CSV naming unknown cases")
def _(data, d):
    rows = [f'{c},14,"[True, True, True, True]",' for c in CASES]  # no HG_ prefix
    args = csv_run(data, d, HEADER + "\n".join(rows) + "\n", "train")
    return Run(
        args,
        ("data.missing_csv", "no row for 2 training cases", "rows name no case here", CASES[0]),
    )


# --- checkpoints -------------------------------------------------------------------------------


@kind("evaluate without a checkpoint")
def _(data, d):
    args = cmd(BRATS, "evaluate", d / "work", f"--config.data.raw_dir={data.brats}")
    return Run(args, ("no checkpoints in", str(d / "work" / "checkpoints"), "train first"))


@kind("evaluate a checkpoint of another model")
def _(data, d):
    shutil.copytree(data.ckpt, d / "work")
    args = cmd(BRATS, "evaluate", d / "work", f"--config.data.raw_dir={data.brats}")
    return Run(
        args + ["--config.model.token_dim=64"],
        ("checkpoint", "checkpoints/0", "model.token_dim=32 (the config says 64)"),
    )


# --- predict inputs ----------------------------------------------------------------------------


@kind("predict on a folder without NIfTI files")
def _(data, d):
    shutil.copytree(data.ckpt, d / "work")
    (d / "in").mkdir()
    (d / "in" / "notes.txt").write_text("x\n")
    args = cmd(BRATS, "predict", d / "work", f"--config.predict.input={d / 'in'}")
    return Run(args, ("predict.input", str(d / "in"), "no case files"))


@kind("predict on a corrupt NIfTI file")
def _(data, d):
    shutil.copytree(data.ckpt, d / "work")
    case = d / "in" / "BraTS20_Validation_001"
    case.mkdir(parents=True)
    (case / "BraTS20_Validation_001_flair.nii.gz").write_bytes(b"\x1f\x8b broken")
    args = cmd(BRATS, "predict", d / "work", f"--config.predict.input={d / 'in'}")
    return Run(
        args,
        (
            "predict.input",
            "BraTS20_Validation_001 (cannot read BraTS20_Validation_001_flair.nii.gz",
        ),
    )


@kind("predict on a truncated NIfTI file")
def _(data, d):
    shutil.copytree(data.ckpt, d / "work")
    (d / "in").mkdir()
    shutil.copytree(data.brats / CASES[0], d / "in" / CASES[0])
    case_file(d / "in", "t1", CASES[0]).unlink()  # a missing modality is fine for predict
    t2 = case_file(d / "in", "t2", CASES[0])
    t2.write_bytes(t2.read_bytes()[:3000])
    args = cmd(BRATS, "predict", d / "work", f"--config.predict.input={d / 'in'}")
    return Run(
        args,
        ("could be preprocessed", f"{CASES[0]} (cannot read {CASES[0]}_t2.nii.gz: EOFError"),
    )


# --- running them ------------------------------------------------------------------------------


def tree(path: pathlib.Path) -> list[str]:
    """Every file and folder under `path`, relative, with file sizes."""
    return sorted(
        f"{p.relative_to(path)}{'/' if p.is_dir() else f' {p.stat().st_size}'}"
        for p in path.rglob("*")
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Data:
    base = tmp_path_factory.mktemp("bad_inputs_data")
    synthetic.write_brats(base / "brats", 3, (32, 32, 32), seed=0)
    synthetic.write_myops(base / "myops", 2, (32, 32, 2), seed=0)
    cfg = dmaf_brats2020.get_config("smoke")
    ckpt = Checkpointer(base / "ckpt" / "checkpoints", best_metrics=("dice",))  # DMAF's layout
    # A stand-in state: the tested runs stop before restoring arrays.
    meta = {"config": cfg.to_dict(), "epoch": 1, "step": 0, "metrics": {}}
    ckpt.save(0, {"w": np.zeros(2, np.float32)}, meta)
    ckpt.close()
    return Data(base / "brats", base / "myops", base / "ckpt")


@dataclasses.dataclass
class Outcome:
    run: Run
    proc: object
    before: list[str]
    after: list[str]


@pytest.fixture(scope="module")
def outcomes(request, data, tmp_path_factory) -> dict[str, Outcome]:
    """The selected kinds' runs, three at a time (each is mostly Python start-up), with JAX
    logging every compilation."""
    wanted = [
        item.callspec.params["kind"]
        for item in request.session.items
        if item.path == request.path
        and hasattr(item, "callspec")
        and "kind" in item.callspec.params
    ]
    setups = {}
    for name in dict.fromkeys(wanted):
        d = tmp_path_factory.mktemp("bad")
        setups[name] = (d, KINDS[name](data, d), tree(d))

    def go(name):
        d, run, before = setups[name]
        proc = run_py(*run.args, timeout=120)
        return name, Outcome(run, proc, before, tree(d))

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_LOG_COMPILES", "1")
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            return dict(pool.map(go, setups))


@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_input(kind, outcomes):
    o = outcomes[kind]
    line = assert_one_line_error(o.proc, *o.run.culprits)
    print(f"{kind} | {line}")
    assert "Compiling" not in o.proc.stderr, "the run compiled before it failed"
    assert o.after == o.before, "the failed run changed its folder"


def test_batch_not_divisible_by_the_devices(data, tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setenv("JAX_LOG_COMPILES", "1")
    before = tree(tmp_path)
    args = cmd(BRATS, "train", tmp_path / "work", f"--config.data.raw_dir={data.brats}")
    proc = run_py(*args, "--config.data.batch_size=3", timeout=120)
    line = assert_one_line_error(proc, "data.batch_size", "multiple of jax.device_count() = 2")
    print(f"batch size not divisible by the devices | {line}")
    assert "Compiling" not in proc.stderr
    assert tree(tmp_path) == before


# --- the same checks in-process: more fields and folders than subprocesses can afford ---------


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("data.crop", (32, 32, 1), "BraTS volumes need a 3-D crop"),
        ("data.crop", (32, 0, 32), "three positive sizes"),
        ("data.intensity", 1.0, "in [0, 1)"),
        ("data.rotation", -5, "degrees in [0, 180]"),
        ("data.workers", -1, "at least 0"),
        ("model.dropout", 1.0, "a probability in [0, 1)"),
        ("model.fusion", "sum", "dmaf or mean"),
        ("model.channels", (8,), "at least two positive widths"),
        ("train.learning_rate", 0.0, "positive"),
        ("train.checkpoint_every", 0, "at least 1"),
        ("dtms.k_min", 1.5, "in [0, 1]"),
        ("dtms.mu", 1.0, "in [0, 1)"),
        ("dtms.k_ramp", (30, 20), "start <= end"),
        ("eval.overlap", 1.0, "in [0, 1)"),
        ("eval.window", "tiled", "sliding or centre"),
        ("data.max_replaced", -1, "at least 0"),
        ("train.max_skipped_in_row", -1, "at least 0"),
    ],
)
def test_config_field_named(field, value, expected):
    from dmaf_jax import experiment

    cfg = dmaf_brats2020.get_config("smoke")
    section, name = field.split(".")
    cfg[section][name] = value
    with pytest.raises(ValueError) as e:
        experiment.validate_config(cfg)
    assert str(e.value).startswith(field) and expected in str(e.value), str(e.value)


def test_folders_of_the_wrong_kind(data, tmp_path):
    from dmaf_jax import dataset, splits

    (tmp_path / "raw.zip").write_bytes(b"PK")
    cfg = dmaf_brats2020.get_config("smoke")
    cfg.data.raw_dir = str(tmp_path / "raw.zip")
    with pytest.raises(NotADirectoryError, match="data.raw_dir .*raw.zip is a file"):
        dataset.prepare(cfg, tmp_path / "work")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "test.txt").write_text("HG_BraTS20_Training_003\n")
    with pytest.raises(FileNotFoundError, match="data.splits .*lists has no train.txt"):
        splits.read_lists(tmp_path / "lists", "data.splits")
    cfg = dmaf_brats2020.get_config("smoke")
    cfg.data.raw_dir, cfg.data.splits = str(data.brats), str(tmp_path / "raw.zip")
    with pytest.raises(NotADirectoryError, match="data.splits .*raw.zip is a file"):
        dataset.prepare(cfg, tmp_path / "work")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lists", "raw.zip"]
    (tmp_path / "work.txt").write_text("")
    cfg.data.splits = None
    with pytest.raises(NotADirectoryError, match="--workdir .*work.txt is a file"):
        dataset.prepare(cfg, tmp_path / "work.txt")


def test_predict_output_that_is_a_file(data, tmp_path):
    from dmaf_jax import predict

    cfg = dmaf_brats2020.get_config("smoke")
    cfg.predict.input, cfg.predict.output = str(data.brats), str(tmp_path / "out.nii.gz")
    (tmp_path / "out.nii.gz").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="predict.output .*out.nii.gz is a file"):
        predict.predict_folder(cfg, data.ckpt)


def test_myops_slices_listed_for_a_subject_that_failed(data, tmp_path):
    """A MyoPS split lists slices; the subject they belong to is named with its reason."""
    from configs import dmaf_myops2020
    from dmaf_jax import dataset

    shutil.copytree(data.myops, tmp_path / "raw")
    a, b = "myops_training_101", "myops_training_102"
    rewrite(tmp_path / "raw" / a / f"{a}_gd.nii.gz", lambda x, aff: (x.astype(np.float32) / 3, aff))
    folder = lists(tmp_path, train=[f"{a}_slice_0", f"{a}_slice_1"], test=[f"{b}_slice_0"])
    cfg = dmaf_myops2020.get_config("smoke")
    cfg.data.raw_dir, cfg.data.splits = str(tmp_path / "raw"), str(folder)
    with pytest.raises(ValueError) as e:
        dataset.prepare(cfg, tmp_path / "work", for_training=True)
    assert str(e.value).startswith(f"no training case: 1 case left out: {a} (label values ")
    assert f"in {a}_gd.nii.gz)" in str(e.value) and b not in str(e.value)
    assert not (tmp_path / "work").exists()
    # A slice the subject does not have is a typo, not a left-out case.
    (folder / "train.txt").write_text(f"{b}_slice_1\n{b}_slice_7\n")
    (folder / "test.txt").write_text(f"{b}_slice_0\n")
    with pytest.raises(ValueError, match=f"train.txt names 1 case not found .*: {b}_slice_7$"):
        dataset.prepare(cfg, tmp_path / "work", for_training=True)


def test_read_only_workdir(data, tmp_path, monkeypatch):
    from dmaf_jax import dataset

    cfg = dmaf_brats2020.get_config("smoke")
    cfg.data.raw_dir = str(data.brats)
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and pathlib.Path(p) != ro)
    with pytest.raises(PermissionError, match=f"--workdir {ro}/a/work: {ro} is not writable"):
        dataset.prepare(cfg, ro / "a" / "work")
    assert not any(ro.iterdir())
