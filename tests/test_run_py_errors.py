"""run.py's own bad inputs (flags, config files, modes): one `error:` line, no traceback,
nothing written. The data and checkpoint checks of each model are in test_bad_inputs_*.py."""

import pytest

from conftest import assert_one_line_error, run_py


@pytest.mark.parametrize(
    "args, culprits",
    [
        (
            ["--config=configs/famf.py:tiny"],
            ("configs/famf.py:tiny", "unknown FAMF config variant"),
        ),
        (["--config=configs/nope.py"], ("configs/nope.py", "No such file")),
        (["--config=configs/famf.py:smoke", "--mode=nope"], ("--mode=nope", "should be one of")),
        (["--config=configs/famf.py:smoke", "--config.train.nope=1"], ("--config.train.nope",)),
        (["--config=configs/famf.py:smoke", "--config.train.epochs=x"], ("train.epochs", "'x'")),
        (
            ["--config=configs/famf.py:smoke", "--mode=preprocess"],
            ("FAMF-Net has no --mode=preprocess",),
        ),
        (
            ["--config=configs/dmaf_brats2020.py:smoke", "--mode=import_torch"],
            ("--mode=import_torch",),
        ),
        (["--config=configs/famf.py:smoke", "extra"], ("unexpected arguments: extra",)),
    ],
    ids=["variant", "config-file", "mode", "field", "value", "famf-mode", "dmaf-mode", "argument"],
)
def test_run_py_rejects_in_one_line(tmp_path, args, culprits):
    work = tmp_path / "w"
    proc = run_py(*args, f"--workdir={work}", timeout=120)
    assert_one_line_error(proc, *culprits)
    assert not work.exists()
