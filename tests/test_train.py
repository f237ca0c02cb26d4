"""End-to-end FAMF training on generated data, resume equality, and the jitted step's purity."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import conftest
from common import metrics, optim
from configs import famf as famf_config
from conftest import REPO, latest_step, sigkill_once, with_overrides
from famf_jax import experiment, train


def smoke(**overrides):
    return with_overrides(famf_config.get_config("smoke"), overrides)


def run_py(*args):
    return conftest.run_py(*args, timeout=1800)


# 4 epochs of 6 steps (warm-up 1): enough to learn whatever the trajectory. After 2, the ranking
# below was a coin flip: ROC-AUC 0.25 to 0.99 over training seeds 0-2, XLA's default and the
# tests' settings and both AdamW step-count rules; after 4, 0.80 to 0.98 in the same six runs.
EPOCHS, STEPS_PER_EPOCH = 4, 6


def smoke_flags(root):
    """run.py flags of the smoke configuration with its generated data in <root>/data."""
    data = f"--config.data.synthetic_dir={root / 'data'}"
    return ["--config", "configs/famf.py:smoke", data, f"--config.train.epochs={EPOCHS}"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted smoke training run through run.py, shared by the tests below."""
    root = tmp_path_factory.mktemp("famf")
    r = run_py(*smoke_flags(root), "--mode=train", f"--workdir={root / 'straight'}")
    assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.mark.slow
