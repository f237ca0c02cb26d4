"""Checkpointer: resume skips checkpoint folders left half-written or damaged; retention
keeps the latest and the best by the checkpoints' own meta, across restarts."""

import logging
import os
import pathlib
import shutil

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from common.checkpoint import Checkpointer

TMP = ocp.path.step.TMP_DIR_SUFFIX


def state_at(step: int) -> dict:
    """A tiny pytree whose every leaf depends on `step`."""
    return {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3) * (step + 1),
        "opt": {"mu": np.full((4,), step, np.float32), "count": np.array(step, np.int32)},
    }


def template() -> dict:
    return state_at(0)


def iterator():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def save_steps(ckpt: Checkpointer, steps, *, data: bool = True) -> None:
    """Saves each step with the data position after `step` elements (next element: `step`)."""
    for step in steps:
        it = iterator()
        for _ in range(step):
            next(it)
        meta = {"epoch": step, "metrics": {"dice": step / 10}}
        ckpt.save(
            step,
            state_at(step),
            meta,
            data_iterator=it if data else None,
            metrics=meta["metrics"],
        )


def assert_tree_equal(a, b):
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], dict):
            assert_tree_equal(a[k], b[k])
        else:
            np.testing.assert_array_equal(np.asarray(a[k]), b[k])
            assert np.asarray(a[k]).dtype == b[k].dtype


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def truncate(paths) -> None:
    paths = [p for p in paths if p.is_file() and p.stat().st_size > 1]
    assert paths
    for p in paths:
        os.truncate(p, p.stat().st_size // 2)


@pytest.fixture
def caplog_absl(caplog):
    with caplog.at_level(logging.WARNING, logger="absl"):
        yield caplog


def test_normal_resume_restores_the_latest_exactly(tmp_path, caplog_absl):
    ckpt = Checkpointer(tmp_path, best_metrics=("dice",), keep_latest=3)
    save_steps(ckpt, [1, 2, 3])
    ckpt.close()
    caplog_absl.clear()
    ckpt = Checkpointer(tmp_path, best_metrics=("dice",), keep_latest=3)
    it = iterator()
    step, state, meta = ckpt.restore_latest(template(), data_iterator=it)
    assert step == 3
    assert_tree_equal(state, state_at(3))
    assert meta == {"epoch": 3, "metrics": {"dice": 0.3}}
    assert next(it) == 3  # the saved data position
    assert not [w for w in warnings_of(caplog_absl) if "incomplete" in w or "half" in w]
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]
    ckpt.close()


def test_no_checkpoint_gives_none_and_leaves_the_iterator(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt")
    it = iterator()
    next(it)
    assert ckpt.restore_latest(template(), data_iterator=it) is None
    assert next(it) == 1
    ckpt.close()


def kill_during_save(directory: pathlib.Path, step: int, monkeypatch) -> None:
    """Saves `step` as a killed process would leave it: every file written, the final
    rename (orbax's commit) never done."""
    ckpt = Checkpointer(directory, best_metrics=("dice",), keep_latest=3)

    class Killed(BaseException):
        pass

    async def killed(self):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", killed)
        with pytest.raises(Killed):
            save_steps(ckpt, [step])


def test_folder_of_a_killed_save_is_ignored_and_removed(tmp_path, monkeypatch, caplog_absl):
    ckpt = Checkpointer(tmp_path, best_metrics=("dice",), keep_latest=3)
    save_steps(ckpt, [1, 2])
    ckpt.close()
    kill_during_save(tmp_path, 3, monkeypatch)
    (tmp,) = [p for p in tmp_path.iterdir() if p.name.startswith("3")]
    assert TMP in tmp.name and (tmp / "_CHECKPOINT_METADATA").is_file()

    # read-only (evaluation): ignored, left alone
    caplog_absl.clear()
    ro = Checkpointer(tmp_path, read_only=True)
    assert any(str(tmp) in w and "ignored" in w for w in warnings_of(caplog_absl))
    assert ro.steps() == [1, 2] and tmp.is_dir()
    assert ro.restore_latest(template())[0] == 2
    ro.close()

    caplog_absl.clear()
    ckpt = Checkpointer(tmp_path, best_metrics=("dice",), keep_latest=3)
    it = iterator()
    step, state, meta = ckpt.restore_latest(template(), data_iterator=it)
    assert any(str(tmp) in w and "removed" in w for w in warnings_of(caplog_absl))
    assert step == 2 and meta["epoch"] == 2
    assert_tree_equal(state, state_at(2))
    assert next(it) == 2
    save_steps(ckpt, [4])  # not the killed step: orbax's save would not clear that folder
    assert ckpt.steps() == [1, 2, 4]
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "4"]
    assert_tree_equal(ckpt.restore_latest(template())[1], state_at(4))
    ckpt.close()


