"""Data parallelism on 4 forced CPU devices, and a DMAF run over 2 processes on localhost, in
subprocesses (the device count is fixed when JAX starts). Compiled with XLA's optimisations
off (conftest sets it for every subprocess)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from common.logging import read_jsonl
from conftest import REPO, assert_one_line_error, dmaf_shallow_flags, run_py

FOUR = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
)


@pytest.mark.parametrize(
    "config, field",
    [
        ("configs/famf.py:smoke", "train.batch_size"),
        ("configs/dmaf_brats2020.py:smoke", "data.batch_size"),
    ],
)
def test_a_global_batch_that_does_not_divide_by_the_devices_stops_at_once(tmp_path, config, field):
    proc = run_py(
        f"--config={config}", f"--workdir={tmp_path / 'w'}", f"--config.{field}=3", env=FOUR
    )
    assert_one_line_error(proc, field, "3", "4")
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, field, summary, steps",
    [
        ("configs/famf.py:smoke", "train.batch_size", "fold_0/train_summary.json", 12),
        ("configs/dmaf_brats2020.py:smoke", "data.batch_size", "train_summary.json", 2),
    ],
)
def test_smoke_trains_on_four_devices_at_a_global_batch_of_four(
    tmp_path, config, field, summary, steps
):
    proc = run_py(
        f"--config={config}",
        f"--workdir={tmp_path}",
        f"--config.{field}=4",
        "--mode=train",
        env=FOUR,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "over 4 device(s) in 1 process(es): global batch 4, 1 per device" in proc.stderr
    result = json.loads((tmp_path / summary).read_text())
    assert result["last"]["step"] == steps  # 2 epochs of 24 (FAMF) and 4 (DMAF) cases


@pytest.mark.slow
def test_data_parallel_and_fsdp_equal_one_device_in_training_and_evaluation(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests/scripts/data_parallel_check.py"), str(tmp_path)],
        cwd=REPO,
        env=FOUR,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for model in ("famf", "dmaf"):
        r = out[model]
        # Same global batch, same update (relative to the largest single-device update) within
        # float32 rounding: no further from one device than one device is from itself with
        # each input moved by one ulp (a gradient from part of the batch, or summed instead of
        # averaged, is off by tens of percent).
        tolerance = max(1e-4, 3 * r["perturbed"])
        assert r["update"] > 0 and r["dp"] <= tolerance and r["fsdp"] <= tolerance, (model, r)
        assert r["fsdp_sharded"] > 0, (model, r)  # FSDP did split something
    # Evaluation: batches of 3 padded to 4 and split over the devices, one compilation each.
    assert out["dmaf_eval"]["windows_per_call"] == [4, 3]
    assert out["dmaf_eval"]["diff"] <= 1e-5, out["dmaf_eval"]
    assert out["dmaf_eval"]["compilations"]["encode"] == 1
    assert out["famf_eval"]["n"] == 5 and out["famf_eval"]["diff"] <= 1e-5, out["famf_eval"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_pair(tmp_path, flags, env, port, tag):
    """Both processes of a run (tests/scripts/two_process_train.py around run.py), logging to
    <tmp_path>/<tag><pid>.log and recording to <tag><pid>.json."""
    script = str(REPO / "tests/scripts/two_process_train.py")
    procs = []
    for pid in range(2):
        penv = dict(
            env,
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
        )
        log = open(tmp_path / f"{tag}{pid}.log", "w")
        cmd = [sys.executable, script, str(tmp_path / f"{tag}{pid}.json"), *flags, "--mode=train"]
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=penv, stdout=log, stderr=log), log))
    return procs


def wait_pair(tmp_path, procs, tag) -> tuple[list[int], list[str]]:
    try:
        codes = [p.wait(timeout=1800) for p, _ in procs]
    finally:
        for p, log in procs:
            p.kill()
            log.close()
    return codes, [(tmp_path / f"{tag}{i}.log").read_text()[-3000:] for i in range(2)]


@pytest.mark.slow
def test_two_processes_train_on_different_rows_to_equal_parameters_and_one_evaluates(tmp_path):
    """Two run.py processes (one CPU device each, gloo collectives) train the DMAF smoke model
    (three levels) at a global batch of 2, each reading its own row of every batch. SIGTERM to
    one of them stops both at the same step with one checkpoint; resumed, both end with the
    same parameters, and their checkpoint is restored and evaluated by a single process."""
    from dmaf_jax import experiment, synthetic

    synthetic.write_brats(tmp_path / "raw", 6, (40, 44, 36), seed=1037)
    flags = [
        "--config=configs/dmaf_brats2020.py:smoke",
        f"--workdir={tmp_path / 'run'}",
        f"--config.data.raw_dir={tmp_path / 'raw'}",
        f"--config.data.root={tmp_path / 'pre'}",
        "--config.train.epochs=3",  # 6 steps
        "--config.train.log_every=1",
        f"--compilation_cache={REPO / '.jax_cache'}",  # the resumed pair loads the first's
        *dmaf_shallow_flags(),  # two compilations at once: the five-level one needs 6.5 GB each
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)

    # Process 0 preprocesses while process 1 waits (parallel.main_first). SIGTERM to process 1
    # alone once a step is logged: JAX's preemption service stops both.
    procs = start_pair(tmp_path, flags, env, free_port(), "first")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 1500
    while time.time() < deadline and procs[1][0].poll() is None:
        if metrics.exists() and '"loss"' in metrics.read_text():
            procs[1][0].send_signal(signal.SIGTERM)
            break
        time.sleep(0.1)
    codes, logs = wait_pair(tmp_path, procs, "first")
    assert codes == [128 + signal.SIGTERM] * 2, logs
    ckpt = experiment.checkpointer(tmp_path / "run", read_only=True)
    stopped = ckpt.latest_step()
    assert 0 < stopped < 6, logs
    if stopped % 2:  # mid-epoch: the signal's own checkpoint
        assert ckpt.meta(stopped)["interrupted"] == "SIGTERM"
    ckpt.close()
    for log in logs:
        assert f"after step {stopped}: checkpoint saved" in log, log

    codes, logs = wait_pair(tmp_path, start_pair(tmp_path, flags, env, free_port(), "p"), "p")
    assert codes == [0, 0], logs
    a, b = (json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2))
    assert a["devices"] == b["devices"] == 2
    assert len(a["read"]) == len(b["read"]) == 6 - stopped
    # One row of each global batch per process, different cases in every step.
    for ra, rb in zip(a["read"], b["read"]):
        assert len(ra) == len(rb) == 1 and set(ra).isdisjoint(rb), (a["read"], b["read"])
    assert a["checksum"] == b["checksum"]
    steps = [r["step"] for r in read_jsonl(metrics) if "loss" in r]
    assert steps == list(range(1, 7)), "each step logged once, by process 0"

    ev = run_py(
        *flags, "--mode=evaluate", "--config.eval.combinations=flair", timeout=1200, env=env
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(m["combinations"]) == ["flair"] and np.isfinite(m["average"]["wt"]["dice"])


def test_only_training_needs_a_batch_that_divides_by_the_devices(monkeypatch):
    # Evaluation, prediction, preprocessing and import pad their own batches: a training batch
    # size that does not split over the devices must not stop them (DMAF's paper batch is 1).
    import jax

    from configs import dmaf_brats2020
    from configs import famf as famf_config
    from dmaf_jax import dataset as dmaf_dataset
    from famf_jax import experiment as famf_experiment

    monkeypatch.setattr(jax, "device_count", lambda: 2)
    famf = famf_config.get_config("smoke")
    famf.train.batch_size = 3
    famf_experiment.validate_config(famf)  # shared by every FAMF mode
    dmaf = dmaf_brats2020.get_config("paper")
    assert dmaf.data.batch_size == 1
    dmaf_dataset.validate_config(dmaf)  # shared by every DMAF mode
