"""Data parallelism on 4 forced CPU devices, and a DMAF run over 2 processes on localhost, in
subprocesses (the device count is fixed when JAX starts). Compiled with XLA's optimisations
off (conftest sets it for every subprocess)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

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


@pytest.mark.slow
def test_two_processes_train_on_different_rows_to_equal_parameters_and_one_evaluates(tmp_path):
    """Two run.py processes (one CPU device each, gloo collectives) train the DMAF smoke model
    (three levels) at a global batch of 2; each reads its own row of every batch, both end with
    the same parameters, and their checkpoint is restored and evaluated by a single process."""
    from dmaf_jax import synthetic

    synthetic.write_brats(tmp_path / "raw", 6, (40, 44, 36), seed=1037)
    flags = [
        "--config=configs/dmaf_brats2020.py:smoke",
        f"--workdir={tmp_path / 'run'}",
        f"--config.data.raw_dir={tmp_path / 'raw'}",
        f"--config.data.root={tmp_path / 'pre'}",
        "--config.train.epochs=1",
        "--compilation_cache=",
        *dmaf_shallow_flags(),  # two compilations at once: the five-level one needs 6.5 GB each
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    pre = run_py(*flags, "--mode=preprocess", timeout=600, env=env)
    assert pre.returncode == 0, pre.stderr[-3000:]  # both processes read these cases

    port = free_port()
    script = str(REPO / "tests/scripts/two_process_train.py")
    procs = []
    for pid in range(2):
        penv = dict(
            env,
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
        )
        log = open(tmp_path / f"process{pid}.log", "w")
        cmd = [sys.executable, script, str(tmp_path / f"p{pid}.json"), *flags, "--mode=train"]
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=penv, stdout=log, stderr=log), log))
    try:
        codes = [p.wait(timeout=1800) for p, _ in procs]
    finally:
        for p, log in procs:
            p.kill()
            log.close()
    logs = [(tmp_path / f"process{i}.log").read_text()[-3000:] for i in range(2)]
    assert codes == [0, 0], logs

    a, b = (json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2))
    assert a["devices"] == b["devices"] == 2
    assert len(a["read"]) == len(b["read"]) > 0
    # One row of each global batch per process, different cases in every step.
    for ra, rb in zip(a["read"], b["read"]):
        assert len(ra) == len(rb) == 1 and set(ra).isdisjoint(rb), (a["read"], b["read"])
    assert a["checksum"] == b["checksum"]

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
