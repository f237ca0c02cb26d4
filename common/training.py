"""The one training loop both models use: resume, batched metric fetches, progress, evaluation
cadence, best-checkpoint bookkeeping and the training summary.

A model hands `train_loop` its initial state, a step function and a Grain iterator; everything
that is not about the model happens here, once:

    state, result = train_loop(
        state, step_fn, data_iterator,
        workdir=fold_dir,                 # metrics.jsonl, train_summary.json
        checkpointer=Checkpointer(fold_dir / "checkpoints", best_metrics=("dice",)),
        steps_per_epoch=spe, epochs=300,
        to_device=device_batch,           # host batch -> device batch
        evaluate=validate,                # (state, epoch) -> {"dice": 0.8, ...} | None, or None
        eval_every=10, checkpoint_every=1, log_every=20,
        meta={"config": cfg.to_dict()},   # or epoch -> dict; JSON saved with each checkpoint
        epoch_metrics=train_metrics,      # host rows of an epoch -> {"train/acc": ...}
        log_exclude=("counts",), vector_labels={"beta": ("t1", "t1ce", "t2", "flair")},
        postfix_keys=("beta",), desc="train",
    )

What the model provides:

- `state`: a pytree with an int array `step` (attribute or key) counting completed steps; on
  start it is the template the latest checkpoint is restored into, so its structure must match.
- `step_fn(state, batch, step) -> (state, outputs)`: `step` is the Python int of the global
  step (0-based; epoch = step // steps_per_epoch), from which the model derives its flags and
  static arguments. It returns the new state (with `step` incremented) and a flat dict of device
  arrays, at least a 0-d `loss`. Typically a closure around a `jax.jit`-compiled function.
- `data`: a Grain iterator (`iter(grain.IterDataset)`) yielding at least
  `epochs * steps_per_epoch` batches; its position is saved with every checkpoint.
- `checkpointer`: a `common.checkpoint.Checkpointer`; its `best_metrics` are the criteria of
  the best-N bookkeeping and of the summary. The caller closes it.

What the loop does:

- Resume: restores the latest checkpoint (state and iterator position) and continues at
  `int(state.step)`; rows of `metrics.jsonl` with a step beyond it are dropped first, so steps
  run again after a crash are logged once (a line torn by a kill too). A run killed at any
  point and restarted ends with the same state, bit for bit, as an uninterrupted one, given a
  deterministic Grain pipeline and a step that derives its randomness from the state or the
  step number.
- Input without a stall: the next step's batch is read and put on the devices (`to_device`,
  e.g. a sharded `jax.device_put`) right after the current step is dispatched, so loading and
  the host-to-device copy overlap the step; a checkpoint's data position is always right
  after the batch of the step it holds.
- Per-step outputs stay on the device; every `log_every` steps and at each epoch's end the
  pending ones are fetched with one `jax.device_get` and written, one row per step at the step
  count after it (`step + 1`) with the 0-based `epoch`: 0-d arrays as scalars, 1-d arrays as
  `key/<label>` (labels from `vector_labels`, else the index), keys in `log_exclude` not at all;
  higher ranks must be excluded. At each epoch's end one more row at the same step holds
  `train/loss` (the epoch's mean) and whatever `epoch_metrics(rows)` returns, where `rows` are
  the epoch's host rows with every key (excluded ones too) as numpy arrays.
- A progress bar with the epoch's mean loss, the epoch, the ETA and the last values of
  `postfix_keys`.
- At the end of every `eval_every`-th epoch and of the last one, `evaluate(state, epoch)`
  (epoch = epochs completed, 1-based) gives a flat dict of numbers, written as `valid/<key>`
  (NaN and infinities as null, ranked last) and saved with a checkpoint taken there for the
  best-N bookkeeping. With `evaluate=None`, or when it returns None, nothing is logged and
  checkpoints carry `metrics: None`. Every `checkpoint_every`-th epoch (0: never) a checkpoint
  is saved for resume without evaluation; the last step is always saved. Each checkpoint's
  meta is `meta` (or `meta(epoch)`) plus `epoch`, `step` and `metrics`.
- A step output `skipped` (0-d int, `common.nonfinite.skipped`) marks a step whose loss or
  gradients were not finite and whose update the step left out: each is logged with a warning,
  kept out of the epoch's mean loss, and after `max_skipped_in_row` in a row (0: never) the
  loop raises `Stopped` without saving, so the last checkpoint stays the last good one.
- A host batch may carry `replaced` (per element: how many unusable elements, an unreadable
  file or NaN values, its loader replaced by the next usable one, see
  `common.loader.first_usable`); it is removed before `to_device`, and more than
  `max_replaced` in the run raise `Stopped` (over several processes, which each read their
  own rows, the counts are summed at every log flush, so all stop at the same step). Both
  counts are saved in each checkpoint's meta (`skipped_steps`, `replaced_elements`), so they
  add up over resumed runs, and reported in the summary.
- SIGINT and SIGTERM (in the main thread) end the step that is running (and, on an epoch's
  last step, that epoch's logging, evaluation and checkpoint), flush its rows, save a
  checkpoint there with the data position (meta `interrupted`: the signal's name) unless one
  was just saved, and raise `Interrupted`; the next call resumes from it exactly. Over several
  processes every process must stop at the same step (the checkpoint is collective, and a
  process that went on would wait for the others forever): SIGTERM to any of them is left to
  JAX's preemption service, whose `reached_preemption_sync_point`, asked at every step, turns
  true at the same step everywhere; a SIGINT (Ctrl-C) there is turned into a SIGTERM to its
  own process, so it takes the same path.
- Returns the final state and a `TrainResult`, also written to `<workdir>/train_summary.json`:
  per criterion the best step and its metrics, the latest checkpoint's step, epoch and metrics,
  the counts of skipped steps and replaced elements, and the seconds this call took.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from common import atomic
from common.checkpoint import Checkpointer
from common.logging import MetricWriter, progress

StepFn = Callable[[Any, Any, int], tuple[Any, dict[str, jax.Array]]]
EvalFn = Callable[[Any, int], Mapping[str, float] | None]
EpochMetricsFn = Callable[[list[dict[str, np.ndarray]]], Mapping[str, float]]


@dataclasses.dataclass
class TrainResult:
    best: dict[str, dict]  # criterion -> {"step": int | None, "metrics": dict | None}
    last: dict  # {"step", "epoch", "metrics"} of the latest checkpoint
    seconds: float  # wall time of this call (a resumed run counts its own part)
    skipped_steps: int = 0  # non-finite steps left out, over the whole run
    replaced_elements: int = 0  # unusable data elements replaced, over the whole run


class Stopped(RuntimeError):
    """Training stopped by one of the loop's checks; the message says which and why."""


