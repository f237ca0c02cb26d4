"""Synthetic data in the real raw layouts of BraTS2020 and MyoPS2020, for demos and tests.

BraTS: `<raw>/BraTS20_Training_XXX/BraTS20_Training_XXX_{flair,t1ce,t1,t2,seg}.nii.gz` (or the
download's nested layout, `write_brats(layout="download")`), int16 images (240 x 240 x 155 by
default) with BraTS's affine, skull-stripped (zero outside the head), labels 0/1/2/4. A
head-like ellipsoid with grey/white matter and CSF texture holds a tumour with a necrotic core
(1), an enhancing rim (4) and oedema (2) whose contrasts differ per modality as in real MRI:
oedema bright in FLAIR and T2, the rim bright in T1ce, the core dark in T1. About 1 s of CPU
per 240 x 240 x 155 case plus 0.7 s to write it (smooth fields drawn on a coarse grid).

MyoPS: `<raw>/myops_training_1XX/myops_training_1XX_{C0,DE,T2,gd}.nii.gz` (or the flat release,
`write_myops(layout="release")`), short-axis slices with LV blood pool (500), myocardium (200),
RV blood pool (600), oedema (1220) and scar (2221).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from common import nifti

# Mean intensity per tissue and modality (arbitrary units, roughly like real scans).
BRATS_TISSUE = {  # flair, t1ce, t1, t2
    "csf": (150, 250, 250, 1400),
    "grey": (620, 520, 520, 800),
    "white": (480, 700, 720, 560),
    "oedema": (1150, 480, 430, 1250),
    "enhancing": (760, 1500, 560, 850),
    "necrosis": (520, 260, 200, 1050),
}


def _upsample(field: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Linear interpolation of `field` onto `shape` (corners aligned), one axis at a time, the
    first axis last so that the one full-size pass copies contiguous slabs."""
    for axis in reversed(range(len(shape))):
        n, m = shape[axis], field.shape[axis]
        if m == n:
            continue
        pos = np.linspace(0, m - 1, n, dtype=np.float32)
        i0 = np.minimum(pos.astype(np.int64), m - 2) if m > 1 else np.zeros(n, np.int64)
        w = (pos - i0).reshape([-1 if a == axis else 1 for a in range(field.ndim)])
        lo = np.take(field, i0, axis=axis)
        hi = np.take(field, np.minimum(i0 + 1, m - 1), axis=axis)
        field = lo + w * (hi - lo)
    return field


