"""The project's one orbax wrapper: composite checkpoints, latest + best-N retention, resume.

A checkpoint holds `state` (any pytree of arrays), `meta` (JSON: config, epoch, fold, metrics)
and, when given, `data` (a Grain iterator's position). Retention: the latest `keep_latest`
checkpoints, plus the best by each named metric of `meta["metrics"]` (highest wins; on ties the
later step, as the original's `>=`; missing, None or NaN never best), whatever restarts happened
between saves. Only this file talks to orbax, so moving to another orbax API touches it alone.

Atomicity (orbax 0.12.8, local disk): a save writes `<step>.orbax-checkpoint-tmp/` and renames it
to `<step>/` only when complete, so a kill leaves a tmp folder that orbax never lists as a step; a
writable Checkpointer warns about and removes such folders when it opens. A step folder damaged
later (files truncated or deleted, e.g. by a kill while retention deletes it) is still listed:
`restore_latest` warns, moves it aside to `<step>.incomplete` and falls back a step.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from common.errors import brief

_TMP = ocp.path.step.TMP_DIR_SUFFIX  # orbax's name mark of a save that has not finished


def _replicated() -> jax.sharding.Sharding:
    """Replicated over this run's devices: where restored arrays go unless a template says
    otherwise (orbax would place them as saved, and a checkpoint written by several processes
    or devices then cannot be read by one: "Topology mismatch")."""
    from common import parallel

    return parallel.Sharding(parallel.mesh()).replicated


def _placed(template: Any) -> Any:
    """Template leaves without a sharding (`jax.eval_shape`'s) `_replicated()`."""
    replicated = _replicated()

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)
        return x

    return jax.tree.map(leaf, template)


def _metric_getter(name: str):
    def get(metrics: dict) -> float:
        try:
            v = float(metrics.get(name))
        except (TypeError, ValueError):  # missing, None or not a number: ranked last
            return -math.inf
        return -math.inf if math.isnan(v) else v

    return get


def _best(metas: dict[int, dict], metric: str) -> int | None:
    """The step with the highest `metas[step]["metrics"][metric]`, the later on ties; None if
    no step has a number there."""
    get = _metric_getter(metric)
    best, best_value = None, -math.inf
    for step in sorted(metas):
        metrics = metas[step].get("metrics")
        value = get(metrics if isinstance(metrics, dict) else {})
        if value >= best_value and value > -math.inf:
            best, best_value = step, value
    return best