class Interrupted(Exception):
    """Training stopped by a signal after saving a checkpoint at `step`."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        name = signal.Signals(signum).name
        super().__init__(f"{name}: checkpoint saved at step {step}; --mode=train resumes there")


# Calls of reached_preemption_sync_point in this process: the service compares every process's
# count of calls, which must grow by one per call and be equal across processes at each step
# (a training step number would not be: resumed runs and FAMF's folds restart it).
_sync_calls = itertools.count(1)


@contextlib.contextmanager
def _signals_caught(received: list[int]):
    """SIGINT/SIGTERM append to `received` instead of killing the process (main thread only;
    elsewhere signals cannot be handled and keep their default action). Over several
    processes SIGTERM is left to JAX's preemption service (see `_stop_signal`) and SIGINT
    (Ctrl-C) is turned into a SIGTERM to this process, so it stops every process too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if jax.process_count() > 1:
        handlers = {signal.SIGINT: lambda *_: os.kill(os.getpid(), signal.SIGTERM)}
    else:
        catch = lambda signum, _: received.append(signum)
        handlers = {signal.SIGINT: catch, signal.SIGTERM: catch}
    old = {s: signal.signal(s, h) for s, h in handlers.items()}
    try:
        yield
    finally:
        for s, handler in old.items():
            # None: a handler not installed from Python (JAX's own SIGTERM notifier).
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def _stop_signal(received: list[int]) -> int | None:
    """The signal to stop on after the step just done, or None. One process: the first caught.
    Several: SIGTERM once JAX's preemption service says every process has reached the same
    step after a SIGTERM to any of them (asked after every step, by every process)."""
    if jax.process_count() == 1:
        return received[0] if received else None
    from jax.experimental import multihost_utils

    reached = multihost_utils.reached_preemption_sync_point(next(_sync_calls))
    return signal.SIGTERM if reached else None