def test_run_py_train_evaluate_predict(straight):
    work = straight / "straight"
    # the demo's criterion (training validated every checkpoint with all of them)
    base = [*smoke_flags(straight), f"--workdir={work}", "--config.eval.criterion=f1_best_auc"]
    r = run_py(*base, "--mode=evaluate")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test: accuracy" in r.stdout
    m = json.loads((work / "metrics.json").read_text())
    for k in ("roc_auc", "pr_auc", "f1", "sensitivity", "specificity", "g_mean"):
        assert k in m["test"]
    op = m["test"]["operating_point"]
    assert set(op) == {"threshold", "f1", "sensitivity", "specificity", "precision"}
    assert 0 <= m["test"]["ece_calibrated"] <= 1
    assert m["criterion"] == "f1_best_auc"
    rows = [json.loads(x) for x in (work / "fold_0" / "metrics.jsonl").read_text().splitlines()]
    _, best = max((r["valid/f1_best_auc"], r["step"]) for r in rows if "valid/f1_best_auc" in r)
    assert m["folds"][0]["step"] == best  # the highest, the later on ties
    calib = json.loads((work / "fold_0" / "calibration.json").read_text())
    assert calib["temperature"] > 0 and op["threshold"] == calib["threshold"]
    assert calib["step"] == m["folds"][0]["step"]
    assert "validation-chosen operating point" in (work / "report.md").read_text()
    assert (work / "report.md").exists() and (work / "figures" / "roc.png").exists()
    assert (work / "figures" / "rdo_trajectory.png").exists()
    steps = [r for r in rows if "alpha0" in r]
    assert len(steps) == EPOCHS * STEPS_PER_EPOCH  # 24 training patients / batch 4
    assert {"loss", "gamma", "reward", "dqn_loss"} <= set(steps[-1])
    assert sum("train/accuracy" in r for r in rows) == EPOCHS
    assert any("valid/roc_auc" in r for r in rows)
    r = run_py(
        *base, "--mode=predict", f"--config.predict.input={straight / 'data' / 'manifest.csv'}"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = (work / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("patient_id,prob_malignant,prob_calibrated,malignant")
    assert len(rows) == 41
    for row in rows[1:]:
        _, _, cal, decision, *_ = row.split(",")
        assert decision == str(int(float(cal) >= calib["threshold"]))
    # It learns, not only writes files: after 4 epochs the malignant cases (5 of 40, training
    # cases included) rank above the benign ones. Measured: ROC-AUC 0.94 trained, 0.30 for the
    # same network at initialisation (0.35 with MAF off); a random ranking reaches 0.75 about
    # 4 % of the time. (Validation and test hold one malignant case each: too few to tell.)
    probs, labels = zip(*[(float(r.split(",")[1]), int(r.split(",")[-1])) for r in rows[1:]])
    auc = metrics.roc_auc(np.array(labels), np.array(probs))
    assert auc >= 0.75, auc


@pytest.mark.slow
def test_folds_evaluate_and_predict_agree(straight):
    """Two folds: metrics.json's ensemble (the folds' calibrated probabilities and thresholds
    combined) is exactly what predict decides on the same test patients, its threshold the
    folds' mean in logit space; predict asked for another threshold rule leaves the calibrated
    columns empty rather than apply the best-F1 threshold."""
    from common import calibration

    work = straight / "two_folds"
    base = [*smoke_flags(straight), f"--workdir={work}", "--config.data.folds=2"]
    base[base.index(f"--config.train.epochs={EPOCHS}")] = "--config.train.epochs=1"
    for mode in ("train", "evaluate"):
        r = run_py(*base, f"--mode={mode}")
        assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((work / "metrics.json").read_text())
    thresholds = [f["calibration"]["threshold"] for f in m["folds"]]
    assert len(thresholds) == 2
    assert m["test"]["operating_point"]["threshold"] == calibration.mean_threshold(thresholds)
    ensemble = m["test"]["ensemble"]
    test_ids = {p["patient_id"] for p in m["folds"][0]["predictions"]}
    manifest = straight / "data" / "manifest.csv"
    r = run_py(*base, "--mode=predict", f"--config.predict.input={manifest}")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [x.split(",") for x in (work / "predictions.csv").read_text().splitlines()[1:]]
    rows = [x for x in rows if x[0] in test_ids]
    assert len(rows) == len(test_ids)
    y = np.array([int(x[-1]) for x in rows])
    decided = metrics.classification_metrics(y, np.array([float(x[3]) for x in rows]))
    assert decided["f1"] == ensemble["operating_point"]["f1"]
    assert decided["sensitivity"] == ensemble["operating_point"]["sensitivity"]
    assert metrics.roc_auc(y, np.array([float(x[2]) for x in rows])) == ensemble["roc_auc"]
    r = run_py(
        *base,
        "--mode=predict",
        f"--config.predict.input={manifest}",
        "--config.eval.operating_point=sensitivity",
    )
    assert r.returncode == 0 and "this run asks for sensitivity >= 0.95" in r.stderr
    row = (work / "predictions.csv").read_text().splitlines()[1].split(",")
    assert row[2] == row[3] == ""


def test_run_py_rejects_bad_input(tmp_path):
    r = run_py("--config", "configs/famf.py:smoke", "--mode=fly")
    assert r.returncode != 0 and "mode" in r.stderr
    r = run_py(
        "--config",
        "configs/famf.py:smoke",
        f"--workdir={tmp_path}",
        "--mode=train",
        f"--config.data.manifest={tmp_path / 'none.csv'}",
    )
    assert r.returncode != 0 and "none.csv does not exist" in r.stderr.strip().splitlines()[-1]
    r = run_py(
        "--config",
        "configs/famf.py:smoke",
        f"--workdir={tmp_path}",
        "--mode=train",
        "--config.train.optimizer=lbfgs",
    )
    last = r.stderr.strip().splitlines()[-1]
    assert (
        r.returncode != 0
        and last == "error: train.optimizer must be one of sgd, adamw, not 'lbfgs'"
    )
    assert not (tmp_path / "data").exists()  # failed before generating any data


def final_params(workdir):
    ckpt = experiment.checkpointer(workdir, 0, read_only=True)
    step = ckpt.latest_step()
    template, _ = experiment.create_state(smoke(), 1)
    state, meta = ckpt.restore(step, template)
    ckpt.close()
    return step, state


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(straight, tmp_path):
    # Issue 7: resume after SIGKILL ends bit-identical, for both models (DMAF's twin is in
    # test_dmaf_train.py). Both runs share the generated data (EPOCHS of 6 steps), the kill
    # once the epoch-1 checkpoint is written.
    args = [*smoke_flags(straight), "--mode=train"]
    killed = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "run.py"), f"--compilation_cache={REPO / '.jax_cache'}"]
    ckpts = killed / "fold_0" / "checkpoints"
    sigkill_once(
        [*cmd, *args, f"--workdir={killed}"], lambda: (ckpts / "6" / "commit_success.txt").exists()
    )
    total = EPOCHS * STEPS_PER_EPOCH
    assert latest_step(ckpts) < total, "killed too late to test a resume"
    r = run_py(*args, f"--workdir={killed}")
    assert r.returncode == 0, r.stderr[-3000:]
    s1, a = final_params(straight / "straight")
    s2, b = final_params(killed)
    assert s1 == s2 == total
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rows = [json.loads(x) for x in (killed / "fold_0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, total + 1))


@pytest.fixture(scope="module")
def warm_step():
    """The smoke config's jitted warm step and a batch, compiled once for the module."""
    cfg = smoke()
    _, tx = experiment.create_state(cfg, 5)
    step = train.jit_train_step(cfg, tx)
    shape = (cfg.train.batch_size, cfg.data.image_size, cfg.data.image_size, 3)
    key = jax.random.key(0)
    batch = {
        "bmode": jax.random.uniform(key, shape, minval=-1, maxval=1),
        "swe": jax.random.uniform(jax.random.fold_in(key, 1), shape, minval=-1, maxval=1),
        "label": jnp.array([0, 1, 0, 0], jnp.int32),
    }
    flags = jax.device_put((jnp.array(True), jnp.array(False)))
    return cfg, step, batch, flags


def test_train_step_has_no_host_transfer(warm_step):
    cfg, step, batch, flags = warm_step
    state, _ = experiment.create_state(cfg, 5)
    state, _ = step(state, batch, *flags, warm=True)  # compile outside the guard
    with jax.transfer_guard("disallow"):
        state, out = step(state, batch, *flags, warm=True)
        jax.block_until_ready(out)
    assert np.isfinite(float(out["loss"]))


def test_nonfinite_batch_is_left_out_of_every_state(warm_step):
    # Parameters, both batch-norm statistics and the optimiser with RDO stay as they were;
    # only the step counts on.
    cfg, step, batch, flags = warm_step
    state, _ = experiment.create_state(cfg, 5)
    state, out = step(state, batch, *flags, warm=True)
    before = jax.device_get(state)
    bad = dict(batch, swe=batch["swe"].at[2, 7, 9, 1].set(jnp.nan))
    state, out = step(state, bad, *flags, warm=True)
    assert int(out["skipped"]) == 1 and not np.asarray(out["counts"]).any()
    after = jax.device_get(state)
    assert int(after.step) == int(before.step) + 1
    for a, b in zip(jax.tree.leaves(before)[1:], jax.tree.leaves(after)[1:], strict=True):
        np.testing.assert_array_equal(a, b)
    state, out = step(state, batch, *flags, warm=True)
    assert int(out["skipped"]) == 0
    moved = jax.tree.leaves(jax.device_get(state.params))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.params), moved))