DAMAGE = {
    "state data truncated": lambda d: truncate(list((d / "state" / "d").iterdir())),
    "all state files truncated": lambda d: truncate(list((d / "state").rglob("*"))),
    "state folder removed": lambda d: shutil.rmtree(d / "state"),
    "meta truncated": lambda d: truncate([d / "meta" / "metadata"]),
    "data folder removed": lambda d: shutil.rmtree(d / "data"),
    "data position truncated": lambda d: truncate(list((d / "data").iterdir())),
    "emptied": lambda d: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in d.iterdir()],
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_step_is_set_aside_and_the_previous_restored(tmp_path, damage, caplog_absl):
    ckpt = Checkpointer(tmp_path, best_metrics=("dice",), keep_latest=3)
    save_steps(ckpt, [1, 2, 3])
    ckpt.close()
    DAMAGE[damage](tmp_path / "3")
    caplog_absl.clear()
    ckpt = Checkpointer(tmp_path, best_metrics=("dice",), keep_latest=3)
    assert ckpt.steps() == [1, 2, 3]  # orbax still lists it
    it = iterator()
    step, state, meta = ckpt.restore_latest(template(), data_iterator=it)
    assert step == 2 and meta == {"epoch": 2, "metrics": {"dice": 0.2}}
    assert_tree_equal(state, state_at(2))
    assert next(it) == 2
    warned = [w for w in warnings_of(caplog_absl) if f"folder {tmp_path / '3'} " in w]
    assert len(warned) == 1 and "incomplete" in warned[0] and "3.incomplete" in warned[0]
    assert (tmp_path / "3.incomplete").is_dir()  # kept for the user, out of orbax's sight
    assert not (tmp_path / "3").exists()
    assert ckpt.steps() == [1, 2] and ckpt.latest_step() == 2
    assert ckpt.best_step("dice") == 2

    save_steps(ckpt, [3, 4])  # the same step number again, then retention
    assert ckpt.steps() == [2, 3, 4]
    assert (tmp_path / "3.incomplete").is_dir()
    step, state, _ = ckpt.restore_latest(template())
    assert step == 4
    assert_tree_equal(state, state_at(4))
    ckpt.close()


def test_falls_back_step_by_step_and_keeps_every_damaged_folder(tmp_path, caplog_absl):
    ckpt = Checkpointer(tmp_path, keep_latest=3)
    save_steps(ckpt, [1], data=False)  # an imported checkpoint: no data position
    save_steps(ckpt, [2, 3])
    ckpt.close()
    (tmp_path / "3.incomplete").mkdir()  # left by an earlier resume
    for step in (2, 3):
        truncate(list((tmp_path / str(step) / "state" / "d").iterdir()))
    ckpt = Checkpointer(tmp_path, keep_latest=3)
    it = iterator()
    next(it)
    step, state, _ = ckpt.restore_latest(template(), data_iterator=it)
    assert step == 1
    assert_tree_equal(state, state_at(1))
    assert next(it) == 1  # where it was: step 1 holds no position, and 2's restore failed
    assert sorted(os.listdir(tmp_path)) == ["1", "2.incomplete", "3.incomplete", "3.incomplete-2"]
    for name in ("2", "3"):
        assert any(str(tmp_path / name) in w for w in warnings_of(caplog_absl))
    ckpt.close()


def test_read_only_skips_a_damaged_step_without_touching_it(tmp_path, caplog_absl):
    ckpt = Checkpointer(tmp_path, best_metrics=("dice",), keep_latest=3)
    save_steps(ckpt, [1, 2, 3])
    ckpt.close()
    truncate([tmp_path / "3" / "meta" / "metadata"])
    ro = Checkpointer(tmp_path, best_metrics=("dice",), read_only=True)
    assert ro.best_step("dice") == 2  # 3's meta cannot be read: not a candidate
    assert any(str(tmp_path / "3") in w for w in warnings_of(caplog_absl))
    assert ro.restore_latest(template())[0] == 2
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]
    ro.close()