class Checkpointer:
    """Save/restore composite checkpoints in `directory` (created if missing)."""

    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        best_metrics: Sequence[str] = (),
        keep_latest: int = 1,
        read_only: bool = False,
    ):
        if keep_latest < 1:  # the step just saved must survive its own save: resume needs it
            raise ValueError(f"keep_latest must be at least 1, got {keep_latest}")
        self.directory = pathlib.Path(directory).absolute()
        self.best_metrics = tuple(best_metrics)
        self.keep_latest = keep_latest
        self.read_only = read_only
        # Listed before orbax removes them (it does so while the manager is created).
        unfinished = sorted(
            p
            for p in (self.directory.iterdir() if self.directory.is_dir() else ())
            if _TMP in p.name and p.is_dir() and not p.is_symlink()
        )
        # Orbax keeps everything; `_retain` deletes. Orbax's BestN ranks the metrics given to
        # `save`, which it writes to disk only with `best_fn` (one metric, no ties rule), so
        # steps reloaded after a restart had none and were deleted. The meta is always on disk.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.PreserveAll(),
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=False,
            # Safe: one writer per directory, and a read-only one (evaluation next to a
            # running training) never cleans, so no save in progress loses its folder.
            cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        for p in unfinished:
            logging.warning(
                "checkpoint folder %s was left half-written by an interrupted save: ignored%s",
                p,
                "" if read_only else " and removed",
            )

    def save(
        self,
        step: int,
        state: Any,
        meta: dict,
        *,
        data_iterator: Any = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Saves `step`, then deletes the steps retention no longer keeps.

        Ranking reads `meta["metrics"]`; `metrics` is unused (kept for callers' signature)."""
        del metrics
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._manager.wait_until_finished()
        self._retain()

    def _retain(self) -> None:
        """Deletes every step but the latest `keep_latest` and each best of `best_metrics`,
        through the manager so its step list stays right. A step whose meta cannot be read
        is no best candidate (as in `best_step`), so it goes unless among the latest."""
        if self.read_only:
            return
        steps = sorted(self.steps())
        metas = self.readable_metas(steps)
        keep = set(steps[-self.keep_latest :])
        keep |= {_best(metas, m) for m in self.best_metrics} - {None}
        for step in steps:
            if step not in keep:
                self._manager.delete(step)

    def steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def meta(self, step: int) -> dict:
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def best_step(self, metric: str) -> int | None:
        """The retained step with the highest `meta['metrics'][metric]`, the later on ties;
        steps whose meta cannot be read are skipped with a warning; None if no step has a
        number for `metric`."""
        return _best(self.readable_metas(self.steps()), metric)

    def readable_metas(self, steps: Sequence[int]) -> dict[int, dict]:
        """{step: meta} of the given steps whose meta reads (the others warned about)."""
        out = {}
        for step in steps:
            try:
                out[step] = self.meta(step)
            except Exception as err:  # any damage: the step is just not a candidate
                logging.warning(
                    "checkpoint folder %s is incomplete (%s): not a best-step candidate",
                    self._path(step),
                    brief(err, 300),
                )
        return out

    def has_data(self, step: int) -> bool:
        """Whether `step` holds a data iterator position (an imported checkpoint does not)."""
        return (self._path(step) / "data").is_dir()

    def restore(self, step: int, state_template: Any, *, data_iterator: Any = None):
        """(state, meta) of `step`; `data_iterator`, if given, is moved to the saved position
        when the checkpoint holds one (otherwise it stays where it is)."""
        template = _placed(state_template)
        items = {"state": ocp.args.StandardRestore(template), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None and self.has_data(step):
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**items))
        except KeyError as e:
            if "data" not in items or not self._readable_without_data(step, state_template):
                raise
            # Grain's position format depends on the pipeline (worker processes or not).
            raise ValueError(
                f"checkpoint {self.directory / str(step)}: its data position does not fit this "
                "data pipeline; resume with the data.workers it was saved with"
            ) from e
        return out["state"], dict(out["meta"])

    def restore_as_saved(self, step: int) -> tuple[dict, dict]:
        """(state, meta) of `step` without a template: the state as it was saved (nested dicts
        and lists), its arrays replicated over this run's devices. For readers that need only
        part of it (evaluation: the network, not an optimiser state whose layout may differ)."""
        items = {
            "state": ocp.args.StandardRestore(fallback_sharding=_replicated()),
            "meta": ocp.args.JsonRestore(),
        }
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], dict(out["meta"])

    def _readable_without_data(self, step: int, state_template: Any) -> bool:
        try:
            self.restore(step, state_template)
        except Exception:  # any failure: not a data-position problem
            return False
        return True

    def restore_latest(
        self, state_template: Any, *, data_iterator: Any = None
    ) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the latest complete checkpoint, as `restore` gives them
        (`data_iterator` included); None when there is none.

        A listed step that cannot be restored (files missing or truncated) is skipped with a
        warning and, unless read-only, renamed to `<step>.incomplete`. A complete step that does
        not fit `state_template` raises: that is the caller's error, not damage."""
        position = data_iterator.get_state() if hasattr(data_iterator, "get_state") else None
        for step in sorted(self.steps(), reverse=True):
            why = self._missing_items(step)
            if why is None:
                try:
                    state, meta = self.restore(step, state_template, data_iterator=data_iterator)
                    return step, state, meta
                except Exception as err:
                    why = self._damage(step)
                    if why is None:
                        raise ValueError(
                            f"checkpoint {self._path(step)} is complete but does not fit this "
                            f"run's state ({brief(err, 300)}): it was written with another "
                            "configuration or version of the code; use a new --workdir"
                        ) from err
            if position is not None:  # a failed restore may have moved it
                data_iterator.set_state(position)
            logging.warning(
                "checkpoint folder %s is incomplete (%s): skipped%s",
                self._path(step),
                why,
                "" if self.read_only else f", moved to {self._set_aside(step).name}",
            )
        return None

    def _path(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def _missing_items(self, step: int) -> str | None:
        """Items the step's own metadata lists but whose folder is gone (a missing `data`
        would otherwise pass for an imported checkpoint); None if none or unknown."""
        try:
            listed = json.loads((self._path(step) / "_CHECKPOINT_METADATA").read_text())
            listed = list(listed["item_handlers"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # no or unreadable metadata: restoring decides
        missing = [i for i in listed if not (self._path(step) / i).is_dir()]
        return f"item folders {missing} missing" if missing else None

    def _damage(self, step: int) -> str | None:
        """Why `step` cannot be read back without a template; None if it reads in full
        (then a failed restore was the template's fault). Reads everything: failures only."""
        try:
            items = {"state": ocp.args.StandardRestore(), "meta": ocp.args.JsonRestore()}
            self._manager.restore(step, args=ocp.args.Composite(**items))
            if self.has_data(step):
                files = list((self._path(step) / "data").glob("process_*.json"))
                if not files:
                    return "no data position file"
                for f in files:
                    json.loads(f.read_text())
        except Exception as err:  # whatever orbax or tensorstore raise on damage
            return brief(err, 300)
        return None

    def _set_aside(self, step: int) -> pathlib.Path:
        # Renamed rather than deleted: what is left may still be wanted (meta, a partial
        # state). The new name is no step name for orbax, so a later save at `step` does not
        # collide with it and latest/best/retention no longer see it.
        target = self.directory / f"{step}.incomplete"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}.incomplete-{n}"
        self._path(step).rename(target)
        self._manager.reload()
        return target

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
