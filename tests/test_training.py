"""The shared training loop on a tiny fake model: noisy linear regression on Grain numbers."""

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
from typing import Any

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import nonfinite, training
from common.checkpoint import Checkpointer
from common.loader import iterate
from common.logging import read_jsonl
from conftest import REPO

N, BATCH = 12, 3
SPE = N // BATCH  # steps per epoch
TX = optax.sgd(0.05, momentum=0.9)  # momentum: the optimiser state must resume too


@flax.struct.dataclass
class State:
    step: jax.Array
    w: jax.Array  # (2,) slope, intercept
    opt_state: Any


def init_state() -> State:
    w = jnp.zeros(2)
    return State(jnp.zeros((), jnp.int32), w, TX.init(w))


def scale(i):
    return np.float32(i / N)


def data(seed: int = 0):
    ds = grain.MapDataset.range(N).seed(seed).shuffle().repeat(None).map(scale)
    return iter(iterate(ds, workers=0, batch_size=BATCH))


@jax.jit
def _step(state: State, x):
    noise = 0.1 * jax.random.normal(jax.random.fold_in(jax.random.key(0), state.step), x.shape)
    y = 3 * x - 1 + noise  # randomness from the step: a resume must restore it

    def loss_fn(w):
        return jnp.mean((w[0] * x + w[1] - y) ** 2)

    loss, grad = jax.value_and_grad(loss_fn)(state.w)
    updates, opt_state = TX.update(grad, state.opt_state)
    w = optax.apply_updates(state.w, updates)
    out = {
        "loss": loss,
        "w": w,
        "grad": grad,
        "count": jnp.array([jnp.sum(x > 0.5), x.shape[0]]),
        "outer": jnp.outer(w, w),
    }
    return State(state.step + 1, w, opt_state), out


@jax.jit
def _guarded_step(state: State, x):
    """_step with a non-finite step left out, as the models' steps do."""
    new, out = _step(state, x)
    ok = nonfinite.all_finite((out["loss"], out["grad"]))
    new = nonfinite.keep_if(ok, new, state.replace(step=state.step + 1))
    return new, dict(out, skipped=nonfinite.skipped(ok))


def run(
    workdir: pathlib.Path,
    *,
    crash_at=None,
    kill_at=None,
    seen=None,
    nan_at=(),
    left_out=(),
    data_fn=None,
    **kw,
):
    """train_loop on the fake model; `crash_at` raises and `kill_at` SIGKILLs at that step;
    `nan_at` steps get a NaN batch (through the guarded step), `left_out` steps have their
    update dropped by hand (the reference for a skipped step)."""

    def step_fn(state, x, step):
        if seen is not None:
            seen.append(step)
        if step == crash_at:
            raise RuntimeError("crash")
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if nan_at or left_out:
            new, out = _guarded_step(state, x * np.float32(np.nan) if step in nan_at else x)
            return (state.replace(step=state.step + 1) if step in left_out else new), out
        return _step(state, x)

    ckpt = Checkpointer(workdir / "ckpt", best_metrics=kw.pop("best", ("score",)), keep_latest=10)
    args = dict(epochs=4, log_every=1, log_exclude=("count", "outer"))
    args.update(kw)
    try:
        return training.train_loop(
            init_state(),
            step_fn,
            data_fn() if data_fn else data(),
            workdir=workdir,
            checkpointer=ckpt,
            steps_per_epoch=SPE,
            **args,
        )
    finally:
        ckpt.close()


def scorer(scores: dict, calls: list | None = None):
    def evaluate(state, epoch):
        if calls is not None:
            calls.append((epoch, int(state.step)))
        return {"score": scores[epoch], "aux": math.nan}

    return evaluate


def rows(workdir):
    return [
        {k: v for k, v in r.items() if k != "time"} for r in read_jsonl(workdir / "metrics.jsonl")
    ]


def assert_states_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def saved_steps(workdir):
    ckpt = Checkpointer(workdir / "ckpt", read_only=True)
    try:
        return ckpt.steps(), {s: ckpt.meta(s) for s in ckpt.steps()}
    finally:
        ckpt.close()


