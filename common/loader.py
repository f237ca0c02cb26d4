"""Grain helpers shared by both models."""

from __future__ import annotations

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
        it = it.mp_prefetch(opts)
    return it
