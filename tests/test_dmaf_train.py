"""DMAF-Net training end to end through run.py: smoke runs of both datasets, the training
log (every loss term, betas, factors and gaps per modality), the DTMS plot, and a run killed
with SIGKILL that resumes to the same parameters, bit for bit, as an uninterrupted one."""

import json
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from common.logging import read_jsonl
from conftest import REPO, latest_step, signal_once

CONFIGS = {
    "brats2020": "configs/dmaf_brats2020.py:smoke",
    "myops2020": "configs/dmaf_myops2020.py:smoke",
}


def command(config, workdir, *overrides, mode="train"):
    return [
        sys.executable,
        str(REPO / "run.py"),
        f"--config={config}",
        f"--workdir={workdir}",
        f"--mode={mode}",
        f"--compilation_cache={REPO / '.jax_cache'}",
        *overrides,
    ]


def run(config, workdir, *overrides, mode="train"):
    out = subprocess.run(
        command(config, workdir, *overrides, mode=mode),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def final_params(workdir):
    from dmaf_jax import experiment

    ckpt = experiment.checkpointer(workdir, read_only=True)
    step = ckpt.latest_step()
    meta = ckpt.meta(step)
    ckpt.close()
    from ml_collections import ConfigDict

    cfg = ConfigDict(meta["config"])
    cfg.eval.checkpoint = step
    params, _ = experiment.restore_params(cfg, workdir)
    return step, params


def brats_flags(root):
    """The BraTS smoke run's flags with its data under <root>/data (raw cases written by
    `brats_straight`, preprocessed by the first run), a log row flushed per step."""
    return [f"--config.data.root={root / 'data' / 'pre'}", "--config.train.log_every=1"]


@pytest.fixture(scope="module")
def brats_straight(tmp_path_factory):
    """(root, output) of one uninterrupted BraTS smoke run in <root>/straight: 2 epochs of 2
    steps, shared by the log test and the kill test below."""
    from dmaf_jax import synthetic

    root = tmp_path_factory.mktemp("brats")
    synthetic.write_brats(root / "data" / "raw", 6, (40, 44, 36), seed=1037)
    raw = f"--config.data.raw_dir={root / 'data' / 'raw'}"
    return root, run(CONFIGS["brats2020"], root / "straight", *brats_flags(root), raw)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", sorted(CONFIGS))
def test_run_py_trains_logs_and_plots(tmp_path, dataset, request):
    spec_modalities = {
        "brats2020": ("flair", "t1ce", "t1", "t2"),
        "myops2020": ("bssfp", "lge", "t2"),
    }
    if dataset == "brats2020":
        root, out = request.getfixturevalue("brats_straight")
        workdir = root / "straight"
    else:
        workdir = tmp_path
        out = run(CONFIGS[dataset], workdir)
    summary = json.loads((workdir / "train_summary.json").read_text())
    n = summary["last"]["step"]  # 2 epochs: BraTS 4 steps, MyoPS 8 (more slices)
    assert n == {"brats2020": 4, "myops2020": 8}[dataset]
    assert f"last checkpoint: step {n}" in out.stdout
    rows = read_jsonl(workdir / "metrics.jsonl")
    step_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in step_rows] == list(range(1, n + 1))
    for key in ("loss/fuse", "loss/ds", "loss/sep", "loss/cov", "loss/att", "loss/proto"):
        assert all(np.isfinite(r[key]) for r in step_rows), key
    for name in ("beta", "factor", "gap", "rho"):
        for m in spec_modalities[dataset]:
            assert f"{name}/{m}" in step_rows[-1]
    assert (workdir / "dtms.png").stat().st_size > 0
    if dataset == "brats2020":  # a validation split: Dice logged and the best chosen by it
        assert any("valid/dice" in r for r in rows)
        assert summary["best"]["dice"]["step"] in (2, 4)
    else:  # MyoPS's protocol has no validation split: the last epoch is used
        assert not any("valid/dice" in r for r in rows)


def rows_after(workdir, step: int):
    """ready(): metrics.jsonl holds a training row beyond `step` written by the process started
    now (a killed run's rows stay until the next one drops them)."""
    start = time.time()

    def ready() -> bool:
        try:
            rows = read_jsonl(workdir / "metrics.jsonl")
            return any("loss" in r and r["step"] > step and r["time"] > start for r in rows)
        except (OSError, ValueError):
            return False

    return ready


@pytest.mark.slow
def test_sigkill_and_sigterm_at_random_steps_resume_bit_identical(brats_straight, tmp_path):
    """SIGKILL at a random step, a restart, SIGTERM (to the whole process group, Grain worker
    included) at a random later step, a restart to the end: the parameters equal an
    uninterrupted run's bit for bit, every step is logged once, and no process outlives a
    kill (signal_once checks the session)."""
    config = CONFIGS["brats2020"]
    # Both lineages read the same preprocessed data (prepared by the straight run), with the
    # same schedule (2 epochs of 2 steps), so all share one compiled step.
    root, _ = brats_straight
    overrides = brats_flags(root)

    rng = random.Random()
    killed = tmp_path / "killed"
    ckpts = killed / "checkpoints"
    # One Grain worker process in this lineage: its batches equal the in-process ones.
    cmd = command(config, killed, *overrides, "--config.data.workers=1")
    k1 = rng.randrange(0, 2)  # killed after step k1 + 1 is logged, during step 2 or later
    signal_once(cmd, rows_after(killed, k1), signal.SIGKILL)
    resumed = latest_step(ckpts) if any(ckpts.glob("[0-9]*")) else 0
    assert resumed < 4, f"SIGKILL after step {k1 + 1} came too late to test a resume"

    k2 = rng.randrange(resumed, 3)
    code = signal_once(cmd, rows_after(killed, k2), signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, f"SIGTERM after step {k2 + 1}: exit {code}"
    from dmaf_jax import experiment

    ckpt = experiment.checkpointer(killed, read_only=True)
    stopped = ckpt.latest_step()
    assert stopped > k2
    if stopped % 2:  # mid-epoch: the signal's own checkpoint (at an epoch's end, that epoch's)
        assert ckpt.meta(stopped)["interrupted"] == "SIGTERM"
    ckpt.close()

    run(config, killed, *overrides, "--config.data.workers=1")  # a resume keeps the pipeline
    s1, a = final_params(root / "straight")
    s2, b = final_params(killed)
    assert s1 == s2 == 4, (k1, k2)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{k1=} {k2=}")
    steps = [r["step"] for r in read_jsonl(killed / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 5)), "steps re-run after a kill are logged once"