def test_crash_and_resume_match_an_uninterrupted_run(tmp_path):
    evaluate = scorer({2: 0.5, 4: 0.7})
    kw = dict(evaluate=evaluate, eval_every=2, checkpoint_every=1)
    state_a, result_a = run(tmp_path / "a", **kw)

    with pytest.raises(RuntimeError, match="crash"):
        run(tmp_path / "b", crash_at=10, **kw)  # checkpoint at 8, steps 9 and 10 logged
    assert max(r["step"] for r in rows(tmp_path / "b")) == 10
    seen = []
    state_b, result_b = run(tmp_path / "b", seen=seen, **kw)

    assert seen == list(range(8, 16))  # resumed at the checkpoint, not at 0 or 10
    assert_states_equal(state_a, state_b)
    assert int(state_b.step) == 16
    assert rows(tmp_path / "a") == rows(tmp_path / "b")  # nothing logged twice
    step_rows = [r["step"] for r in rows(tmp_path / "b") if "loss" in r]
    assert step_rows == list(range(1, 17))
    assert result_a.best == result_b.best and result_a.last == result_b.last

    seen = []  # a finished run started again does nothing
    state_c, _ = run(tmp_path / "b", seen=seen, **kw)
    assert seen == [] and rows(tmp_path / "a") == rows(tmp_path / "b")
    assert_states_equal(state_a, state_c)


@pytest.mark.slow
def test_sigkill_and_resume_match_an_uninterrupted_run(tmp_path):
    state_a, _ = run(tmp_path / "a", checkpoint_every=1)
    script = (
        f"import sys, pathlib; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
        "import test_training as t\n"
        f"t.run(pathlib.Path({str(tmp_path / 'b')!r}), kill_at=10, checkpoint_every=1)\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    seen = []
    state_b, _ = run(tmp_path / "b", checkpoint_every=1, seen=seen)
    assert seen == list(range(8, 16))
    assert_states_equal(state_a, state_b)
    assert rows(tmp_path / "a") == rows(tmp_path / "b")


@pytest.mark.parametrize(
    "scores, best_epoch",
    [({2: 0.7, 4: 0.9, 5: 0.4}, 4), ({2: 0.9, 4: 0.9, 5: 0.4}, 4)],  # ties: the later step
)
def test_eval_cadence_and_best_checkpoint(tmp_path, scores, best_epoch):
    calls = []
    meta = lambda epoch: {"tag": f"after {epoch}"}
    _, result = run(tmp_path, epochs=5, eval_every=2, evaluate=scorer(scores, calls), meta=meta)

    assert calls == [(2, 8), (4, 16), (5, 20)]  # every 2nd epoch and the last one
    valid = {r["step"]: r["valid/score"] for r in rows(tmp_path) if "valid/score" in r}
    assert valid == {4 * e: scores[e] for e in (2, 4, 5)}
    assert all(r["valid/aux"] is None for r in rows(tmp_path) if "valid/aux" in r)
    steps, metas = saved_steps(tmp_path)
    assert steps == [8, 16, 20]  # checkpoint_every=0: saved at evaluations only
    assert metas[16] == {
        "tag": "after 4",
        "epoch": 4,
        "step": 16,
        "metrics": {"score": scores[4], "aux": None},
        "skipped_steps": 0,
        "replaced_elements": 0,
    }
    assert result.best == {
        "score": {"step": 4 * best_epoch, "metrics": metas[4 * best_epoch]["metrics"]}
    }
    assert result.last == {"step": 20, "epoch": 5, "metrics": {"score": scores[5], "aux": None}}
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["best"] == result.best and summary["last"] == result.last
    assert summary["seconds"] == pytest.approx(result.seconds)

    # best-N retention: the default Checkpointer keeps the latest and the best only
    retained = tmp_path / "retained"
    ckpt = Checkpointer(retained / "ckpt", best_metrics=("score",))
    training.train_loop(
        init_state(),
        lambda s, x, step: _step(s, x),
        data(),
        workdir=retained,
        checkpointer=ckpt,
        steps_per_epoch=SPE,
        epochs=5,
        eval_every=2,
        evaluate=scorer(scores),
        log_exclude=("count", "outer"),
    )
    assert ckpt.steps() == sorted({4 * best_epoch, 20})
    ckpt.close()


def test_without_evaluation_checkpoints_for_resume_and_reports_the_last_step(tmp_path):
    _, result = run(tmp_path / "none", epochs=3, checkpoint_every=2, best=())
    steps, metas = saved_steps(tmp_path / "none")
    assert steps == [8, 12]  # every 2nd epoch and the last
    assert all(m["metrics"] is None for m in metas.values())
    assert result.best == {} and result.last == {"step": 12, "epoch": 3, "metrics": None}
    assert not any(k.startswith("valid/") for r in rows(tmp_path / "none") for k in r)

    # evaluate may also return None (nothing to validate on): no metrics, no extra saves
    calls = []

    def evaluate(state, epoch):
        calls.append(epoch)

    _, result = run(tmp_path / "empty", epochs=3, evaluate=evaluate)
    assert calls == [1, 2, 3]
    assert saved_steps(tmp_path / "empty")[0] == [12]
    assert result.best == {"score": {"step": None, "metrics": None}}
    assert result.last["step"] == 12


def test_step_rows_vector_labels_and_epoch_metrics(tmp_path):
    def epoch_metrics(epoch_rows):
        assert len(epoch_rows) == SPE and "count" in epoch_rows[0]  # excluded keys still here
        big, n = np.sum([r["count"] for r in epoch_rows], axis=0)
        return {"train/big_fraction": big / n}

    state, _ = run(
        tmp_path,
        epochs=2,
        log_every=3,
        vector_labels={"w": ("slope", "intercept")},
        epoch_metrics=epoch_metrics,
    )
    all_rows = rows(tmp_path)
    steps = [r for r in all_rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 2 * SPE + 1))
    assert [r["epoch"] for r in steps] == [0] * SPE + [1] * SPE
    last = steps[-1]
    assert {"w/slope", "w/intercept", "grad/0", "grad/1"} <= set(last)
    assert not any(k.startswith(("count", "outer", "w/0")) for k in last)
    assert last["w/slope"] == pytest.approx(float(state.w[0]))
    assert last["w/intercept"] == pytest.approx(float(state.w[1]))
    epochs = [r for r in all_rows if "train/loss" in r]
    assert [r["step"] for r in epochs] == [SPE, 2 * SPE]
    for e, r in enumerate(epochs):
        losses = [s["loss"] for s in steps if s["epoch"] == e]
        assert r["train/loss"] == pytest.approx(np.mean(losses))
        # each epoch is a permutation of 0..11 / 12: five of the twelve are above 0.5
        assert r["train/big_fraction"] == pytest.approx(5 / 12)


