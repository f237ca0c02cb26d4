"""A DMAF run over 2 processes on localhost (jax.distributed, gloo collectives): different rows
per process, a SIGTERM to one stopping both at one checkpoint, equal parameters after the
resume, and a single process evaluating their checkpoint."""

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
from conftest import REPO, dmaf_shallow_flags, run_py


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
