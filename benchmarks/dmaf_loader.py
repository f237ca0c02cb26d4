"""DMAF training-loader throughput: ours against the original code base's approach (target >= 3x).

Both run as Grain pipelines with the same parallelism on the same real-sized preprocessed
volumes (written once to a temporary folder), once with 2 threads in one process (our default)
and once with 2 worker processes:
- ours:     memory-mapped crop (reads only the 80^3 it needs), rotation as one gather shared by
            all channels, intensity change, flips (dmaf_jax.data.TrainTransform);
- original: np.load of the whole volume and label, then the crop, then scipy.ndimage.rotate
            (order 0) channel by channel and on the label, intensity change, flips.
Prints samples per second of each (median of repeated timed runs after a warm-up) and the ratio.

    python benchmarks/dmaf_loader.py [--cases 6] [--samples 40] [--workers 2]
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import grain  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from scipy import ndimage  # noqa: E402

from common.loader import iterate  # noqa: E402
from dmaf_jax import data  # noqa: E402
from dmaf_jax.modalities import BRATS  # noqa: E402

SHAPE = (160, 192, 144)  # a typical BraTS brain box after preprocessing


class OriginalTransform(grain.transforms.RandomMap):
    """The original loader's work per sample (RFNet/PASSION transforms), same random choices."""

    def __init__(self, crop=(80, 80, 80)):
        self.crop = crop

    def random_map(self, item, rng):
        _, case = item
        vol, seg = np.load(case.vol), np.load(case.seg)
        o = [int(rng.integers(0, s - c + 1)) for s, c in zip(seg.shape, self.crop)]
        sl = tuple(slice(a, a + c) for a, c in zip(o, self.crop))
        x, y = vol[sl], seg[sl]
        plane = data.ROTATION_PLANES[int(rng.integers(3))]
        angle = int(rng.integers(-10, 10))
        x = np.stack(
            [
                ndimage.rotate(
                    x[..., c], angle, axes=plane, reshape=False, order=0, mode="constant", cval=-1
                )
                for c in range(x.shape[-1])
            ],
            -1,
        )
        y = ndimage.rotate(y, angle, axes=plane, reshape=False, order=0, mode="constant", cval=0)
        shape = (x.shape[0], 1, 1, x.shape[-1])
        x = x * rng.uniform(0.9, 1.1, shape) + rng.uniform(-0.1, 0.1, shape)
        for axis in range(3):
            if rng.random() < 0.5:
                x, y = np.flip(x, axis), np.flip(y, axis)
        return {"image": np.ascontiguousarray(x, np.float32), "label": np.ascontiguousarray(y)}


def write_cases(root: pathlib.Path, n: int) -> list[data.Case]:
    rng = np.random.default_rng(0)
    cases = []
    for i in range(n):
        vol = rng.standard_normal(SHAPE + (4,), dtype=np.float32)
        seg = rng.integers(0, 4, SHAPE, dtype=np.uint8)
        np.save(root / f"c{i}_vol.npy", vol)
        np.save(root / f"c{i}_seg.npy", seg)
        cases.append(
            data.Case(
                f"c{i}", str(root / f"c{i}_vol.npy"), str(root / f"c{i}_seg.npy"), (True,) * 4
            )
        )
    return cases


def rate(ds: grain.MapDataset, workers: int, threads: int, samples: int, reps: int) -> float:
    """Samples per second of batch-1 training batches, as the original trains."""
    times = []
    for r in range(reps + 1):
        it = iter(iterate(ds, workers, batch_size=1, threads=threads))
        next(it)  # start-up (workers spawning) is not timed
        t0 = time.perf_counter()
        for _ in itertools.islice(it, samples):
            pass
        if r:  # the first repetition warms the page cache
            times.append(time.perf_counter() - t0)
        del it
    return samples / statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    flags.FLAGS.mark_as_parsed()
    with tempfile.TemporaryDirectory() as tmp:
        cases = write_cases(pathlib.Path(tmp), args.cases)
        source = grain.MapDataset.source(list(enumerate(cases))).seed(0).shuffle().repeat()
        ours = source.random_map(data.TrainTransform(BRATS, data.AugmentConfig()))
        original = source.random_map(OriginalTransform())
        results = {}
        for setting, (workers, threads) in {
            "2 threads": (0, args.workers),
            "2 processes": (args.workers, 1),
        }.items():
            for name, ds in (("original", original), ("ours", ours)):
                results[setting, name] = rate(ds, workers, threads, args.samples, args.reps)
                print(
                    f"{setting:12s} {name:9s} {results[setting, name]:6.2f} samples/s", flush=True
                )
    print(f"\n{args.cases} volumes {SHAPE + (4,)} float32, 80^3 crops, batch 1:")
    for setting in ("2 threads", "2 processes"):
        ratio = results[setting, "ours"] / results[setting, "original"]
        print(f"{setting:12s} ours / original: {ratio:.2f}x")
    best = max(results[k] for k in results if k[1] == "ours")
    best_orig = max(results[k] for k in results if k[1] == "original")
    print(f"best of ours / best of original: {best / best_orig:.2f}x")


if __name__ == "__main__":
    main()