def _sum_over_processes(n: int) -> int:
    """`n` summed over the processes (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return n
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.int64(n))))


def _step_of(state) -> int:
    return int(state["step"] if isinstance(state, Mapping) else state.step)


def _to_host(pending: list[dict]) -> list[dict]:
    """One transfer for all pending steps (a sync per step would stall the device)."""
    return jax.device_get(pending)


def _plain_metric(v: float) -> float | int | None:
    """JSON-safe: NaN and infinities become None (the best-N getter ranks them last)."""
    if isinstance(v, int | np.integer) and not isinstance(v, bool):
        return int(v)
    v = float(v)
    return v if math.isfinite(v) else None


class _StepLog:
    """Pending device outputs, flushed to the writer; the epoch's host rows for its metrics."""

    def __init__(
        self,
        writer: MetricWriter,
        exclude: Collection[str],
        vector_labels: Mapping[str, Sequence[str]],
    ):
        self.writer, self.exclude, self.labels = writer, set(exclude), vector_labels
        self.pending: list[dict] = []
        self.epoch_rows: list[dict[str, np.ndarray]] = []
        self.skipped = 0  # skipped steps, in the whole run
        self.skipped_in_row = 0
        self.longest_run = 0  # the longest run of skipped steps seen (the stop's criterion)

    def epoch_loss(self) -> float:
        losses = [float(r["loss"]) for r in self.epoch_rows if not r.get("skipped", 0)]
        return float(np.mean(losses)) if losses else math.nan

    def _scalars(self, row: dict[str, np.ndarray]) -> dict[str, Any]:
        out = {}
        for key, value in row.items():
            if key in self.exclude:
                continue
            v = np.asarray(value)
            if v.ndim == 0:
                out[key] = v.item()
            elif v.ndim == 1:
                labels = self.labels.get(key, range(len(v)))
                if len(labels) != len(v):
                    raise ValueError(f"{len(labels)} vector_labels for {key!r} of length {len(v)}")
                out.update({f"{key}/{lab}": x.item() for lab, x in zip(labels, v)})
            else:
                raise ValueError(f"step output {key!r} has shape {v.shape}: add it to log_exclude")
        return out

    def flush(self, step: int, epoch: int) -> dict[str, np.ndarray]:
        """Writes the pending steps, the last of which ends at `step`; returns the last row."""
        rows = _to_host(self.pending)
        self.pending = []
        for k, row in enumerate(rows):
            done = step - len(rows) + k + 1
            self.writer.write(done, dict(self._scalars(row), epoch=epoch))
            if row.get("skipped", 0):
                self.skipped += 1
                self.skipped_in_row += 1
                self.longest_run = max(self.longest_run, self.skipped_in_row)
                logging.warning(
                    "step %d: non-finite loss or gradients, its update was left out "
                    "(%d in a row, %d in the run)",
                    done,
                    self.skipped_in_row,
                    self.skipped,
                )
            else:
                self.skipped_in_row = 0
        self.epoch_rows += rows
        return rows[-1] if rows else {}


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _postfix(row: Mapping[str, np.ndarray], keys: Sequence[str]) -> dict[str, str]:
    out = {}
    for key in keys:
        if key in row:
            v = np.atleast_1d(np.asarray(row[key], np.float64))
            out[key] = ",".join(f"{x:.3g}" for x in v)
    return out


def summarise(checkpointer: Checkpointer) -> tuple[dict, dict]:
    """(best per criterion, last) from the retained checkpoints' meta."""
    best = {}
    for c in checkpointer.best_metrics:
        s = checkpointer.best_step(c)
        best[c] = {"step": s, "metrics": checkpointer.meta(s)["metrics"] if s is not None else None}
    s = checkpointer.latest_step()
    m = checkpointer.meta(s) if s is not None else {}
    last = {"step": s, "epoch": m.get("epoch"), "metrics": m.get("metrics")}
    return best, last


