"""Metrics to JSONL and TensorBoard, and progress bars for long loops."""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from collections.abc import Iterable, Mapping

import jax
import numpy as np
from tqdm import tqdm

from common import atomic


def _plain(v):
    if isinstance(v, np.generic | np.ndarray):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricWriter:
    """Appends `{"step", "time", <tag>: value}` lines to `<workdir>/<name>.jsonl` and, when
    tensorboardX is installed, writes the same scalars as TensorBoard events. Only process 0
    of a run over several processes writes (the others' writer does nothing)."""

    def __init__(
        self, workdir: str | pathlib.Path, name: str = "metrics", tensorboard: bool = True
    ):
        self.path = pathlib.Path(workdir) / f"{name}.jsonl"
        self.enabled = jax.process_index() == 0
        self._tb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard" / name))
            except ImportError:  # optional
                self._tb = None

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": time.time()}
        row.update({k: _plain(v) for k, v in scalars.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                v = _plain(v)
                if isinstance(v, int | float) and v is not None:
                    self._tb.add_scalar(k, v, int(step))

    def drop_after(self, step: int) -> int:
        """Removes the JSONL rows with a step beyond `step` (a resumed run logs those steps
        again) and a line torn by a kill; returns how many. TensorBoard's event files are
        append-only: they keep the re-run steps twice."""
        if not self.enabled or not self.path.exists():
            return 0
        rows = []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append({"step": math.inf})  # torn write: dropped below
        keep = [r for r in rows if r["step"] <= step]
        if len(keep) < len(rows):
            atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        return len(rows) - len(keep)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", **kw):
    """A tqdm bar on stderr, refreshed at most once a second (readable in CI logs too); process
    0's only."""
    kw.setdefault("disable", jax.process_index() != 0)
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        file=sys.stderr,
        mininterval=1.0,
        dynamic_ncols=True,
        leave=False,
        **kw,
    )