def test_unexcluded_matrix_output_and_wrong_label_count_fail(tmp_path):
    with pytest.raises(ValueError, match="'outer'.*log_exclude"):
        run(tmp_path / "a", epochs=1, log_exclude=("count",))
    with pytest.raises(ValueError, match="vector_labels for 'w'"):
        run(tmp_path / "b", epochs=1, vector_labels={"w": ("slope",)})


def test_outputs_are_fetched_once_per_flush(tmp_path, monkeypatch):
    sizes = []
    real = training._to_host

    def counting(pending):
        sizes.append(len(pending))
        return real(pending)

    monkeypatch.setattr(training, "_to_host", counting)
    run(tmp_path, epochs=2, log_every=3)
    assert sizes == [3, 1, 3, 1]  # every 3 steps and at each epoch's end


def test_data_too_short_is_a_clear_error(tmp_path):
    ds = grain.MapDataset.range(N).map(scale)  # one epoch only
    ckpt = Checkpointer(tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match="data ended at step 4"):
        training.train_loop(
            init_state(),
            lambda s, x, step: _step(s, x),
            iter(iterate(ds, batch_size=BATCH)),
            workdir=tmp_path,
            checkpointer=ckpt,
            steps_per_epoch=SPE,
            epochs=2,
            log_exclude=("count", "outer"),
        )
    ckpt.close()