def train_loop(
    state: Any,
    step_fn: StepFn,
    data: Iterator,
    *,
    workdir: str | pathlib.Path,
    checkpointer: Checkpointer,
    steps_per_epoch: int,
    epochs: int,
    to_device: Callable[[Any], Any] = jax.device_put,
    evaluate: EvalFn | None = None,
    eval_every: int = 1,
    checkpoint_every: int = 0,
    log_every: int = 10,
    meta: Mapping[str, Any] | Callable[[int], Mapping[str, Any]] | None = None,
    epoch_metrics: EpochMetricsFn | None = None,
    log_exclude: Collection[str] = (),
    vector_labels: Mapping[str, Sequence[str]] | None = None,
    postfix_keys: Sequence[str] = (),
    desc: str = "train",
    max_skipped_in_row: int = 10,
    max_replaced: int = 10,
) -> tuple[Any, TrainResult]:
    """Trains `state` to `epochs * steps_per_epoch` steps; returns (final state, summary).

    See the module docstring for what each argument must be and what the loop does."""
    if steps_per_epoch < 1 or epochs < 1 or eval_every < 1 or log_every < 1:
        raise ValueError("steps_per_epoch, epochs, eval_every and log_every must be >= 1")
    t0 = time.time()
    workdir = pathlib.Path(workdir)
    total = steps_per_epoch * epochs
    writer = MetricWriter(workdir)
    saved: dict = {}
    resumed = checkpointer.restore_latest(state, data_iterator=data)
    if resumed is not None:
        latest, state, saved = resumed
        state = jax.tree_util.tree_map(jnp.asarray, state)
        logging.info("%s: resumed at step %d (epoch %s)", desc, latest, saved.get("epoch"))
        if not checkpointer.has_data(latest):
            logging.info("%s: that checkpoint holds no data position; data from the start", desc)
    start = _step_of(state)
    dropped = writer.drop_after(start)
    if dropped:
        logging.info("%s: dropped %d metric rows after step %d", desc, dropped, start)
    log = _StepLog(writer, log_exclude, vector_labels or {})
    log.skipped = int(saved.get("skipped_steps") or 0)
    replaced = int(saved.get("replaced_elements") or 0)  # over the whole run and processes
    replaced_here = 0  # by this process since the last sum over the processes
    bar = progress(total=total, initial=start, desc=desc)
    received: list[int] = []

    def checkpoint_meta(meta_epoch: int, **fields) -> dict:
        m = dict(meta(meta_epoch) if callable(meta) else (meta or {}))
        m.update(fields, skipped_steps=log.skipped, replaced_elements=replaced)
        return m

    def last_checkpoint() -> str:
        s = checkpointer.latest_step()
        return (
            "no checkpoint saved yet" if s is None else f"the last checkpoint, step {s}, is intact"
        )

    def check_skipped() -> None:
        if max_skipped_in_row and log.longest_run >= max_skipped_in_row:
            bar.close()
            writer.close()
            raise Stopped(
                f"{desc}: {log.longest_run} steps in a row had a non-finite loss or "
                f"gradients (the limit is {max_skipped_in_row}); {last_checkpoint()}; look for "
                "NaN in the data or lower the learning rate"
            )

    def stop(signum: int, done: int) -> None:
        """After a signal, with `done` steps complete (and their epoch's end handled): flush,
        checkpoint there unless the epoch's end just did, and raise Interrupted."""
        nonlocal replaced, replaced_here
        name = signal.Signals(signum).name
        replaced, replaced_here = replaced + _sum_over_processes(replaced_here), 0
        last_epoch = (done - 1) // steps_per_epoch
        if log.pending:
            log.flush(done, last_epoch)
        if checkpointer.latest_step() != done:
            m = checkpoint_meta(
                last_epoch + 1,
                epoch=done // steps_per_epoch,
                step=done,
                metrics=None,
                interrupted=name,
            )
            checkpointer.save(done, state, m, data_iterator=data)
        bar.close()
        writer.close()
        logging.warning("%s: %s after step %d: checkpoint saved", desc, name, done)
        raise Interrupted(signum, done)

    def check_replaced(step: int) -> None:
        """Stopped once more than `max_replaced` elements were replaced, by `step` + 1."""
        nonlocal replaced, replaced_here
        replaced += _sum_over_processes(replaced_here)
        replaced_here = 0
        if replaced > max_replaced:
            bar.close()
            writer.close()
            raise Stopped(
                f"{desc}: {replaced} unusable data elements replaced by step {step + 1}, "
                f"more than the limit of {max_replaced} (the warnings above name "
                f"them); {last_checkpoint()}"
            )

    def load(step: int) -> Any:
        """The batch of `step`, put on the devices."""
        nonlocal replaced_here
        try:
            batch = next(data)
        except StopIteration:
            raise RuntimeError(
                f"{desc}: data ended at step {step}; it must yield {total} batches"
            ) from None
        if isinstance(batch, Mapping) and "replaced" in batch:
            batch = dict(batch)
            n = int(np.sum(batch.pop("replaced")))
            replaced_here += n
            if n and jax.process_count() == 1:  # several: at the next flush, together
                check_replaced(step)
        return to_device(batch)

    def after_step(step: int, out: dict) -> None:
        """Logging, and at an epoch's end its metrics, evaluation and checkpoint."""
        log.pending.append(out)
        bar.update(1)
        epoch, in_epoch = divmod(step, steps_per_epoch)
        end_of_epoch = in_epoch == steps_per_epoch - 1
        if len(log.pending) < log_every and not end_of_epoch:
            return
        last_row = log.flush(step + 1, epoch)
        check_skipped()
        if jax.process_count() > 1:
            check_replaced(step)
        loss = log.epoch_loss()
        bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch, **_postfix(last_row, postfix_keys))
        if not end_of_epoch:
            return
        train_row = {"train/loss": loss}
        if epoch_metrics is not None:
            train_row.update(epoch_metrics(log.epoch_rows))
        writer.write(step + 1, train_row)
        log.epoch_rows = []
        done = epoch + 1
        last = step + 1 == total
        metrics = None
        if evaluate is not None and (done % eval_every == 0 or last):
            metrics = evaluate(state, done)
            if metrics is not None:
                metrics = {k: _plain_metric(v) for k, v in metrics.items()}
                writer.write(step + 1, {f"valid/{k}": v for k, v in metrics.items()})
                shown = checkpointer.best_metrics or tuple(metrics)
                logging.info(
                    "%s epoch %d: train loss %.4f, %s",
                    desc,
                    done,
                    loss,
                    ", ".join(f"{k} {_fmt(metrics.get(k))}" for k in shown),
                )
        if metrics is not None or last or (checkpoint_every and done % checkpoint_every == 0):
            m = checkpoint_meta(done, epoch=done, step=step + 1, metrics=metrics)
            checkpointer.save(step + 1, state, m, data_iterator=data, metrics=metrics)

    with _signals_caught(received):
        ahead = load(start) if start < total else None
        for step in range(start, total):
            state, out = step_fn(state, ahead, step)  # dispatched: runs while the host goes on
            after_step(step, out)
            # After the epoch's end ran in full, before the next batch is read.
            signum = _stop_signal(received)
            if signum is not None:
                stop(signum, step + 1)
            # The next batch goes to the devices while this step runs; read only now, so a
            # checkpoint above holds the data position right after this step's batch.
            ahead = load(step + 1) if step + 1 < total else None
    bar.close()
    writer.close()
    best, last_ckpt = summarise(checkpointer)
    replaced += _sum_over_processes(replaced_here)
    result = TrainResult(best, last_ckpt, time.time() - t0, log.skipped, replaced)
    if log.skipped or replaced:
        logging.warning(
            "%s: %d non-finite steps skipped, %d unusable data elements replaced",
            desc,
            log.skipped,
            replaced,
        )
    if jax.process_index() == 0:
        atomic.write_json(workdir / "train_summary.json", dataclasses.asdict(result))
    return state, result
