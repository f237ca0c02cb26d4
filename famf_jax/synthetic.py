"""Synthetic paired B-mode / SWE data in the original on-disk layout (spec section 1.1).

Each patient gets `gray.jpg` (speckled B-mode with tissue layers and a hypoechoic lesion),
`elastic.jpg` (the B-mode in grey with a colour-coded stiffness box, jet scale, in which the
lesion appears at a shifted position, so alignment matters) and `label.npy`. Malignant lesions
tend to be irregular, taller than wide, shadowing and stiff; benign ones smooth, wide, soft. Each
cue is flipped to the other class's distribution with probability `cue_noise`, so the task is
learnable but not trivial. Class balance follows the original cohort (45 of 357 malignant).

Also written: `manifest.csv` (patient_id,bmode,swe,label,split), split lists
`splits/{train,valid,test}/<patient>`, stratified 60/20/20, `generator.json` (the seed,
patient count, image size and cue noise that drew them) and `cues.csv` (per patient, which
cues look malignant, 1, or benign, 0: the reading a model's errors are explained by).
"""

from __future__ import annotations

import csv
import json
import pathlib

import numpy as np
from PIL import Image

from famf_jax.dataset import stratified_folds

MALIGNANT_FRACTION = 45 / 357
CUE_NOISE = 0.12  # the demo's: a perfect reader of the cues reaches ROC-AUC 0.995, F1 0.94
GENERATOR_FILE = "generator.json"
CUES_FILE = "cues.csv"
CUES = ("irregular", "tall", "stiff", "shadow")  # stiff is in the SWE, the rest in the B-mode


def jet(x: np.ndarray) -> np.ndarray:
    """The jet colour map, x in [0, 1] -> RGB in [0, 1]."""
    x = np.clip(x, 0, 1)[..., None]
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return np.concatenate([r, g, b], -1)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    coarse = rng.random((cells, cells))
    im = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(im, np.float32) / 255.0