@pytest.mark.parametrize("faithful", [False, True])
@pytest.mark.parametrize("setting", [{}, {"model.fusion": False}, {"model.modalities": "bmode"}])
def test_rdo_activity_follows_the_epoch_not_the_fusion(faithful, setting):
    cfg = smoke(faithful=faithful, **{"train.warmup_epochs": 3}, **setting)
    fused = not setting
    first_active = 4 if faithful else 3  # the original's `epoch > warmup` (B15)
    for epoch in range(6):
        warm, active, new_epoch = train.step_flags(cfg, epoch * 5 + 1, 5)
        assert warm == (fused and epoch >= 3)
        assert active == (epoch >= first_active)
        assert not new_epoch
    assert train.step_flags(cfg, 10, 5)[2]


@pytest.mark.parametrize("setting", [{}, {"model.fusion": False}])
def test_validation_warm_is_the_last_trained_epochs(setting):
    # After epochs_done epochs the last one trained was epoch epochs_done - 1; its validation
    # and the checkpoint's `warm` must be what that epoch trained with.
    cfg = smoke(**{"train.warmup_epochs": 3}, **setting)
    spe = 5
    for epochs_done in range(1, 7):
        last_step = epochs_done * spe - 1
        assert train.warm_after(cfg, epochs_done) == train.step_flags(cfg, last_step, spe)[0]
    assert not train.warm_after(cfg, 3)  # after the last warm-up epoch: MAF never trained


def test_cold_step_leaves_maf_and_its_momentum_alone():
    # Before the warm-up ends MAF is not in the original's graph: PyTorch's SGD skips it (no
    # L2 decay, no momentum); every other parameter moves.
    cfg = smoke(**{"train.optimizer": "sgd", "train.weight_decay": 0.1})  # the paper's SGD
    state, tx = experiment.create_state(cfg, 5)
    before = jax.tree.map(np.asarray, state.params)
    step = train.jit_train_step(cfg, tx)
    shape = (cfg.train.batch_size, cfg.data.image_size, cfg.data.image_size, 3)
    key = jax.random.key(1)
    batch = {
        "bmode": jax.random.uniform(key, shape, minval=-1, maxval=1),
        "swe": jax.random.uniform(jax.random.fold_in(key, 1), shape, minval=-1, maxval=1),
        "label": jnp.array([0, 1, 0, 1], jnp.int32),
    }
    state, _ = step(state, batch, jnp.array(False), jnp.array(True), warm=False)
    after = jax.tree.map(np.asarray, state.params)
    for a, b in zip(jax.tree.leaves(before["muatt_1"]), jax.tree.leaves(after["muatt_1"])):
        np.testing.assert_array_equal(a, b)
    trace = optim.find_state(state.opt_state, optax.TraceState).trace
    assert all(not np.asarray(t).any() for t in jax.tree.leaves(trace["muatt_1"]))
    moved = [
        not np.array_equal(a, b)
        for k in before
        if k != "muatt_1"
        for a, b in zip(jax.tree.leaves(before[k]), jax.tree.leaves(after[k]))
    ]
    assert all(moved)
