"""Data parallelism on 4 forced CPU devices, in a subprocess (the device count is fixed when
JAX starts). The step-equality check (tests/scripts/data_parallel_check.py) and the run over 2
processes (tests/scripts/two_process_train.py) are not part of the suite yet: on this 2-core
machine their compilations did not finish in the time a test may take (issue 9)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, assert_one_line_error

FOUR = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
    JAX_DISABLE_MOST_OPTIMIZATIONS="1",
)


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
