"""Bad inputs to every FAMF-Net mode of run.py (issue 10, items 1 and 2).

Each case runs `run.py --config configs/famf.py:smoke` in a subprocess and asserts a non-zero
exit, one last stderr line `error: ...` naming the culprit, no traceback, no JAX compilation
(`JAX_LOG_COMPILES` logs every one) and a workdir exactly as it was before (absent stays absent).
The runs of the selected cases start together in a module fixture, two at a time, so the file
costs about half its subprocess time; each test then checks its own run. Further kinds run the
same mode functions in process (a subprocess costs ~2 s of imports), where the ValueError or
OSError they raise is what run.py prints verbatim.
"""

import csv
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from configs import famf as famf_config
from conftest import REPO, assert_one_line_error, run_py
from famf_jax import experiment, synthetic

SMOKE = ("--config", "configs/famf.py:smoke")


@dataclasses.dataclass(frozen=True)
class Data:
    """The module's synthetic set (12 patients, 48 px): paths and the generator's splits."""

    root: pathlib.Path  # <root>/manifest.csv, <root>/data/<patient>/..., <root>/splits/...
    split: dict[str, list[str]]

    @property
    def manifest(self) -> pathlib.Path:
        return self.root / "manifest.csv"

    @property
    def images(self) -> pathlib.Path:
        return self.root / "data"

    @property
    def splits(self) -> pathlib.Path:
        return self.root / "splits"


@dataclasses.dataclass
class Case:
    args: list[str]
    workdir: pathlib.Path
    culprits: tuple[str, ...]
    env: dict[str, str] | None = None  # extra environment of the run


def _rows(data: Data) -> list[dict]:
    with data.manifest.open(newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: pathlib.Path, header: list[str], rows: list[list]) -> pathlib.Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _manifest_with(data: Data, path: pathlib.Path, change: dict[str, dict]) -> pathlib.Path:
    """A copy of the manifest (absolute image paths) with some rows' cells replaced."""
    header = ["patient_id", "bmode", "swe", "label", "split"]
    rows = []
    for r in _rows(data):
        r = dict(r, bmode=str(data.root / r["bmode"]), swe=str(data.root / r["swe"]))
        r.update(change.get(r["patient_id"], {}))
        rows.append([r[k] for k in header])
    return _write_csv(path, header, rows)


def _copy_images(data: Data, tmp: pathlib.Path) -> pathlib.Path:
    out = tmp / "images"
    shutil.copytree(data.images, out)
    return out


def _fake_trained(workdir: pathlib.Path, metrics: dict | None = None) -> pathlib.Path:
    """A workdir whose fold_0 holds a checkpoint at step 0 with the smoke config's meta and the
    given validation `metrics` (the state is a stand-in: every case here fails before a
    restore)."""
    cfg = famf_config.get_config("smoke")
    ckpt = experiment.checkpointer(workdir, 0)
    meta = {"config": cfg.to_dict(), "fold": 0, "epoch": 1, "step": 0, "warm": True}
    if metrics is not None:
        meta["metrics"] = metrics
    ckpt.save(0, {"w": np.zeros(2, np.float32)}, meta)
    ckpt.close()
    return workdir


# ------------------------------------------------------------------------------------ cases
# Each builds its inputs under its own folder `tmp` and returns the run's arguments, its workdir
# and the strings its error line must contain.


def root_missing(data, tmp):
    return Case([f"--config.data.root={tmp / 'nope'}"], tmp / "w", ("data.root", "nope"))


def root_is_a_file(data, tmp):
    args = [f"--config.data.root={data.manifest}"]
    return Case(args, tmp / "w", ("data.root", "manifest.csv", "is a file"))


def manifest_missing(data, tmp):
    args = [f"--config.data.manifest={tmp / 'none.csv'}"]
    return Case(args, tmp / "w", ("data.manifest", "none.csv", "does not exist"))


