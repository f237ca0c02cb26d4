"""Grain helpers shared by both models."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import grain
from absl import logging

T = TypeVar("T")

# What reading a damaged file raises: PIL and gzip (OSError, EOFError), numpy's header and
# memory-map checks (ValueError); `Unusable` is a ValueError.
UNREADABLE = (OSError, ValueError, EOFError)


class Unusable(ValueError):
    """A data element that cannot be used; the message names its file and why."""


def first_usable(
    load: Callable[[int], T], index: int, n: int, name: Callable[[int], str], tries: int = 8
) -> tuple[T, int]:
    """(load(index), 0), or, when that raises one of `UNREADABLE`, a warning naming the element
    and why and the next index (mod n) instead: (element, how many were replaced). After
    `tries` unusable elements in a row, `Unusable` naming each of them.

    A training step keeps its shapes and the pipeline its order and determinism: a damaged
    file costs one element, not the run (`common.training.train_loop` counts the replaced
    ones, carried in each element, and stops after a limit)."""
    errors = []
    for k in range(min(tries, n)):
        i = (index + k) % n
        try:
            return load(i), k
        except UNREADABLE as e:
            why = " ".join(str(e).split()) or type(e).__name__
            logging.warning("data: %s is unusable (%s); the next one is used instead", name(i), why)
            errors.append(f"{name(i)}: {why}")
    raise Unusable(f"{len(errors)} data elements in a row are unusable: " + "; ".join(errors))


def iterate(
    ds: grain.MapDataset,
    workers: int = 0,
    batch_size: int | None = None,
    drop_remainder: bool = True,
    threads: int = 2,
    buffer: int = 4,
) -> grain.IterDataset:
    """Batches of `ds` (elements when `batch_size` is None).

    Batching is done on the MapDataset, before any parallelism, so a batch holds the same
    elements whatever `workers` and `threads` are. `threads` transform elements in parallel
    inside each process (numpy releases the GIL); `workers` > 0 adds spawned processes, which
    pays off for small elements with Python-heavy transforms (JPEG decoding) but not for large
    arrays: Grain pickles each batch to the main process, about 15 batches/s of 8 MB here
    (benchmarks/dmaf_loader.py). `buffer` is the number of prefetched batches per reader.
    """
    if batch_size is not None:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer))
    if workers > 0:
        opts = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer)
        init = functools.partial(exit_with_parent, os.getpid())
        it = it.mp_prefetch(opts, worker_init_fn=init)
    return it


def exit_with_parent(parent: int, worker_index: int = 0, worker_count: int = 0) -> None:
    """In a worker process: exit as soon as `parent` (the process that started it) is gone.

    A SIGKILL of the main process leaves no chance to stop Grain's workers, which then live on
    (re-parented); a daemon thread polling the parent's pid ends them within a second. The
    pid is bound before the workers start: a worker that starts after the parent died must not
    take its new parent for it."""
    del worker_index, worker_count
    # Ctrl-C (and a scheduler's SIGTERM) reach the whole process group; the main process
    # finishes its step, saves and stops, then the watch below ends the workers. Dying
    # mid-prefetch on the signal itself would starve that last step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.getppid() != parent:
        os._exit(0)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class _Rows(grain.transforms.Map):
    """Index j of one process's stream -> element of the global stream (see process_rows)."""

    def __init__(self, ds: grain.MapDataset, batch_size: int, process: int, processes: int):
        self.ds, self.b, self.local = ds, batch_size, batch_size // processes
        self.offset = process * self.local

    def map(self, j: int):
        return self.ds[(j // self.local) * self.b + self.offset + j % self.local]


def process_rows(ds: grain.MapDataset, batch_size: int, process: int, processes: int):
    """The elements of `ds` that one process of `processes` reads when `ds` is cut into global
    batches of `batch_size`: rows [p b, (p + 1) b) of each, b = batch_size / processes, so
    batching the result by b gives this process's part of every global batch (and the
    processes' parts together are the one-process batches). One process: `ds` itself."""
    if processes == 1:
        return ds
    if batch_size % processes:
        raise ValueError(f"batch size {batch_size} does not divide by the {processes} processes")
    local = batch_size // processes
    n = len(ds) // batch_size * local
    return grain.MapDataset.range(n).map(_Rows(ds, batch_size, process, processes))
