"""Grain training pipeline for preprocessed DMAF volumes (spec sections 1.4 and 1.5).

Per sample, with the per-element generator Grain passes in (identical batches with 0 or N
workers): the training mask (the case's fixed CSV mask, a random sub-mask of it, or a random
combination), a crop read through a memory map (random corner; centred for MyoPS slices;
zero-padded where the volume is smaller), a nearest-neighbour rotation in one plane drawn from
`AugmentConfig.rotation_planes` (BraTS: (H, W), (W, D), (H, D); MyoPS: (H, W), each slice in its
own plane) by an integer angle in [-r, r) with image fill -1 and label fill 0 (the
original's scipy call, done as one gather whose index grid all channels share), the intensity
change x * s + t with s ~ U(0.9, 1.1), t ~ U(-0.1, 0.1) drawn per channel and per index along
the first axis (the original's quirk, kept; drawn after the flips here, the same in
distribution), flips of each axis with probability 1/2, and the missing modalities zeroed.
Batches (`common.loader.iterate`) hold image (B, *crop, M) float32, label (B, *crop) uint8,
mask (B, M) bool, the case index and `replaced` (B,) int32 (unusable cases replaced by the
next, see `TrainTransform`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

from common import loader
from dmaf_jax import missing
from dmaf_jax.modalities import DatasetSpec

ROTATION_PLANES = ((0, 1), (1, 2), (0, 2))  # the original's (1,0), (2,1), (2,0), sorted


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    vol: str  # path of the (H, W, D, M) float32 .npy
    seg: str  # path of the (H, W, D) uint8 .npy
    mask: tuple[bool, ...]  # the case's presence mask (all True when no CSV applies)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    crop: tuple[int, int, int] = (80, 80, 80)
    random_crop: bool = True  # False: centred crop (MyoPS)
    rotation: int = 10  # degrees; 0 disables
    rotation_planes: tuple[tuple[int, int], ...] = ROTATION_PLANES  # one drawn per sample
    intensity: float = 0.1  # scale in [1 - a, 1 + a], shift in [-a, a]; 0 disables
    flip: bool = True
    image_fill: float = -1.0  # rotation fill of the images (labels: 0)
    mask_mode: str = "fixed"  # fixed | sub | random (missing.TRAINING_MODES)
    foreground: float = 0.0  # probability of a crop centred near a random tumour voxel


def foreground_origin(
    seg_path: str, shape: Sequence[int], crop: Sequence[int], rng
) -> list[int] | None:
    """A crop start that puts a random labelled voxel inside the crop (at a random offset), or
    None when the case has no label: nnU-Net-style oversampling, not in the original."""
    seg = np.load(seg_path, mmap_mode="r")
    fg = np.flatnonzero(np.asarray(seg).reshape(-1))
    if not len(fg):
        return None
    voxel = np.unravel_index(fg[int(rng.integers(len(fg)))], shape)
    out = []
    for v, s, c in zip(voxel, shape, crop):
        if s <= c:
            out.append(-((c - s) // 2))
        else:
            lo, hi = max(0, v - c + 1), min(s - c, v)
            out.append(int(rng.integers(lo, hi + 1)))
    return out


def crop_origin(shape: Sequence[int], crop: Sequence[int], rng, random: bool) -> list[int]:
    """Start per axis; may be negative when the volume is smaller than the crop (padding)."""
    out = []
    for s, c in zip(shape, crop):
        if s <= c:
            out.append(-((c - s) // 2))
        elif random:
            out.append(int(rng.integers(0, s - c + 1)))
        else:
            out.append((s - c) // 2)
    return out


def overlap(
    origin: Sequence[int], crop: Sequence[int], shape: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(in the volume, in the crop): the slices where a crop at `origin` (starts may be
    negative) overlaps a volume of `shape`."""
    src, dst = [], []
    for o, c, s in zip(origin, crop, shape):
        lo, hi = max(o, 0), min(o + c, s)
        src.append(slice(lo, hi))
        dst.append(slice(lo - o, hi - o))
    return tuple(src), tuple(dst)


def crop_array(arr: np.ndarray, origin: Sequence[int], crop: Sequence[int], fill=0) -> np.ndarray:
    """The crop of `arr` at `origin` over its leading axes, padded with `fill` outside it."""
    src, dst = overlap(origin, crop, arr.shape)
    out = np.full(tuple(crop) + arr.shape[len(crop) :], fill, dtype=arr.dtype)
    out[dst] = arr[src]
    return out


def read_crop(path: str, origin: Sequence[int], crop: Sequence[int], fill=0) -> np.ndarray:
    """The crop of a .npy read through a memory map (only the pages it needs), padded with
    `fill` where it leaves the volume."""
    return crop_array(np.load(path, mmap_mode="r"), origin, crop, fill)


