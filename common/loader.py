"""Grain helpers shared by both models."""

from __future__ import annotations

import grain


def iterate(ds: grain.MapDataset, workers: int, buffer: int = 2) -> grain.IterDataset:
    """An iterable over `ds`, read by `workers` spawned processes when workers > 0."""
    it = ds.to_iter_dataset()
    if workers > 0:
        opts = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer)
        it = it.mp_prefetch(opts)
    return it
