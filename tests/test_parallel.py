"""Data parallelism on 4 forced CPU devices, and a run over 2 processes on localhost.

Each case runs in a subprocess: the device count is fixed when JAX starts."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, assert_one_line_error

FOUR = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
    # Compilation dominates; XLA's cheaper pipeline halves it (both sides of each comparison).
    JAX_DISABLE_MOST_OPTIMIZATIONS="1",
)


@pytest.mark.slow
def test_data_parallel_and_fsdp_steps_equal_the_single_device_step():
    out = subprocess.run(
        [sys.executable, str(REPO / "tests/scripts/data_parallel_check.py")],
        cwd=REPO,
        env=FOUR,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for model, r in result.items():
        # Two steps; the sums over the batch run in another order across 4 devices.
        assert r["dp"] <= TOLERANCE * r["scale"], (model, r)
        assert r["fsdp"] <= TOLERANCE * r["scale"], (model, r)
        assert r["fsdp_sharded_leaves"] > 0, (model, r)  # FSDP did split something


TOLERANCE = 1e-5


@pytest.mark.parametrize(
    "config, field",
    [
        ("configs/famf.py:smoke", "train.batch_size"),
        ("configs/dmaf_brats2020.py:smoke", "data.batch_size"),
    ],
)
def test_a_global_batch_that_does_not_divide_by_the_devices_stops_at_once(tmp_path, config, field):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "run.py"),
            f"--config={config}",
            f"--workdir={tmp_path / 'w'}",
            f"--config.{field}=3",
        ],
        cwd=REPO,
        env=FOUR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_line_error(proc, field, "3", "4")
    assert not (tmp_path / "w").exists()