def test_a_complete_checkpoint_that_does_not_fit_the_template_raises(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_latest=3)
    save_steps(ckpt, [1, 2])
    wrong = {**template(), "extra": np.zeros(1, np.float32)}
    with pytest.raises(ValueError, match="does not fit this run's state.*tree structures do not"):
        ckpt.restore_latest(wrong)
    assert ckpt.steps() == [1, 2]  # nothing set aside: not damage
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
    ckpt.close()


NAN = float("nan")


def save_metrics(ckpt: Checkpointer, step: int, metrics: dict | None) -> None:
    """Saves `step` as the training loop does: the metrics in the meta and given to `save`."""
    ckpt.save(step, state_at(step), {"epoch": step, "metrics": metrics}, metrics=metrics)


def assert_retained(ckpt: Checkpointer, directory: pathlib.Path, steps: list[int]) -> None:
    assert ckpt.steps() == steps
    assert sorted(os.listdir(directory), key=int) == [str(s) for s in steps]  # gone from disk


def test_resume_keeps_the_best_saved_before_it(tmp_path):
    ckpt = Checkpointer(tmp_path, best_metrics=("dice",), keep_latest=1)
    save_metrics(ckpt, 1, {"dice": 0.9})
    save_metrics(ckpt, 2, {"dice": 0.1})
    assert_retained(ckpt, tmp_path, [1, 2])
    ckpt.close()
    ckpt = Checkpointer(tmp_path, best_metrics=("dice",), keep_latest=1)
    save_metrics(ckpt, 3, {"dice": 0.2})
    assert_retained(ckpt, tmp_path, [1, 3])
    assert ckpt.best_step("dice") == 1
    state, meta = ckpt.restore(1, template())
    assert_tree_equal(state, state_at(1))
    assert meta == {"epoch": 1, "metrics": {"dice": 0.9}}
    ckpt.close()


# (step, dice, sens, reopen after the save, retained after the save), worked out by hand with
# keep_latest=2: the 2 highest steps, plus for each metric the highest value among the steps
# retained before (the later on ties; NaN and a None `metrics` never best).
HISTORY = [
    (1, 0.5, 0.3, False, [1]),
    (2, 0.7, 0.1, True, [1, 2]),  # dice best 2, sens best 1
    (3, 0.2, 0.9, False, [2, 3]),  # 1 was best in neither any more
    (4, 0.7, NAN, True, [3, 4]),  # dice ties with 2: the later 4; sens NaN: 3 stays best
    (5, None, None, True, [3, 4, 5]),  # an interrupted save: no metrics at all
    (6, 0.1, 0.9, False, [4, 5, 6]),  # sens ties with 3: the later 6
    (7, 0.8, 0.2, True, [6, 7]),  # dice best 7 now; 4 and 5 go together
    (8, 0.3, 0.95, False, [7, 8]),  # sens best 8
]


def test_retention_with_two_metrics_across_reopenings(tmp_path):
    def open_():
        return Checkpointer(tmp_path, best_metrics=("dice", "sens"), keep_latest=2)

    ckpt = open_()
    for step, dice, sens, reopen, retained in HISTORY:
        save_metrics(ckpt, step, None if dice is None else {"dice": dice, "sens": sens})
        assert_retained(ckpt, tmp_path, retained)
        if reopen:
            ckpt.close()
            ckpt = open_()
            assert_retained(ckpt, tmp_path, retained)
    assert (ckpt.best_step("dice"), ckpt.best_step("sens")) == (7, 8)
    ckpt.close()


def test_steps_without_a_number_for_the_metric_are_never_kept_as_best(tmp_path):
    ckpt = Checkpointer(tmp_path, best_metrics=("dice",), keep_latest=1)
    save_metrics(ckpt, 1, {"dice": NAN})
    save_metrics(ckpt, 2, {"dice": NAN})
    save_metrics(ckpt, 3, None)
    assert_retained(ckpt, tmp_path, [3])
    assert ckpt.best_step("dice") is None
    ckpt.close()
    ckpt = Checkpointer(tmp_path, best_metrics=("dice",), keep_latest=1)
    save_metrics(ckpt, 4, {"dice": 0.4})
    assert_retained(ckpt, tmp_path, [4])
    for step, metrics in [(5, None), (6, {"dice": None, "sens": 1.0}), (7, {"sens": 2.0})]:
        save_metrics(ckpt, step, metrics)
        assert_retained(ckpt, tmp_path, [4, step])
    save_metrics(ckpt, 8, {"dice": 0.3})
    assert_retained(ckpt, tmp_path, [4, 8])
    ckpt.close()


