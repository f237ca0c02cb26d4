"""Grain pipelines for FAMF image pairs (spec section 1.2).

Per modality: RGB, centre crop, then a random crop (train) or a centre crop (eval), then in
training with probability `augmentation_prob` an integer rotation in [-r, r] (nearest, fill 0)
and a horizontal flip, both shared by the two modalities; then a bilinear (antialiased) resize
and normalisation to [-1, 1]. Crop sizes are fractions (the original's 900 and 600 pixels
assume its 1,000-pixel scans: 0.9 of the shorter side, then 2/3 of that). Random crops are drawn
independently per modality (faithful, B16) unless `paired_crop`.

Randomness comes only from the per-element generator Grain passes in, so batches are the same
with 0 or N worker processes. Transforms are module-level classes, so they pickle for workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np
from PIL import Image

from common import loader
from famf_jax.dataset import Record


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    image_size: int = 256
    center_crop: float = 0.9
    crop: float = 2 / 3
    paired_crop: bool = False
    augmentation_prob: float = 0.8
    rotation: int = 15


def _centre(im: Image.Image, side: int) -> Image.Image:
    """torchvision CenterCrop (zero padding when the image is smaller)."""
    w, h = im.size
    if w < side or h < side:
        canvas = Image.new("RGB", (max(w, side), max(h, side)))
        canvas.paste(im, ((max(w, side) - w) // 2, (max(h, side) - h) // 2))
        im, (w, h) = canvas, canvas.size
    top, left = int(round((h - side) / 2.0)), int(round((w - side) / 2.0))
    return im.crop((left, top, left + side, top + side))


def _load(path: str, cfg: ImageConfig) -> Image.Image:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except loader.UNREADABLE as e:
        raise loader.Unusable(f"{path}: {e}") from e
    return _centre(im, max(1, round(cfg.center_crop * min(im.size))))


def _finish(im: Image.Image, size: int) -> np.ndarray:
    im = im.resize((size, size), Image.BILINEAR)
    return (np.asarray(im, np.float32) / 255.0 - 0.5) / 0.5


class LoadPair(grain.transforms.Map):
    """Record -> dict of the two centre-cropped PIL images, label and index.

    With `records` (the dataset's list, which `index` points into), a pair whose image cannot
    be read is replaced by the next readable one (`common.loader.first_usable`) and `replaced`
    counts how many were; without (evaluation: every case counts), the error is raised."""

    def __init__(self, cfg: ImageConfig, records: Sequence[Record] = ()):
        self.cfg, self.records = cfg, tuple(records)

    def map(self, item: tuple[int, Record]) -> dict:
        index, rec = item
        if not self.records:
            return self.load(index, rec)
        out, replaced = loader.first_usable(
            lambda i: self.load(i, self.records[i]),
            index,
            len(self.records),
            lambda i: f"training pair {self.records[i].patient_id}",
        )
        return dict(out, replaced=np.int32(replaced))

    def load(self, index: int, rec: Record) -> dict:
        return {
            "bmode": _load(rec.bmode, self.cfg),
            "swe": _load(rec.swe, self.cfg),
            "label": np.int32(rec.label),
            "index": np.int32(index),
        }


class EvalTransform(grain.transforms.Map):
    def __init__(self, cfg: ImageConfig):
        self.cfg = cfg

    def map(self, el: dict) -> dict:
        out = dict(el)
        for m in ("bmode", "swe"):
            im = el[m]
            im = _centre(im, max(1, round(self.cfg.crop * im.size[0])))
            out[m] = _finish(im, self.cfg.image_size)
        return out


class TrainAugment(grain.transforms.RandomMap):
    def __init__(self, cfg: ImageConfig):
        self.cfg = cfg

    def random_map(self, el: dict, rng: np.random.Generator) -> dict:
        cfg = self.cfg
        out = dict(el)
        offsets = {}
        for m in ("bmode", "swe"):
            side = el[m].size[0]
            crop = max(1, round(cfg.crop * side))
            if cfg.paired_crop and offsets:
                top, left = next(iter(offsets.values()))
            else:
                top, left = (int(x) for x in rng.integers(0, side - crop + 1, 2))
            offsets[m] = (top, left)
            out[m] = el[m].crop((left, top, left + crop, top + crop))
        if rng.random() <= cfg.augmentation_prob:
            angle = int(rng.integers(-cfg.rotation, cfg.rotation + 1))
            flip = rng.random() < 0.5
            for m in ("bmode", "swe"):
                im = out[m].rotate(angle, resample=Image.NEAREST, expand=False, fillcolor=0)
                out[m] = im.transpose(Image.FLIP_LEFT_RIGHT) if flip else im
        for m in ("bmode", "swe"):
            out[m] = _finish(out[m], cfg.image_size)
        return out


def _source(records: Sequence[Record]) -> grain.MapDataset:
    return grain.MapDataset.source(list(enumerate(records)))


def train_dataset(
    records: Sequence[Record], cfg: ImageConfig, seed: int, epochs: int | None
) -> grain.MapDataset:
    """Shuffled (a new order each epoch) and augmented pairs; batch with `common.loader.iterate`
    and drop the remainder, so every step has the same shapes."""
    ds = _source(records).seed(seed).shuffle().repeat(epochs)
    return ds.map(LoadPair(cfg, records)).random_map(TrainAugment(cfg))


def eval_dataset(records: Sequence[Record], cfg: ImageConfig) -> grain.MapDataset:
    """In order, centre crops."""
    return _source(records).map(LoadPair(cfg)).map(EvalTransform(cfg))


def steps_per_epoch(n_records: int, batch_size: int) -> int:
    return n_records // batch_size