def manifest_wrong_columns(data, tmp):
    bad = _write_csv(tmp / "cols.csv", ["id", "image", "y"], [[1, "a.jpg", 0]])
    args = [f"--config.data.manifest={bad}"]
    return Case(args, tmp / "w", ("cols.csv", "needs patient_id, bmode, swe, label"))


def manifest_not_text(data, tmp):
    bad = tmp / "m.csv"
    bad.write_bytes(bytes(range(128, 256)) * 4)
    return Case([f"--config.data.manifest={bad}"], tmp / "w", ("m.csv", "not a UTF-8"))


def manifest_bad_labels(data, tmp):
    # Every test patient's label is unusable: the error names them and why.
    a, b, c = data.split["test"][:3]
    change = {a: {"label": "benign"}, b: {"label": "2"}, c: {"label": "0.5"}}
    m = _manifest_with(data, tmp / "labels.csv", change)
    culprits = (
        "test split is empty",
        f"{a} (",
        "label 'benign' is not a number",
        f"{b} (",
        "label 2 is not 0 or 1",
        "label 0.5 is not 0 or 1",
    )
    return Case([f"--config.data.manifest={m}"], tmp / "w", culprits)


def manifest_missing_image(data, tmp):
    # The example: a manifest whose one patient has a missing image.
    m = _write_csv(
        tmp / "one.csv",
        ["patient_id", "bmode", "swe", "label"],
        [["P1", "imgs/P1/gray.jpg", str(data.images / "P0000" / "elastic.jpg"), 0]],
    )
    culprits = ("one.csv", "P1", str(tmp / "imgs" / "P1" / "gray.jpg"), "missing")
    return Case([f"--config.data.manifest={m}"], tmp / "w", culprits)


