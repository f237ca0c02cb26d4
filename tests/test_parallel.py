"""Data parallelism on 4 forced CPU devices through run.py, in subprocesses: each model's smoke
training at a global batch of 4, the one-line error for a batch that does not split, and the
modes that need no split batch. The update-equality check is in test_data_parallel.py, the
two-process run in test_two_processes.py (separate files: pytest-xdist spreads files)."""

import json

import pytest

from conftest import FOUR_DEVICES as FOUR
from conftest import assert_one_line_error, run_py


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
        ("configs/famf.py:smoke", "train.batch_size", "fold_0/train_summary.json", 6),
        ("configs/dmaf_brats2020.py:smoke", "data.batch_size", "train_summary.json", 1),
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
        "--config.train.epochs=1",
        env=FOUR,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "over 4 device(s) in 1 process(es): global batch 4, 1 per device" in proc.stderr
    result = json.loads((tmp_path / summary).read_text())
    assert result["last"]["step"] == steps  # 1 epoch of 24 (FAMF) and 4 (DMAF) cases


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