def rotation_indices(shape: Sequence[int], angle: float):
    """Source indices (rows, cols) and validity of scipy.ndimage.rotate(order=0, reshape=False)
    for a plane of `shape` (2,)."""
    a = np.deg2rad(angle)
    c, s = np.cos(a), np.sin(a)
    rot = np.array([[c, s], [-s, c]])
    size = np.asarray(shape, np.float64)
    offset = (size - 1) / 2 - rot @ ((size - 1) / 2)
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    src = np.einsum("ab,bij->aij", rot, np.stack([i, j]).astype(np.float64)) + offset[:, None, None]
    r = np.floor(src + 0.5).astype(np.int64)
    # scipy's mode='constant' fills every point whose coordinate leaves [0, n - 1].
    eps = 1e-9
    valid = (
        (src[0] >= -eps)
        & (src[0] <= size[0] - 1 + eps)
        & (src[1] >= -eps)
        & (src[1] <= size[1] - 1 + eps)
    )
    return np.clip(r[0], 0, shape[0] - 1), np.clip(r[1], 0, shape[1] - 1), valid


def rotate(x: np.ndarray, angle: float, plane: tuple[int, int], fill) -> np.ndarray:
    """Nearest-neighbour rotation of x (spatial axes first) in `plane`, one gather for all
    trailing axes."""
    a, b = plane
    v = np.moveaxis(x, (a, b), (0, 1))
    rows, cols, valid = rotation_indices(v.shape[:2], angle)
    out = v[rows, cols]
    out[~valid] = fill
    return np.moveaxis(out, (0, 1), (a, b))


def read_checked(path: str, origin, crop, fill=0) -> np.ndarray:
    """`read_crop`, with a damaged file or non-finite values as `Unusable` naming the file."""
    try:
        out = read_crop(path, origin, crop, fill)
    except loader.UNREADABLE as e:
        raise loader.Unusable(f"{path}: {e}") from e
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        raise loader.Unusable(f"{path}: NaN or infinite values")
    return out


class TrainTransform(grain.transforms.RandomMap):
    """One training sample from a (index, Case) pair; see the module docstring.

    With `cases` (the dataset's list, which `index` points into), a case whose files cannot be
    read or hold NaN is replaced by the next usable one (`common.loader.first_usable`), and the
    sample's `replaced` counts how many were; without, the error is raised."""

    def __init__(self, spec: DatasetSpec, cfg: AugmentConfig, cases: Sequence[Case] = ()):
        self.spec, self.cfg, self.cases = spec, cfg, tuple(cases)

    def random_map(self, item: tuple[int, Case], rng: np.random.Generator) -> dict:
        index, case = item
        if not self.cases:
            return self.sample(index, case, rng)
        out, replaced = loader.first_usable(
            lambda i: self.sample(i, self.cases[i], rng),
            index,
            len(self.cases),
            lambda i: f"training case {self.cases[i].name}",
        )
        return dict(out, replaced=np.int32(replaced))

    def sample(self, index: int, case: Case, rng: np.random.Generator) -> dict:
        cfg = self.cfg
        mask = missing.training_mask(self.spec, cfg.mask_mode, np.array(case.mask), rng)
        try:
            shape = np.load(case.seg, mmap_mode="r").shape
        except loader.UNREADABLE as e:
            raise loader.Unusable(f"{case.seg}: {e}") from e
        origin = None
        if cfg.foreground and rng.random() < cfg.foreground:  # no extra draw when off
            origin = foreground_origin(case.seg, shape, cfg.crop, rng)
        if origin is None:
            origin = crop_origin(shape, cfg.crop, rng, cfg.random_crop)
        image = read_checked(case.vol, origin, cfg.crop).astype(np.float32, copy=False)
        # uint8 whatever the file holds (the original's MyoPS labels are uint32)
        label = read_checked(case.seg, origin, cfg.crop).astype(np.uint8, copy=False)
        if cfg.rotation:
            planes = cfg.rotation_planes
            plane = tuple(planes[int(rng.integers(len(planes)))])
            angle = int(rng.integers(-cfg.rotation, cfg.rotation))
            if angle and min(cfg.crop[plane[0]], cfg.crop[plane[1]]) > 1:
                image = rotate(image, angle, plane, cfg.image_fill)
                label = rotate(label, angle, plane, 0)
        if cfg.flip:  # views; the intensity pass below writes the contiguous result
            for axis in range(3):
                if rng.random() < 0.5:
                    image, label = np.flip(image, axis), np.flip(label, axis)
        # The intensity change and the zeroing of missing modalities in one pass over the crop.
        keep = mask.astype(np.float32)
        if cfg.intensity:
            a = cfg.intensity
            factor_shape = (image.shape[0],) + (1,) * (image.ndim - 2) + (image.shape[-1],)
            scale = rng.uniform(1 - a, 1 + a, factor_shape).astype(np.float32) * keep
            shift = rng.uniform(-a, a, factor_shape).astype(np.float32) * keep
            image = image * scale + shift
        else:
            image = image * keep
        return {
            "image": np.ascontiguousarray(image, np.float32),
            "label": np.ascontiguousarray(label),
            "mask": mask.astype(bool),
            "index": np.int32(index),
        }


def train_dataset(
    spec: DatasetSpec,
    cases: Sequence[Case],
    cfg: AugmentConfig,
    seed: int,
    epochs: int | None = None,
) -> grain.MapDataset:
    """Shuffled (a new order each epoch) training samples; batch with `common.loader.iterate`."""
    ds = grain.MapDataset.source(list(enumerate(cases))).seed(seed).shuffle().repeat(epochs)
    return ds.random_map(TrainTransform(spec, cfg, cases))