def corrupt_images(data, tmp):
    # Garbage bytes, a truncated JPEG and a 16-bit PNG under the test patients' names.
    images = _copy_images(data, tmp)
    a, b, c = data.split["test"][:3]
    (images / a / "gray.jpg").write_bytes(b"\x00garbage" * 10)
    full = (images / b / "elastic.jpg").read_bytes()
    (images / b / "elastic.jpg").write_bytes(full[: len(full) // 3])
    deep = (np.arange(48 * 48).reshape(48, 48) * 20).astype(np.uint16)
    Image.fromarray(deep).save(images / c / "gray.jpg", format="PNG")
    args = [f"--config.data.root={images}", f"--config.data.splits={data.splits}"]
    culprits = (
        "test split is empty",
        f"{images / a / 'gray.jpg'} unreadable",
        f"{images / b / 'elastic.jpg'} unreadable",
        f"{images / c / 'gray.jpg'} has mode I;16",
    )
    return Case(args, tmp / "w", culprits)


def corrupt_label_files(data, tmp):
    images = _copy_images(data, tmp)
    a, b, c = data.split["test"][:3]
    (images / a / "label.npy").write_bytes(b"not numpy")
    np.save(images / b / "label.npy", np.array([0.0, 1.0]))
    (images / c / "label.npy").unlink()
    args = [f"--config.data.root={images}", f"--config.data.splits={data.splits}"]
    culprits = (
        f"{images / a / 'label.npy'} is not a .npy file",
        f"{images / b / 'label.npy'}: label must hold one value, has shape (2,)",
        f"no {images / c / 'label.npy'}",
    )
    return Case(args, tmp / "w", culprits)


def splits_name_unknown_patients(data, tmp):
    splits = tmp / "splits"
    shutil.copytree(data.splits, splits)
    (splits / "test" / "P0999").touch()
    args = [f"--config.data.root={data.images}", f"--config.data.splits={splits}"]
    return Case(args, tmp / "w", ("data.splits", "P0999", "no folder in data.root"))


def splits_overlap(data, tmp):
    splits = tmp / "splits"
    shutil.copytree(data.splits, splits)
    leaked = data.split["train"][0]
    (splits / "test" / leaked).touch()
    args = [f"--config.data.root={data.images}", f"--config.data.splits={splits}"]
    return Case(args, tmp / "w", ("both the train and the test split", leaked))


def too_few_for_a_batch(data, tmp):
    n = len(data.split["train"])
    args = [f"--config.data.manifest={data.manifest}", f"--config.train.batch_size={n + 1}"]
    return Case(args, tmp / "w", (f"train split has {n} patient(s)", f"batch_size={n + 1}"))


def left_out_below_a_batch(data, tmp):
    # Item 2: unreadable training images leave fewer patients than a batch; the error names
    # the patients left out and why.
    a, b, c = data.split["train"][:3]
    change = {p: {"swe": str(tmp / f"{p}.jpg")} for p in (a, b, c)}
    m = _manifest_with(data, tmp / "m.csv", change)
    culprits = ("fewer than one batch (train.batch_size=4)", a, f"{tmp / (a + '.jpg')} missing")
    return Case([f"--config.data.manifest={m}"], tmp / "w", culprits)


def synthetic_set_too_small(data, tmp):
    # Generated data that cannot train is removed again, with the workdir it created.
    args = ["--config.data.synthetic_patients=5"]
    return Case(args, tmp / "w", ("synthetic data", "synthetic_patients=5", "fewer than one"))


def config_out_of_range(field, value, culprit):
    def case(data, tmp):
        args = [f"--config.data.manifest={data.manifest}", f"--config.{field}={value}"]
        return Case(args, tmp / "w", (culprit,))

    case.__name__ = f"config_{field.replace('.', '_')}"
    return case


def batch_not_divisible_by_devices(data, tmp):
    # Two CPU devices (forced through XLA_FLAGS): a batch of 3 cannot split over them.
    args = [f"--config.data.manifest={data.manifest}", "--config.train.batch_size=3"]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return Case(args, tmp / "w", ("train.batch_size=3", "2 devices"), env)


def workdir_is_a_file(data, tmp):
    (tmp / "w").write_text("x")
    return Case([f"--config.data.manifest={data.manifest}"], tmp / "w", ("--workdir", "is a file"))


def resume_other_state(data, tmp):
    w = _fake_trained(tmp / "w")  # made with adamw (smoke)
    args = [f"--config.data.manifest={data.manifest}", "--config.train.optimizer=sgd"]
    return Case(args, w, ("checkpoints/0", "train.optimizer='adamw'", "'sgd'"))


def evaluate_no_workdir(data, tmp):
    return Case(["--mode=evaluate"], tmp / "w", ("--workdir", "does not exist"))


def evaluate_no_checkpoint(data, tmp):
    (tmp / "w").mkdir()
    return Case(["--mode=evaluate"], tmp / "w", ("no checkpoint in", "fold_0"))


def evaluate_unknown_step(data, tmp):
    w = _fake_trained(tmp / "w")
    return Case(["--mode=evaluate", "--config.eval.checkpoint=7"], w, ("eval.checkpoint=7", "[0]"))


def evaluate_criterion_not_recorded(data, tmp):
    # Trained before f1_best_auc existed: an error, not silently the latest checkpoint.
    w = _fake_trained(tmp / "w", {"f1_acc": 1.5, "f1": 0.6, "accuracy": 0.9})
    args = ["--mode=evaluate", "--config.eval.criterion=f1_best_auc"]
    return Case(args, w, ("validation f1_best_auc", "accuracy, f1, f1_acc", "[0]"))


def evaluate_untrained_fold(data, tmp):
    w = _fake_trained(tmp / "w")
    args = ["--mode=evaluate", f"--config.data.manifest={data.manifest}", "--config.data.folds=2"]
    return Case(args, w, ("no checkpoint in", "fold_1", "data.folds=2"))


def evaluate_other_model(data, tmp):
    w = _fake_trained(tmp / "w")
    args = ["--mode=evaluate", "--config.model.modalities=bmode"]
    return Case(args, w, ("checkpoints/0", "model.modalities='both'", "'bmode'"))


def evaluate_other_network(data, tmp):
    # Same parameters, other region rules and attention: not silently another network.
    w = _fake_trained(tmp / "w")
    args = ["--mode=evaluate", "--config.faithful=True", "--config.model.scaled_attention=True"]
    culprits = ("checkpoints/0", "model.scaled_attention=False (the config has True)")
    return Case(args, w, (*culprits, "faithful=False (the config has True)"))


def evaluate_damaged_checkpoint(data, tmp):
    w = _fake_trained(tmp / "w")
    (w / "fold_0" / "checkpoints" / "0" / "meta" / "metadata").write_text("{garbage")
    return Case(["--mode=evaluate"], w, ("checkpoints/0", "unreadable"))


def predict_no_input(data, tmp):
    return Case(["--mode=predict"], _fake_trained(tmp / "w"), ("predict.input",))


def predict_no_checkpoint(data, tmp):
    (tmp / "w").mkdir()
    args = ["--mode=predict", f"--config.predict.input={data.manifest}"]
    return Case(args, tmp / "w", ("no trained folds", str(tmp / "w")))


def predict_empty_folder(data, tmp):
    (tmp / "in").mkdir()
    args = ["--mode=predict", f"--config.predict.input={tmp / 'in'}"]
    return Case(args, _fake_trained(tmp / "w"), ("predict.input", "is empty"))


def predict_non_images(data, tmp):
    for p in ("A", "B"):
        (tmp / "in" / p).mkdir(parents=True)
        (tmp / "in" / p / "gray.jpg").write_text("text, not an image")
        (tmp / "in" / p / "elastic.jpg").write_text("text, not an image")
    args = ["--mode=predict", f"--config.predict.input={tmp / 'in'}"]
    culprits = ("no usable patient", f"{tmp / 'in' / 'A' / 'gray.jpg'} unreadable")
    return Case(args, _fake_trained(tmp / "w"), culprits)


def predict_output_under_a_file(data, tmp):
    (tmp / "file").write_text("x")
    args = [
        "--mode=predict",
        f"--config.predict.input={data.manifest}",
        f"--config.predict.output={tmp / 'file' / 'p.csv'}",
    ]
    return Case(args, _fake_trained(tmp / "w"), ("predict.output", "is a file"))


def import_missing_file(data, tmp):
    args = ["--mode=import_torch", f"--config.import_path={tmp / 'net.pth'}"]
    return Case(args, tmp / "w", ("import_path", "net.pth does not exist"))


def import_not_a_checkpoint(data, tmp):
    (tmp / "net.pth").write_bytes(b"\x00\x01garbage" * 100)
    args = ["--mode=import_torch", f"--config.import_path={tmp / 'net.pth'}"]
    return Case(args, tmp / "w", ("import_path", "net.pth", "not a PyTorch checkpoint"))


def import_truncated_archive(data, tmp):
    with zipfile.ZipFile(tmp / "full.pth", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00." + bytes(4000))
        z.writestr("archive/data/0", np.random.default_rng(0).bytes(4000))
    full = (tmp / "full.pth").read_bytes()
    (tmp / "net.pth").write_bytes(full[: len(full) // 2])
    args = ["--mode=import_torch", f"--config.import_path={tmp / 'net.pth'}"]
    return Case(args, tmp / "w", ("import_path", "net.pth", "damaged"))


def import_wrong_keys(data, tmp):
    # A state_dict of the wrong network (keys of another model), as .npz (no torch needed).
    np.savez(tmp / "net.npz", **{"fc.0.weight": np.zeros((32, 6)), "fc.0.bias": np.zeros(32)})
    args = ["--mode=import_torch", f"--config.import_path={tmp / 'net.npz'}"]
    culprits = ("import_path", "net.npz", "missing key 'conv10.bias'", "unexpected", "310 of 310")
    return Case(args, tmp / "w", culprits)


def import_over_a_checkpoint(data, tmp):
    np.savez(tmp / "net.npz", x=np.zeros(1))
    args = ["--mode=import_torch", f"--config.import_path={tmp / 'net.npz'}"]
    return Case(args, _fake_trained(tmp / "w"), ("fold_0/checkpoints", "already holds"))


def _named(*fns) -> dict[str, Callable[[Data, pathlib.Path], Case]]:
    return {f.__name__: f for f in fns}


# Through run.py in a subprocess: at least one kind of each input and each mode.
CASES = _named(
    root_missing,
    manifest_wrong_columns,
    manifest_bad_labels,
    manifest_missing_image,
    corrupt_images,
    splits_name_unknown_patients,
    left_out_below_a_batch,
    synthetic_set_too_small,
    config_out_of_range("train.batch_size", 0, "train.batch_size must be at least 1, not 0"),
    batch_not_divisible_by_devices,
    resume_other_state,
    evaluate_no_checkpoint,
    evaluate_untrained_fold,
    predict_no_checkpoint,
    predict_empty_folder,
    predict_non_images,
    import_not_a_checkpoint,
    import_wrong_keys,
)
# More kinds, in process (a subprocess costs ~2 s of imports): the same mode functions run.py
# calls; a ValueError or OSError is what run.py prints verbatim as its `error:` line.
IN_PROCESS = _named(
    root_is_a_file,
    manifest_missing,
    manifest_not_text,
    corrupt_label_files,
    splits_overlap,
    too_few_for_a_batch,
    config_out_of_range("data.image_size", 36, "data.image_size must be a positive multiple"),
    config_out_of_range("data.augmentation_prob", 1.5, "data.augmentation_prob must be in"),
    config_out_of_range("rdo.buffer_size", 4, "rdo.buffer_size (4) must exceed"),
    workdir_is_a_file,
    evaluate_no_workdir,
    evaluate_unknown_step,
    evaluate_other_model,
    evaluate_other_network,
    evaluate_criterion_not_recorded,
    evaluate_damaged_checkpoint,
    predict_no_input,
    predict_output_under_a_file,
    import_truncated_archive,
    import_missing_file,
    import_over_a_checkpoint,
)


# ------------------------------------------------------------------------------------ runs


def _snapshot(path: pathlib.Path):
    """What a workdir holds (None: absent): every entry with its size and mtime."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {
        str(p.relative_to(path)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Data:
    root = tmp_path_factory.mktemp("famf_data")
    synthetic.generate(root, n_patients=12, image_size=48, seed=0)
    split: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    with (root / "manifest.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            split[row["split"]].append(row["patient_id"])
    assert all(len(v) >= 3 for v in split.values())
    return Data(root, split)


@pytest.fixture(scope="module")
def runs(request, data, tmp_path_factory):
    """Runs the selected cases, two at a time: {name: (case, process, workdir before)}."""
    selected = {
        item.callspec.params["name"]
        for item in request.session.items
        if item.module is request.module
        and getattr(item, "originalname", "") == "test_bad_input_gets_one_line_and_leaves_nothing"
    } or set(CASES)
    prepared = {}
    for name in sorted(selected):
        tmp = tmp_path_factory.mktemp(name)
        case = CASES[name](data, tmp)
        prepared[name] = (case, _snapshot(case.workdir))

    def run(name):
        case, _ = prepared[name]
        mode = [] if any(a.startswith("--mode") for a in case.args) else ["--mode=train"]
        args = (*SMOKE, f"--workdir={case.workdir}", *mode, *case.args)
        if not case.env:
            return run_py(*args)
        # run_py's command with this case's own environment (os.environ is shared by threads)
        cmd = [sys.executable, str(REPO / "run.py"), f"--compilation_cache={REPO / '.jax_cache'}"]
        env = dict(os.environ, JAX_LOG_COMPILES="1", **case.env)
        return subprocess.run(
            [*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )

    old = os.environ.get("JAX_LOG_COMPILES")
    os.environ["JAX_LOG_COMPILES"] = "1"  # the subprocesses log every compilation
    try:
        with ThreadPoolExecutor(2) as pool:
            procs = dict(zip(prepared, pool.map(run, prepared)))
    finally:
        if old is None:
            del os.environ["JAX_LOG_COMPILES"]
        else:
            os.environ["JAX_LOG_COMPILES"] = old
    return {n: (case, procs[n], before) for n, (case, before) in prepared.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_line_and_leaves_nothing(runs, name):
    case, proc, before = runs[name]
    assert_one_line_error(proc, *case.culprits)
    assert "Compiling" not in proc.stderr  # failed before any JAX compilation
    if not (case.workdir / "fold_0").exists():  # no checkpoint manager on a missing folder
        assert "read only" not in proc.stderr
    assert _snapshot(case.workdir) == before


def _in_process(case: Case):
    """Runs the case's mode function as run.py would, returning the exception it raised."""
    from famf_jax import evaluate, import_torch, predict, train

    cfg = famf_config.get_config("smoke")
    mode = "train"
    for arg in case.args:
        key, value = arg[2:].split("=", 1)
        if key == "mode":
            mode = value
            continue
        *path, field = key.removeprefix("config.").split(".")
        node = cfg[path[0]] if path else cfg
        kind = node.get_ref(field).get_type()  # as run.py's flag parsing casts it
        node[field] = value.lower() in ("1", "true") if kind is bool else kind(value)
    fn = {
        "train": train.train,
        "evaluate": evaluate.evaluate,
        "predict": predict.predict_folder,
        "import_torch": import_torch.import_checkpoint,
    }[mode]
    with pytest.raises((ValueError, OSError)) as err:  # run.py prints these verbatim
        fn(cfg, case.workdir)
    return " ".join(str(err.value).split())


@pytest.mark.parametrize("name", list(IN_PROCESS))
def test_bad_input_in_process(data, tmp_path, name):
    case = IN_PROCESS[name](data, tmp_path)
    before = _snapshot(case.workdir)
    text = _in_process(case)
    for c in case.culprits:
        assert c in text, f"{c!r} not in {text!r}"
    assert _snapshot(case.workdir) == before


def test_unwritable_workdir_fails_before_any_work(data, tmp_path, monkeypatch):
    # Root may write anywhere, so the permission is taken away through os.access.
    from famf_jax import experiment as exp

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(exp.os, "access", lambda p, m: real(p, m) and pathlib.Path(p) != locked)
    case = Case([f"--config.data.manifest={data.manifest}"], locked / "w", ())
    text = _in_process(case)
    assert text == f"--workdir {locked / 'w'}: {locked} is not writable"
    assert not (locked / "w").exists()


@pytest.mark.parametrize(
    "field, value",
    [
        ("data.center_crop", 0.0),
        ("data.crop", 1.5),
        ("data.rotation", -1),
        ("data.workers", -1),
        ("train.epochs", 0),
        ("train.learning_rate", float("nan")),
        ("train.momentum", 1.0),
        ("train.stream_loss", -0.5),
        ("train.stream_loss", float("inf")),
        ("train.lr_decay_rate", 0.0),
        ("train.eval_every", 0),
        ("rdo.alpha0", 1.5),
        ("rdo.epsilon_start", 2.0),
        ("rdo.target_every", 0),
        ("eval.batch_size", 0),
        ("eval.target_sensitivity", 0.0),
        ("eval.checkpoint", -1),
        ("eval.criterion", "auc"),
        ("model.modalities", "doppler"),
    ],
)
def test_every_config_range_is_checked(field, value):
    # The same check run.py's runs above go through (validate_config), over more fields.
    cfg = famf_config.get_config("smoke")
    section, key = field.split(".")
    cfg[section][key] = value
    with pytest.raises(ValueError, match=rf"^{field} "):
        experiment.validate_config(cfg)
    experiment.validate_config(famf_config.get_config("smoke"))
    experiment.validate_config(famf_config.get_config("paper"))