def test_resume_from_a_checkpoint_without_data_position(tmp_path):
    # An imported checkpoint (FAMF's --mode=import_torch) has state and meta only: training
    # starts from it with the data at the beginning, as a run from step 0 would.
    ckpt = Checkpointer(tmp_path / "imported" / "ckpt")
    ckpt.save(0, init_state(), {"step": 0, "epoch": 0})
    assert not ckpt.has_data(0)
    ckpt.close()
    state_a, _ = run(tmp_path / "imported", best=())
    state_b, _ = run(tmp_path / "fresh", best=())
    assert_states_equal(state_a, state_b)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, at, saved",
    [
        (signal.SIGTERM, 9, 10),  # mid-epoch: that step finishes, a checkpoint at 10
        (signal.SIGINT, 11, 12),  # an epoch's last step: its end runs in full first
        (signal.SIGTERM, 15, 16),  # the last step: the final checkpoint is the one
    ],
)
def test_signal_saves_a_checkpoint_and_resume_matches(tmp_path, sig, at, saved):
    state_a, _ = run(tmp_path / "a", checkpoint_every=2)
    script = (
        "import os, sys, pathlib\n"
        f"sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
        "import test_training as t\n"
        "from common.training import Interrupted\n"
        "class Seen(list):\n"
        "    def append(self, step):\n"
        "        super().append(step)\n"
        f"        if step == {at}: os.kill(os.getpid(), {int(sig)})\n"
        "try:\n"
        f"    t.run(pathlib.Path({str(tmp_path / 'b')!r}), seen=Seen(), checkpoint_every=2)\n"
        "except Interrupted as e:\n"
        "    sys.exit(100 + e.step)\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert r.returncode == 100 + saved, r.stderr.decode()[-2000:]
    steps, metas = saved_steps(tmp_path / "b")
    assert max(steps) == saved
    if saved < 16:
        assert metas[saved]["interrupted"] == signal.Signals(sig).name
        assert metas[saved]["epoch"] == saved // SPE
    train_rows = [x["step"] for x in rows(tmp_path / "b") if "train/loss" in x]
    assert train_rows == [s for s in (4, 8, 12, 16) if s <= saved]  # no epoch end skipped
    seen = []
    state_b, _ = run(tmp_path / "b", checkpoint_every=2, seen=seen)
    assert seen == list(range(saved, 16))
    assert_states_equal(state_a, state_b)
    step_rows = [x["step"] for x in rows(tmp_path / "b") if "loss" in x]
    assert step_rows == list(range(1, 17))


def test_nonfinite_steps_are_left_out_counted_and_logged(tmp_path, caplog):
    nan_at = (5, 9)
    state, result = run(tmp_path / "nan", nan_at=nan_at, log_every=3, checkpoint_every=1)
    ref, ref_result = run(tmp_path / "ref", left_out=nan_at, log_every=3, checkpoint_every=1)
    assert_states_equal(state, ref)  # as if those two batches' updates were left out
    assert int(state.step) == 4 * SPE and np.isfinite(np.asarray(state.w)).all()
    assert result.skipped_steps == 2 and ref_result.skipped_steps == 0
    step_rows = [r for r in rows(tmp_path / "nan") if "loss" in r]
    assert [r["step"] for r in step_rows if r["skipped"]] == [s + 1 for s in nan_at]
    epoch_rows = [r for r in rows(tmp_path / "nan") if "train/loss" in r]
    assert all(math.isfinite(r["train/loss"]) for r in epoch_rows)  # NaN steps not averaged
    summary = json.loads((tmp_path / "nan" / "train_summary.json").read_text())
    assert summary["skipped_steps"] == 2
    warned = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert any(m.startswith("step 6:") for m in warned) and any("step 10:" in m for m in warned)


def test_too_many_nonfinite_steps_in_a_row_stop_with_the_last_checkpoint_intact(tmp_path):
    with pytest.raises(training.Stopped, match="3 steps in a row.*step 4, is intact"):
        run(tmp_path, nan_at=range(5, 16), max_skipped_in_row=3, checkpoint_every=1)
    steps, metas = saved_steps(tmp_path)
    assert max(steps) == 4  # epoch 1's; nothing saved after the NaN steps began
    ckpt = Checkpointer(tmp_path / "ckpt", read_only=True)
    try:
        restored, _ = ckpt.restore(4, init_state())
    finally:
        ckpt.close()
    assert np.isfinite(np.asarray(restored.w)).all()


def with_replaced(counts: dict[int, int]):
    """The fake data as dicts with the loader's `replaced` per element (`counts[step]` on the
    step's first element)."""

    def tag(i, x):
        first = i % BATCH == 0
        return {"x": x, "replaced": np.int32(counts.get(i // BATCH, 0) if first else 0)}

    def make():
        ds = grain.MapDataset.range(N).seed(0).shuffle().repeat(None).map(scale)
        return iter(iterate(ds.map_with_index(tag), workers=0, batch_size=BATCH))

    return make


def test_replaced_elements_are_counted_over_resume_and_bounded(tmp_path):
    counts = {2: 1, 6: 2, 8: 1}  # batch 8: read again after the resume at step 8
    kw = dict(data_fn=with_replaced(counts), to_device=lambda b: b["x"], checkpoint_every=1)
    with pytest.raises(RuntimeError, match="crash"):
        run(tmp_path / "a", crash_at=9, **kw)
    state, result = run(tmp_path / "a", **kw)  # resumes at step 8: both counts before it
    assert result.replaced_elements == 4  # counted once though read twice
    ref, _ = run(tmp_path / "ref", checkpoint_every=1)
    assert_states_equal(state, ref)  # the field never reaches the step
    with pytest.raises(training.Stopped, match="3 unusable data elements replaced by step 7"):
        run(tmp_path / "b", max_replaced=2, **kw)
