"""Grain helpers shared by both models."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time

import grain


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
    # Ctrl-C reaches the whole process group; the main process saves and stops, then the
    # watch below ends the workers. Dying mid-prefetch on the SIGINT itself would not help.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getppid() != parent:
        os._exit(0)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