def test_retention_drops_a_step_whose_meta_cannot_be_read(tmp_path, caplog_absl):
    ckpt = Checkpointer(tmp_path, best_metrics=("dice",), keep_latest=1)
    save_metrics(ckpt, 1, {"dice": 0.9})
    save_metrics(ckpt, 2, {"dice": 0.1})
    ckpt.close()
    truncate([tmp_path / "1" / "meta" / "metadata"])  # e.g. a kill while retention deleted it
    ckpt = Checkpointer(tmp_path, best_metrics=("dice",), keep_latest=1)
    save_metrics(ckpt, 3, {"dice": 0.2})
    assert any(str(tmp_path / "1") in w for w in warnings_of(caplog_absl))
    assert_retained(ckpt, tmp_path, [3])  # 1 is no candidate, as for best_step; 3 beats 2
    ckpt.close()


def test_read_only_never_deletes(tmp_path):
    ckpt = Checkpointer(tmp_path, best_metrics=("dice",), keep_latest=3)
    for step in (1, 2, 3):
        save_metrics(ckpt, step, {"dice": 0.1})
    ckpt.close()
    ro = Checkpointer(tmp_path, best_metrics=("dice",), keep_latest=1, read_only=True)
    assert ro.best_step("dice") == 3
    ro.close()
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]


def test_keep_latest_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="keep_latest"):
        Checkpointer(tmp_path, keep_latest=0)


def test_restore_as_saved_needs_no_template(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(3, state_at(3), {"step": 3})
    state, meta = Checkpointer(tmp_path, read_only=True).restore_as_saved(3)
    assert meta == {"step": 3}
    np.testing.assert_array_equal(state["w"], state_at(3)["w"])
    np.testing.assert_array_equal(state["opt"]["mu"], state_at(3)["opt"]["mu"])


def test_famf_evaluation_reads_the_network_whatever_the_optimiser_layout(tmp_path):
    """An evaluation restores parameters and statistics only: a checkpoint whose optimiser
    state has another layout (optax.adamw's, before per-parameter step counts) still
    evaluates, and one holding another network is named, not mis-read."""
    import jax

    from configs import famf as famf_config
    from famf_jax import experiment

    cfg = famf_config.get_config("smoke")
    rng = np.random.default_rng(0)
    network = jax.tree.map(
        lambda x: rng.normal(size=x.shape).astype(x.dtype),
        experiment.state_template(cfg).variables,
    )
    state = {**network, "step": np.int32(5), "opt_state": [{"count": np.int32(5)}]}
    ckpt = experiment.checkpointer(tmp_path, 0)
    ckpt.save(5, state, {"config": cfg.to_dict(), "step": 5, "epoch": 1, "warm": True})
    ckpt.close()
    variables, meta = experiment.restore_for_eval(cfg, tmp_path, 0)
    assert meta["step"] == 5
    jax.tree.map(np.testing.assert_array_equal, variables, network)

    del state["params"]["fire2_1"]
    ckpt = experiment.checkpointer(tmp_path, 0)
    ckpt.save(6, state, {"config": cfg.to_dict(), "step": 6, "epoch": 2, "warm": True})
    ckpt.close()
    cfg.eval.checkpoint = 6
    with pytest.raises(ValueError, match="does not hold the network this config builds"):
        experiment.restore_for_eval(cfg, tmp_path, 0)


def test_famf_checkpoint_choice_compares_only_what_changes_the_network(tmp_path):
    """A checkpoint made with other network settings is refused by name; a setting the
    network ignores (scaled attention under faithful, whose MAF never scales) is not."""
    from configs import famf as famf_config
    from famf_jax import experiment

    made = famf_config.get_config("smoke")
    made.faithful = True
    ckpt = experiment.checkpointer(tmp_path, 0)
    ckpt.save(0, {"w": np.zeros(2, np.float32)}, {"config": made.to_dict(), "step": 0})
    ckpt.close()
    cfg = famf_config.get_config("smoke")
    cfg.faithful, cfg.model.scaled_attention = True, True
    assert experiment.choose_checkpoint(cfg, tmp_path, 0)[0] == 0
    cfg.faithful = False
    with pytest.raises(ValueError, match="model.scaled_attention=False .*faithful=True"):
        experiment.choose_checkpoint(cfg, tmp_path, 0)
