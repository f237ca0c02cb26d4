"""The project's one orbax wrapper: composite checkpoints, latest + best-N retention, resume.

A checkpoint holds `state` (any pytree of arrays), `meta` (JSON: config, epoch, fold, metrics)
and, when given, `data` (a Grain iterator's position). Retention: the latest `keep_latest`
checkpoints, plus the best by each named metric (highest wins; on ties the later step, as the
original's `>=`). Only this file talks to orbax, so moving to another orbax API touches it alone.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import Any

import grain
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp


def _metric_getter(name: str):
    def get(metrics: dict) -> float:
        v = metrics.get(name, -math.inf)
        return -math.inf if v is None or math.isnan(v) else float(v)

    return get


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
        self.directory = pathlib.Path(directory).absolute()
        self.best_metrics = tuple(best_metrics)
        policies = [pp.LatestN(n=keep_latest)]
        policies += [
            pp.BestN(get_metric_fn=_metric_getter(m), n=1, keep_checkpoints_without_metrics=False)
            for m in self.best_metrics
        ]
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(
        self,
        step: int,
        state: Any,
        meta: dict,
        *,
        data_iterator: Any = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        self._manager.wait_until_finished()

    def steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def meta(self, step: int) -> dict:
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def best_step(self, metric: str) -> int | None:
        """The retained step with the highest `meta['metrics'][metric]`, the later on ties."""
        best, best_value = None, -math.inf
        for step in sorted(self.steps()):
            value = _metric_getter(metric)(self.meta(step).get("metrics") or {})
            if value >= best_value and value > -math.inf:
                best, best_value = step, value
        return best

    def has_data(self, step: int) -> bool:
        """Whether `step` holds a data iterator position (an imported checkpoint does not)."""
        return (self.directory / str(step) / "data").is_dir()

    def restore(self, step: int, state_template: Any, *, data_iterator: Any = None):
        """(state, meta) of `step`; `data_iterator`, if given, is moved to the saved position
        when the checkpoint holds one (otherwise it stays where it is)."""
        items = {"state": ocp.args.StandardRestore(state_template), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None and self.has_data(step):
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], dict(out["meta"])

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
