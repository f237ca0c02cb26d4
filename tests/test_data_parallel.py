"""A data-parallel and an FSDP training step on 4 forced CPU devices give one device's update,
and evaluation split over the devices equals one device's (tests/scripts/data_parallel_check.py
in a subprocess: the device count is fixed when JAX starts)."""

import json
import subprocess
import sys

import pytest

from conftest import FOUR_DEVICES as FOUR
from conftest import REPO


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