def _lesion_mask(size, cy, cx, radius, aspect, irregularity, rng) -> np.ndarray:
    """Soft mask of a star-shaped lesion: radius modulated by random harmonics."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    dy, dx = (yy - cy) * aspect, xx - cx
    theta = np.arctan2(dy, dx)
    rho = np.hypot(dy, dx)
    boundary = np.ones_like(theta)
    for k in (3, 5, 7, 11):
        boundary += irregularity / 2 * rng.uniform(-1, 1) * np.cos(k * theta + rng.uniform(0, 6.3))
    return np.clip((radius * boundary - rho) / 2.0 + 0.5, 0, 1)


def make_patient(rng: np.random.Generator, malignant: bool, size: int, cue_noise: float):
    """(bmode uint8 (S, S, 3), swe uint8 (S, S, 3)) for one patient."""
    return draw_patient(rng, malignant, size, cue_noise)[:2]


def draw_patient(rng: np.random.Generator, malignant: bool, size: int, cue_noise: float):
    """(bmode, swe, cues): the images and which cues (`CUES`, True = malignant-looking) the
    patient shows."""

    def cue(m):  # each cue independently drawn from the other class now and then
        return m if rng.random() >= cue_noise else not m

    irregular, tall, stiff, shadow = cue(malignant), cue(malignant), cue(malignant), cue(malignant)
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    radius = rng.uniform(0.07, 0.12) * size
    aspect = rng.uniform(0.75, 1.0) if tall else rng.uniform(1.3, 1.8)  # >1 flattens vertically
    irregularity = rng.uniform(0.25, 0.45) if irregular else rng.uniform(0.0, 0.08)
    lesion = _lesion_mask(size, cy, cx, radius, aspect, irregularity, rng)

    yy = np.mgrid[:size, :size][0].astype(np.float32) / size
    layers = 0.55 + 0.25 * np.sin(2 * np.pi * (yy * rng.uniform(2, 4) + rng.random()))
    tissue = layers * (0.6 + 0.6 * _smooth_noise(rng, size, 6))
    below = (np.mgrid[:size, :size][0] > cy) * np.exp(
        -(((np.mgrid[:size, :size][1] - cx) / (radius * 1.2)) ** 2)
    )
    tissue *= 1 - (0.55 if shadow else -0.25) * below
    echo = tissue * (1 - lesion * rng.uniform(0.65, 0.85))
    speckle = rng.rayleigh(0.55, (size, size))
    bmode = np.clip(echo * speckle, 0, 1.6) / 1.6
    bmode_u8 = (np.repeat(bmode[..., None], 3, -1) * 255).astype(np.uint8)

    # SWE: stiffness (kPa) on a jet scale 0..180 inside a box, over the greyscale B-mode.
    shift = rng.uniform(-0.12, 0.12, 2) * size
    swe_lesion = _lesion_mask(
        size, cy + shift[0], cx + shift[1], radius * 1.1, aspect, irregularity, rng
    )
    background = 15 + 25 * _smooth_noise(rng, size, 5)
    lesion_kpa = rng.uniform(90, 170) if stiff else rng.uniform(20, 60)
    kpa = background * (1 - swe_lesion) + lesion_kpa * swe_lesion
    kpa += rng.normal(0, 6, (size, size))
    colour = jet(kpa / 180.0)
    half = int(0.32 * size)
    by, bx = (
        int(np.clip(cy + shift[0], half, size - half)),
        int(np.clip(cx + shift[1], half, size - half)),
    )
    box = np.zeros((size, size, 1), np.float32)
    box[by - half : by + half, bx - half : bx + half] = 1
    grey = np.repeat(bmode[..., None], 3, -1) * 0.8
    swe = grey * (1 - box) + colour * box
    cues = dict(zip(CUES, (irregular, tall, stiff, shadow)))
    return bmode_u8, (np.clip(swe, 0, 1) * 255).astype(np.uint8), cues


def make_batch(
    rng: np.random.Generator, labels, size: int, cue_noise: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """In-memory (bmode, swe) (B, S, S, 3) float32 in [-1, 1], as the pipeline scales images,
    one generated patient per label (1 = malignant): for tests and parity checks."""
    pairs = [make_patient(rng, bool(y), size, cue_noise) for y in labels]
    return tuple(np.stack([p[k] for p in pairs]).astype(np.float32) / 127.5 - 1.0 for k in (0, 1))


def generate(
    out_dir: str | pathlib.Path,
    n_patients: int = 400,
    image_size: int = 320,
    seed: int = 0,
    malignant_fraction: float = MALIGNANT_FRACTION,
    cue_noise: float = CUE_NOISE,
    progress=None,
) -> pathlib.Path:
    """Write the dataset under `out_dir` (data/, splits/, cues.csv, generator.json, and
    manifest.csv last); returns the manifest."""
    out = pathlib.Path(out_dir)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_mal = max(2, round(n_patients * malignant_fraction))
    labels = np.zeros(n_patients, int)
    labels[rng.choice(n_patients, n_mal, replace=False)] = 1
    ids = [f"P{i:04d}" for i in range(n_patients)]
    it = range(n_patients) if progress is None else progress(range(n_patients))
    shown = []
    for i in it:
        bmode, swe, cues = draw_patient(rng, bool(labels[i]), image_size, cue_noise)
        shown.append(cues)
        d = data / ids[i]
        d.mkdir(exist_ok=True)
        Image.fromarray(bmode).save(d / "gray.jpg", quality=92)
        Image.fromarray(swe).save(d / "elastic.jpg", quality=92)
        np.save(d / "label.npy", np.array(float(labels[i])))
    label_of = dict(zip(ids, labels.tolist()))
    parts = stratified_folds(ids, label_of, 5, seed)
    split_of = {i: "test" for i in parts[0]}
    split_of.update({i: "valid" for i in parts[1]})
    split_of.update({i: "train" for p in parts[2:] for i in p})
    for i, s in split_of.items():
        (out / "splits" / s).mkdir(parents=True, exist_ok=True)
        (out / "splits" / s / i).touch()
    # the manifest last: its presence marks a finished set
    drawn = dict(seed=seed, patients=n_patients, image_size=image_size, cue_noise=cue_noise)
    drawn["malignant_fraction"] = malignant_fraction
    (out / GENERATOR_FILE).write_text(json.dumps(drawn))
    with (out / CUES_FILE).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", *CUES])
        for i, cues in zip(ids, shown):
            w.writerow([i, *(int(cues[c]) for c in CUES)])
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "bmode", "swe", "label", "split"])
        for i in ids:
            w.writerow([i, f"data/{i}/gray.jpg", f"data/{i}/elastic.jpg", label_of[i], split_of[i]])
    return manifest


def generator_settings(out_dir: str | pathlib.Path) -> dict | None:
    """What `generate` drew the dataset in `out_dir` with (None: not recorded there)."""
    path = pathlib.Path(out_dir) / GENERATOR_FILE
    return json.loads(path.read_text()) if path.is_file() else None