def _smooth(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    """Unit-variance Gaussian-smoothed noise. Filtered on a grid `step` times coarser and
    upsampled linearly: the field is smooth at the scale of `sigma`, so this looks the same as
    filtering at full size and is ~50x faster at 240 x 240 x 155."""
    step = max(1, int(sigma / 1.5))
    coarse = [max(2, -(-n // step) + 1) if n > 1 else 1 for n in shape]
    field = rng.standard_normal(coarse, dtype=np.float32)
    field = ndimage.gaussian_filter(field, sigma / step, mode="wrap")
    field = _upsample(field, shape)
    sample = field[tuple(slice(None, None, max(1, n // 32)) for n in field.shape)]
    return field / (sample.std() + 1e-6)


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    """Normalised radius: < 1 inside the ellipsoid (open grids, broadcast)."""
    axes = np.ogrid[tuple(slice(0, n) for n in shape)]
    sq = sum(((g.astype(np.float32) - c) / r) ** 2 for g, c, r in zip(axes, centre, radii))
    return np.sqrt(sq)


def brats_affine(shape: Sequence[int]) -> np.ndarray:
    """BraTS's LPS-flipped 1 mm affine."""
    a = np.diag([-1.0, -1.0, 1.0, 1.0])
    a[1, 3] = shape[1] - 1
    return a


def brats_case(rng: np.random.Generator, shape=(240, 240, 155)) -> tuple[dict, np.ndarray]:
    """({modality: int16 volume}, uint8 labels in {0, 1, 2, 4}). Everything is computed inside
    the head's bounding box (about half the volume); outside it the volumes are zero."""
    shape = tuple(shape)
    s = np.array(shape, np.float32)
    centre = s / 2 + rng.uniform(-0.03, 0.03, 3) * s
    radii = s * np.array([0.36, 0.43, 0.40], np.float32)
    box = tuple(
        slice(max(0, int(c - r)), min(n, int(np.ceil(c + r)) + 1))
        for c, r, n in zip(centre, radii, shape)
    )
    origin = np.array([b.start for b in box], np.float32)
    sub = tuple(b.stop - b.start for b in box)
    head = _ellipsoid(sub, centre - origin, radii)
    texture = _smooth(rng, sub, max(1.0, s.min() / 40))
    csf = (head > 0.9) | (np.abs(texture) > 1.9)
    white = (texture > -0.2) & ~csf
    tissue = np.where(csf, 0, np.where(white, 2, 1)).astype(np.uint8)  # csf, grey, white

    t_centre = centre + rng.uniform(-0.15, 0.15, 3) * s - origin
    r = rng.uniform(0.06, 0.1) * s.min()
    lobes = 1 + 0.15 * _smooth(rng, sub, max(1.0, s.min() / 15))
    dist = _ellipsoid(sub, t_centre, r * rng.uniform(0.8, 1.2, 3)) / lobes
    outside = head >= 1
    lab = np.zeros(sub, np.uint8)
    lab[dist < rng.uniform(1.8, 2.4)] = 2
    lab[dist < 1.0] = 4
    lab[dist < rng.uniform(0.45, 0.7)] = 1
    lab[outside] = 0
    # One class index per voxel (tumour classes override tissue), looked up per modality.
    cls = np.where(lab == 0, tissue, np.array([0, 5, 3, 0, 4], np.uint8)[lab])

    names = ("csf", "grey", "white", "oedema", "enhancing", "necrosis")
    images = {}
    for k, m in enumerate(("flair", "t1ce", "t1", "t2")):
        vol = np.array([BRATS_TISSUE[n][k] for n in names], np.float32)[cls]
        sd = 0.04 * float(vol.mean()) * np.sqrt(6)
        bias = _smooth(rng, sub, s.min() / 6)
        bias *= 0.08
        bias += 1
        vol *= bias
        # Triangular noise (sum of two uniforms) of the same spread as the Gaussian it stands
        # for: five times cheaper to draw at this size.
        for sign in (sd, -sd):
            vol += sign * rng.random(sub, dtype=np.float32)
        vol[outside] = 0
        full = np.zeros(shape, np.int16)
        full[box] = np.clip(vol, 0, 32000, out=vol)
        images[m] = full
    labels = np.zeros(shape, np.uint8)
    labels[box] = lab
    return images, labels


BRATS_DOWNLOAD = ("BraTS2020_TrainingData", "MICCAI_BraTS2020_TrainingData")
MYOPS_RELEASE = ("train25", "train25_myops_gd")


def _write_cases(names, make_case, affine, where, progress=None) -> list[str]:
    """Write each case from make_case() -> {suffix: volume} to where(name, suffix) (a path)."""
    for name in progress(names) if progress else names:
        for suffix, vol in make_case().items():
            path = where(name, suffix)
            path.parent.mkdir(parents=True, exist_ok=True)
            nifti.save(path, vol, affine)
    return list(names)


def _write_brats_tables(folder: pathlib.Path, names: Sequence[str], rng) -> None:
    """The two CSVs the BraTS2020 download holds beside the case folders."""
    rows = [
        "Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,"
        "BraTS_2019_subject_ID,BraTS_2020_subject_ID"
    ]
    rows += [f"HGG,NA,NA,NA,NA,{n}" for n in names]
    (folder / "name_mapping.csv").write_text("\n".join(rows) + "\n")
    rows = ["Brats20ID,Age,Survival_days,Extent_of_Resection"]
    rows += [f"{n},{rng.uniform(30, 80):.3f},{rng.integers(50, 1500)},GTR" for n in names]
    (folder / "survival_info.csv").write_text("\n".join(rows) + "\n")


def write_brats(
    raw_dir: str | pathlib.Path,
    n_cases: int,
    shape=(240, 240, 155),
    seed: int = 0,
    first_id: int = 1,
    progress=None,
    layout: str = "cases",
) -> list[str]:
    """Write `n_cases` cases named BraTS20_Training_XXX; returns their names.

    layout "cases": `<raw>/<case>/<case>_<suffix>.nii.gz`; "download": as the BraTS2020
    download unpacks, `<raw>/BraTS2020_TrainingData/MICCAI_BraTS2020_TrainingData/<case>/...`
    beside `name_mapping.csv` and `survival_info.csv`."""
    if layout not in ("cases", "download"):
        raise ValueError(f"BraTS layout must be cases or download, not {layout!r}")
    rng = np.random.default_rng(seed)
    names = [f"BraTS20_Training_{i:03d}" for i in range(first_id, first_id + n_cases)]
    root = pathlib.Path(raw_dir)
    if layout == "download":
        root = root.joinpath(*BRATS_DOWNLOAD)
        root.mkdir(parents=True, exist_ok=True)
        _write_brats_tables(root, names, np.random.default_rng(seed + 1))

    def make():
        images, labels = brats_case(rng, shape)
        return {**images, "seg": labels}

    def where(name, suffix):
        return root / name / f"{name}_{suffix}.nii.gz"

    return _write_cases(names, make, brats_affine(shape), where, progress)


def myops_case(rng: np.random.Generator, shape=(128, 128, 4)) -> tuple[dict, np.ndarray]:
    """({'C0', 'DE', 'T2': int16 volume}, int16 labels in {0, 200, 500, 600, 1220, 2221})."""
    h, w, n = shape
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    labels = np.zeros(shape, np.int16)
    body = ((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.48 * w)) ** 2 < 1
    for z in range(n):
        cy, cx = h / 2 + rng.uniform(-3, 3), w / 2 + rng.uniform(-3, 3)
        r_lv = (0.11 - 0.01 * z) * min(h, w)
        rho = np.hypot(yy - cy, xx - cx)
        theta = np.arctan2(yy - cy, xx - cx)
        lab = np.zeros((h, w), np.int16)
        rv = np.hypot(yy - cy, xx - (cx - 1.9 * r_lv)) < 1.5 * r_lv
        lab[rv] = 600
        myo = (rho >= r_lv) & (rho < r_lv * 1.45)
        lab[myo] = 200
        lab[rho < r_lv] = 500
        a0 = rng.uniform(-np.pi, np.pi)
        sector = np.abs(np.angle(np.exp(1j * (theta - a0)))) < rng.uniform(0.4, 0.9)
        lab[myo & sector] = 1220
        lab[myo & sector & (rho < r_lv * 1.25)] = 2221
        labels[:, :, z] = lab
    tissue = {  # C0 (bSSFP), DE (LGE), T2
        0: (300, 150, 250),
        200: (220, 120, 300),
        500: (900, 500, 500),
        600: (880, 480, 480),
        1220: (240, 200, 750),
        2221: (230, 950, 500),
    }
    images = {}
    for k, m in enumerate(("C0", "DE", "T2")):
        base = np.zeros(shape, np.float32)
        for value, means in tissue.items():
            base[labels == value] = means[k]
        vol = base * (1 + 0.1 * _smooth(rng, shape, 6)) + rng.normal(0, 25, shape)
        vol[~body] = 0
        images[m] = np.clip(vol, 0, 4000).astype(np.int16)
    return images, labels


def write_myops(
    raw_dir: str | pathlib.Path,
    n_cases: int,
    shape=(128, 128, 4),
    seed: int = 0,
    first_id: int = 101,
    layout: str = "cases",
) -> list[str]:
    """Write `n_cases` cases named myops_training_1XX; returns their names.

    layout "cases": `<raw>/<case>/<case>_{C0,DE,T2,gd}.nii.gz` (spec 1.6); "release": the flat
    release, `<raw>/train25/<case>_{C0,DE,T2}.nii.gz` with the labels in
    `<raw>/train25_myops_gd/<case>_gd.nii.gz`."""
    if layout not in ("cases", "release"):
        raise ValueError(f"MyoPS layout must be cases or release, not {layout!r}")
    rng = np.random.default_rng(seed)
    names = [f"myops_training_{i}" for i in range(first_id, first_id + n_cases)]
    raw = pathlib.Path(raw_dir)

    def make():
        images, labels = myops_case(rng, shape)
        return {**images, "gd": labels}

    def where(name, suffix):
        if layout == "cases":
            folder = raw / name
        else:
            folder = raw / MYOPS_RELEASE[suffix == "gd"]
        return folder / f"{name}_{suffix}.nii.gz"

    return _write_cases(names, make, np.diag([1.25, 1.25, 8.0, 1.0]), where)
