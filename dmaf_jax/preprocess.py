"""Raw NIfTI downloads -> the original code base's preprocessed layout (spec sections 1.1, 1.6).

Cases are found at any depth under the raw folder (`discover`): per-case folders as in the
BraTS2020 download (nested two levels down) and the flat MyoPS release (labels in a sibling
folder) alike.

BraTS2020: per case, the four modalities stacked [FLAIR, T1ce, T1, T2], cropped to the brain's
bounding box, `data.brain_box`:
- "ours": inclusive box of the voxels where some modality is > 0, centred and widened to
  exactly `min_size` voxels per axis, kept inside the volume, zero-padded where the volume is
  smaller;
- "original": RFNet/PASSION's box exactly (`crop_box_original`: exclusive maximum, so the last
  brain slice is dropped; widened to 128 or 129; not clamped at the upper end; brain = max over
  modalities != 0). The two differ by a voxel per axis and by up to ~3e-3 in the z-scores.
Then optionally zoomed (`data.zoom`: images linear, labels by a weighted majority), z-scored
per modality inside the brain mask (sum over modalities > 0; the whole crop is transformed, so
the background becomes -mean/std), labels mapped 4 -> 3. Written as
`<out>/vol/<P><case>_vol.npy` (H, W, D, 4) float32 and `<out>/seg/<P><case>_seg.npy` (H, W, D)
uint8, P = HG_/LG_ by the original's case-number rule, plus `<out>/meta/<P><case>.json`.

MyoPS2020: per case, the three modalities [C0, DE, T2] z-scored over the voxels where their sum
is > 0, no crop (zoom in-plane only), labels 200/500/600/1220/2221 -> 1..5, written slice by
slice as `<case>_slice_<i>_vol.npy` (H, W, 1, 3) and `_seg.npy` (H, W, 1); `meta/<case>.json`.

Metadata (JSON, written atomically after the arrays): `outputs` (the names written), `settings`
(min_size, zoom, brain_box: a case done with other settings is done again), the raw files
(`reference` = the first modality, whose header predictions are written with; `raw_files`,
`label_file`), `original_shape`, `affine`, `header`, the grid (`crop`, `pad`, `cropped_shape`,
`shape`, `zoom`, `scale`, `spacing` in mm, `grid_affine`). `to_original` / `save_original` put
a prediction back into the raw geometry.

Cases run in parallel worker processes; every bad case is reported by name with its reason at
the end instead of stopping the run. `scan` finds what is wrong from the file names and headers
alone (a missing modality or label file, an unreadable header, shapes or affines that
disagree) before anything is written; what only the voxels show (a truncated file, NaNs, label
values outside the map) surfaces while a case is preprocessed.

`preprocess(..., for_prediction=True)` takes new cases to predict (`--mode=predict`): any
non-empty subset of the modality files (a missing one becomes a zero channel, recorded in the
metadata's `present`), labels ignored (a zero label array is written so the layout stays the
same), and the input files' sizes and times in the recorded settings, so changed inputs are
done again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import pathlib
import re
import shutil
from collections.abc import Iterator, Sequence

import nibabel as nib
import numpy as np

from common import atomic, nifti
from dmaf_jax.modalities import BRATS, MYOPS, DatasetSpec

HGG_LGG_RANGES = ((1, 259, "HG_"), (260, 335, "LG_"), (336, 369, "HG_"))


class CaseError(ValueError):
    """A case that cannot be preprocessed; the message is the reason."""


BRAIN_BOXES = ("ours", "original")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The preprocessing settings a case's outputs depend on (recorded in its metadata; a case
    preprocessed with other settings is done again)."""

    min_size: int = 128  # raw voxels per axis after the brain crop (BraTS)
    zoom: float = 1.0  # resampling factor after the crop (0.5: voxels twice as large)
    brain_box: str = "ours"  # ours | original (RFNet's exact box, spec 1.1)

    def __post_init__(self):
        if self.brain_box not in BRAIN_BOXES:
            raise ValueError(f"data.brain_box must be ours or original, not {self.brain_box!r}")
        if not self.zoom > 0:
            raise ValueError(f"data.zoom must be positive, not {self.zoom}")

    def record(self, spec: DatasetSpec) -> dict:
        if spec.name == BRATS.name:
            return {
                "min_size": int(self.min_size),
                "zoom": float(self.zoom),
                "brain_box": self.brain_box,
            }
        return {"zoom": float(self.zoom)}  # MyoPS: no crop


@dataclasses.dataclass
class CaseResult:
    case: str
    outputs: list[str]
    error: str | None = None
    skipped: bool = False
    note: str | None = None


@dataclasses.dataclass
class RawCase:
    """One case found under the raw folder: its modality files (by suffix; missing ones absent)
    and its label file, wherever they are."""

    name: str  # the file-name prefix, e.g. BraTS20_Training_001
    images: dict[str, pathlib.Path]
    label: pathlib.Path | None
    note: str | None = None
    shape: tuple[int, ...] | None = None  # the images' shape, once `scan` read the headers


def brats_prefix(case: str) -> str:
    """HG_ for cases 1-259 and 336-369, LG_ for 260-335 (RFNet naming); '' for other names."""
    m = re.search(r"BraTS20_Training_(\d+)$", case)
    if not m:
        return ""
    n = int(m.group(1))
    return next((p for lo, hi, p in HGG_LGG_RANGES if lo <= n <= hi), "")


def _walk_nifti(root: pathlib.Path) -> dict[pathlib.Path, list[pathlib.Path]]:
    """{folder: its NIfTI files} for every folder under `root` (hidden folders and files, as
    macOS's `__MACOSX/._*` copies in zipped downloads, skipped; symbolic links followed once)."""
    found, seen = {}, set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        niftis = sorted(
            pathlib.Path(folder) / f
            for f in files
            if f.endswith(nifti.NIFTI_SUFFIXES) and not f.startswith(".")
        )
        if niftis:
            found[pathlib.Path(folder)] = niftis
    return found


def discover(spec: DatasetSpec, raw_dir: str | pathlib.Path) -> list[RawCase]:
    """Every case under `raw_dir`, at any depth, sorted by name.

    A case is a file-name prefix P with at least one `P_<modality>.nii(.gz)`: per-case folders
    (spec 1.1, 1.6) at any depth, as in the BraTS2020 download
    (`BraTS2020_TrainingData/MICCAI_BraTS2020_TrainingData/<case>/`), and flat folders of many
    cases, as in the MyoPS release (`train25/<case>_C0.nii.gz`). The label `P_<label>.nii(.gz)`
    may be anywhere under `raw_dir` (MyoPS: `train25_myops_gd/`); a case alone in its folder
    without one takes the folder's one other NIfTI file (one BraTS2020 case names it
    `W39_1998.09.19_Segm.nii`)."""
    folders = _walk_nifti(pathlib.Path(raw_dir))
    images: dict[str, dict[str, list[pathlib.Path]]] = {}
    labels: dict[str, list[pathlib.Path]] = {}
    claimed = set()
    for files in folders.values():
        for p in files:
            stem = nifti.stem(p)
            for suffix in spec.file_suffixes:
                if stem.endswith(f"_{suffix}") and len(stem) > len(suffix) + 1:
                    images.setdefault(stem[: -len(suffix) - 1], {}).setdefault(suffix, []).append(p)
                    claimed.add(p)
            if stem.endswith(f"_{spec.label_suffix}"):
                labels.setdefault(stem[: -len(spec.label_suffix) - 1], []).append(p)
                claimed.add(p)
    cases = []
    for name in sorted(images):
        found = {k: images[name][k][0] for k in spec.file_suffixes if k in images[name]}
        notes = [
            f"{k} also at {', '.join(str(x) for x in v[1:])}"
            for k, v in images[name].items()
            if len(v) > 1
        ]
        home = next(iter(found.values())).parent
        cands = labels.get(name, [])
        label = next((x for x in cands if x.parent == home), cands[0] if cands else None)
        if len(cands) > 1:
            notes.append(f"label also at {', '.join(str(x) for x in cands if x != label)}")
        if label is None:
            alone = {
                nifti.stem(p)[: -len(s) - 1]
                for p in folders[home]
                for s in spec.file_suffixes
                if nifti.stem(p).endswith(f"_{s}")
            } == {name}
            others = [p for p in folders[home] if p not in claimed]
            if alone and len(others) == 1:
                label = others[0]
                notes.append(f"label read from {label.name}")
        cases.append(RawCase(name, found, label, "; ".join(notes) or None))
    return cases


def _unreadable(path: pathlib.Path, err: BaseException) -> CaseError:
    text = " ".join(str(err).replace(str(path), path.name).split())
    return CaseError(f"cannot read {path.name}: {type(err).__name__}: {text}")


def _read(path: pathlib.Path, dtype=np.float32):
    """`nifti.load`, a corrupt or truncated file reported by its name."""
    try:
        return nifti.load(path, dtype)
    except Exception as e:  # nibabel, gzip and zlib raise many kinds
        raise _unreadable(path, e) from e


def _header(path: pathlib.Path) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, affine) from the header alone (no voxel data read)."""
    try:
        img = nib.load(str(path))
        return tuple(int(n) for n in img.shape), np.asarray(img.affine, np.float64)
    except Exception as e:
        raise _unreadable(path, e) from e


def check_case(case: RawCase, spec: DatasetSpec, for_prediction: bool = False) -> None:
    """Raises CaseError for what the file names and headers show: a missing modality or label
    file, an unreadable header, volumes that are not 3-D, shapes or affines that disagree.
    Sets `case.shape`."""
    missing = [s for s in spec.file_suffixes if s not in case.images]
    if for_prediction:
        if len(missing) == len(spec.file_suffixes):
            raise CaseError("no modality file")
    elif missing:
        raise CaseError(f"missing modality file(s): {', '.join(missing)}")
    elif case.label is None:
        raise CaseError(f"no label file {case.name}_{spec.label_suffix}.nii(.gz)")
    first, shape, affine = None, None, None
    for p in [case.images[s] for s in spec.file_suffixes if s in case.images]:
        shp, a = _header(p)
        if len(shp) != 3:
            raise CaseError(f"{p.name} has shape {shp}, not a 3-D volume")
        if first is None:
            first, shape, affine = p, shp, a
        elif shp != shape:
            raise CaseError(f"shape {shp} of {p.name} differs from {shape} of {first.name}")
        elif not np.allclose(a, affine, atol=1e-3):
            raise CaseError(f"affine of {p.name} differs from {first.name}")
    if not for_prediction:
        shp, a = _header(case.label)
        if shp != shape:
            raise CaseError(
                f"label shape {shp} of {case.label.name} differs from image shape {shape}"
            )
        if not np.allclose(a, affine, atol=1e-3):
            raise CaseError(f"affine of the label {case.label.name} differs from the images'")
    case.shape = shape


def scan(
    spec: DatasetSpec,
    raw_dir: str | pathlib.Path,
    for_prediction: bool = False,
    what: str = "raw data folder",
) -> tuple[list[RawCase], dict[str, str]]:
    """(every case under `raw_dir` (`discover`), {case: why it cannot be preprocessed} by
    `check_case`). Reads headers only; writes nothing. `what` names the folder in errors (the
    config field it came from)."""
    raw = pathlib.Path(raw_dir)
    if not raw.exists():
        raise FileNotFoundError(f"{what} {raw} does not exist")
    if not raw.is_dir():
        raise NotADirectoryError(f"{what} {raw} is a file, not a folder of cases")
    cases = discover(spec, raw)
    if not cases:
        pattern = f"<case>_{{{','.join(spec.file_suffixes)}}}.nii(.gz)"
        others = [p for files in _walk_nifti(raw).values() for p in files]
        seen = (
            f" (its {len(others)} NIfTI files, e.g. {others[0].name}, are not named so)"
            if others
            else ""
        )
        raise FileNotFoundError(f"{what} {raw}: no case files {pattern} anywhere under it{seen}")
    problems = {}
    for case in cases:
        try:
            check_case(case, spec, for_prediction)
        except CaseError as e:
            problems[case.name] = str(e)
    return cases, problems


def output_keys(spec: DatasetSpec, case_name: str) -> str:
    """The name a raw case's outputs are known by in split lists and CSVs: BraTS the prefixed
    name, MyoPS the subject (its slices are `<subject>_slice_<i>`)."""
    return brats_prefix(case_name) + case_name if spec.name == BRATS.name else case_name


def output_names(spec: DatasetSpec, case: RawCase) -> list[str]:
    """The preprocessed names a scanned case will have (MyoPS: one per slice)."""
    key = output_keys(spec, case.name)
    if spec.name == BRATS.name:
        return [key]
    return [f"{key}_slice_{i}" for i in range(case.shape[2])] if case.shape else []


def left_out(failed: dict[str, str], limit: int = 8) -> str:
    """'3 cases left out: A (why), B (why), C (why)', the first `limit` named."""
    items = [f"{c} ({why})" for c, why in sorted(failed.items())]
    more = f", and {len(items) - limit} more (see the warnings above)" if len(items) > limit else ""
    n = len(items)
    return f"{n} case{'s' if n != 1 else ''} left out: " + ", ".join(items[:limit]) + more


@contextlib.contextmanager
def removed_on_error(*folders: str | pathlib.Path) -> Iterator[None]:
    """Removes again, if the block raises, each of `folders` (or its first missing ancestor)
    that did not exist when the block began: a failed run leaves no folder of its own behind.
    Folders that existed are left as they are (a preprocessed case in them is complete)."""
    new = []
    for folder in folders:
        p, top = pathlib.Path(folder).absolute(), None
        while not p.exists() and not p.is_symlink() and p != p.parent:
            top, p = p, p.parent
        if top is not None and top not in new:
            new.append(top)
    try:
        yield
    except Exception:
        for top in new:
            shutil.rmtree(top, ignore_errors=True)
        raise


def _load_case(case: RawCase, spec: DatasetSpec, for_prediction: bool = False):
    missing = [s for s in spec.file_suffixes if s not in case.images]
    if for_prediction:  # missing modalities are zero channels; no label is read
        if len(missing) == len(spec.file_suffixes):
            raise CaseError("no modality file")
    elif missing:
        raise CaseError(f"missing modality file(s): {', '.join(missing)}")
    elif case.label is None:
        raise CaseError(f"no label file {case.name}_{spec.label_suffix}.nii(.gz)")
    images = [case.images[s] for s in spec.file_suffixes if s in case.images]
    vols, affine, header = [], None, None
    for p in images:
        data, a, h = _read(p)
        if affine is None:
            affine, header, shape = a, h, data.shape
        elif data.shape != shape:
            raise CaseError(f"shape {data.shape} of {p.name} differs from {shape}")
        elif not np.allclose(a, affine, atol=1e-3):
            raise CaseError(f"affine of {p.name} differs from {images[0].name}")
        if not np.isfinite(data).all():
            raise CaseError(f"{p.name} holds NaN or infinite values")
        vols.append(data)
    if for_prediction:
        present = iter(vols)
        vols = [
            next(present) if s in case.images else np.zeros(shape, np.float32)
            for s in spec.file_suffixes
        ]
        return np.stack(vols, axis=-1), np.zeros(shape, np.uint8), affine, header
    seg, a, _ = _read(case.label, np.float64)
    if seg.shape != shape:
        raise CaseError(f"label shape {seg.shape} differs from image shape {shape}")
    if not np.allclose(a, affine, atol=1e-3):
        raise CaseError(f"affine of the label {case.label.name} differs from the images'")
    values = np.unique(seg)
    bad = [int(v) if float(v).is_integer() else float(v) for v in values if v not in spec.label_map]
    if bad:
        raise CaseError(
            f"label values {bad[:5]} outside {sorted(spec.label_map)} in {case.label.name}"
        )
    lut = np.zeros(int(max(spec.label_map)) + 1, np.uint8)
    for raw, cls in spec.label_map.items():
        lut[raw] = cls
    seg = lut[seg.astype(np.int64)]
    return np.stack(vols, axis=-1), seg, affine, header


def crop_box(nonzero: np.ndarray, min_size: int) -> list[tuple[int, int, int, int]]:
    """Per axis (start, stop, pad_before, pad_after): the inclusive bounding box of `nonzero`,
    centred and widened to at least `min_size`, kept inside the volume, padded if the volume is
    smaller than `min_size`."""
    box = []
    for axis, dim in enumerate(nonzero.shape):
        other = tuple(a for a in range(nonzero.ndim) if a != axis)
        idx = np.nonzero(nonzero.any(axis=other))[0]
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        if dim <= min_size:
            pad = min_size - dim
            box.append((0, dim, pad // 2, pad - pad // 2))
            continue
        if hi - lo < min_size:
            lo -= (min_size - (hi - lo)) // 2
            lo = min(max(lo, 0), dim - min_size)
            hi = lo + min_size
        box.append((lo, hi, 0, 0))
    return box


def crop_box_original(nonzero: np.ndarray, min_size: int) -> list[tuple[int, int, int, int]]:
    """The original's box (RFNet/PASSION `crop` + `sup_128`, spec 1.1), exactly: per axis
    (start, stop, 0, 0) with stop the last non-zero index (exclusive, so that slice is dropped);
    a box shorter than `min_size` widened by `ecart` below and `ecart + 1` above (128 or 129
    long), shifted up when it starts below 0, never clamped at the upper end (the slice then
    ends at the volume's end); no padding."""
    box = []
    for axis, dim in enumerate(nonzero.shape):
        other = tuple(a for a in range(nonzero.ndim) if a != axis)
        idx = np.nonzero(nonzero.any(axis=other))[0]
        lo, hi = int(idx[0]), int(idx[-1])
        if hi - lo < min_size:
            ecart = int((min_size - (hi - lo)) / 2)
            hi, lo = hi + ecart + 1, lo - ecart
        if lo < 0:
            hi, lo = hi - lo, 0
        box.append((lo, min(hi, dim), 0, 0))
    return box


def apply_box(x: np.ndarray, box) -> np.ndarray:
    x = x[tuple(slice(a, b) for a, b, _, _ in box)]
    pads = [(p, q) for _, _, p, q in box] + [(0, 0)] * (x.ndim - len(box))
    return np.pad(x, pads) if any(p or q for p, q in pads) else x


def zscore(vol: np.ndarray, brain: np.ndarray, channels: Sequence[int] | None = None) -> np.ndarray:
    """Per channel (x - mean(x[brain])) / std(x[brain]) over the whole volume; only `channels`
    (default all), the others are zero (missing modalities)."""
    out = np.zeros_like(vol, dtype=np.float32)
    for k in range(vol.shape[-1]) if channels is None else channels:
        v = vol[..., k][brain]
        std = float(v.std())
        if std == 0:
            raise CaseError(f"channel {k} is constant inside the brain")
        out[..., k] = (vol[..., k] - v.mean()) / std
    return out


def zoom_shape(shape: Sequence[int], zoom: float, axes: Sequence[int]) -> tuple[int, ...]:
    """The shape after zooming `axes` by `zoom` (at least one voxel)."""
    return tuple(max(1, round(n * zoom)) if a in axes else n for a, n in enumerate(shape))


def resample_image(vol: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(..., C) -> (*shape, C) float32, linear, voxel edges aligned (voxel centres at
    (i + 0.5) * n_in / n_out - 0.5 of the input)."""
    from scipy import ndimage  # 0.4 s of start-up that only resampling needs

    factors = [o / i for o, i in zip(shape, vol.shape)]
    out = np.empty((*shape, vol.shape[-1]), np.float32)
    for k in range(vol.shape[-1]):
        out[..., k] = ndimage.zoom(
            vol[..., k].astype(np.float32), factors, order=1, mode="nearest", grid_mode=True
        )
    return out


def resample_labels(seg: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Labels onto `shape` by a vote weighted as linear interpolation weights (for zoom 0.5 on
    an even-sized axis: the majority of each 2 x 2 x 2 block; ties to the lower class)."""
    from scipy import ndimage

    factors = [o / i for o, i in zip(shape, seg.shape)]
    best = np.full(tuple(shape), -1.0, np.float32)
    out = np.zeros(tuple(shape), seg.dtype)
    for c in np.unique(seg):
        w = ndimage.zoom(
            (seg == c).astype(np.float32), factors, order=1, mode="nearest", grid_mode=True
        )
        win = w > best
        out[win], best[win] = c, w[win]
    return out


def nearest_indices(n_out: int, n_in: int) -> np.ndarray:
    """For each of `n_out` voxels, the nearest of `n_in` voxels spanning the same extent."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def to_original(pred: np.ndarray, meta: dict, raw_labels: bool = False) -> np.ndarray:
    """A prediction on a case's preprocessed grid -> the raw image's geometry.

    pred: (*meta["shape"]) (BraTS (H', W', D'); MyoPS the case's slices stacked on the last
    axis, (H', W', D)). The zoom is undone by nearest neighbour onto the cropped (and padded)
    grid, the padding removed, and the crop placed into a zero volume of the raw image's shape
    `meta["original_shape"]`. `raw_labels`: classes mapped back to the raw label values
    (BraTS 3 -> 4; MyoPS 1..5 -> 200..2221). Write it with
    `common.nifti.save(path, out, reference=meta["reference"])` (see `save_original`)."""
    pred = np.asarray(pred)
    if list(pred.shape) != list(meta["shape"]):
        raise ValueError(f"prediction shape {pred.shape} is not the grid's {meta['shape']}")
    for axis, (n_in, n_out) in enumerate(zip(pred.shape, meta["cropped_shape"])):
        pred = np.take(pred, nearest_indices(n_out, n_in), axis=axis)
    pred = pred[tuple(slice(p, n - q) for (p, q), n in zip(meta["pad"], pred.shape))]
    out = np.zeros(meta["original_shape"], pred.dtype)
    out[tuple(slice(a, b) for a, b in meta["crop"])] = pred
    if raw_labels:
        lut = np.zeros(int(out.max()) + 1, np.int64)
        for raw, cls in meta["label_map"].items():
            if cls < len(lut):
                lut[cls] = int(raw)
        out = lut[out].astype(np.uint8 if lut.max() < 256 else np.int16)
    return out


def save_original(path: str | pathlib.Path, pred: np.ndarray, meta: dict, raw_labels=True) -> None:
    """`to_original` written as NIfTI with the raw image's header (q/s-form codes, units,
    pixdim) and the prediction's dtype; from the recorded header fields if the raw file moved."""
    out = to_original(pred, meta, raw_labels)
    ref = pathlib.Path(meta["reference"])
    affine = np.asarray(meta["affine"])
    if ref.exists():
        nifti.save(path, out, affine, reference=ref)
    else:
        nifti.save(path, out, affine, reference=nifti.header_from_fields(meta["header"], affine))


def grid_affine(affine: np.ndarray, box, scale: Sequence[float]) -> np.ndarray:
    """The affine of the preprocessed grid: its voxel i sits at cropped coordinate
    (i + 0.5) * scale - 0.5, i.e. raw index that + start - pad_before."""
    m = np.eye(4)
    for a, ((start, _, pad, _), s) in enumerate(zip(box, scale)):
        m[a, a] = s
        m[a, 3] = start - pad + 0.5 * s - 0.5
    return np.asarray(affine, np.float64) @ m


def _write_json(path: pathlib.Path, obj: dict) -> None:
    """Temporary name + rename: a metadata file exists only complete."""
    atomic.write_json(path, obj)


def read_meta(path: pathlib.Path) -> dict | None:
    """A case's metadata, or None when absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _done(out_root: pathlib.Path, meta_path: pathlib.Path, settings: dict) -> dict | None:
    """The metadata of a case done with these settings whose outputs all exist, else None."""
    meta = read_meta(meta_path)
    if meta is None or meta.get("settings") != settings:
        return None
    if not all(_outputs_exist(out_root, n) for n in _outputs(meta)):
        return None
    return meta


def _outputs(meta: dict) -> list[str]:
    """The names a metadata file vouches for (files written before `outputs` was recorded:
    MyoPS `slices`, BraTS `name`)."""
    if "outputs" in meta:
        return meta["outputs"]
    return meta.get("slices") or ([meta["name"]] if "name" in meta else [])


def _outputs_exist(root: pathlib.Path, name: str) -> bool:
    return all((root / sub / f"{name}_{sub}.npy").exists() for sub in ("vol", "seg"))


def available_cases(root: str | pathlib.Path) -> list[str]:
    """Names ready for training under a preprocessed `root`, sorted: with our `meta/` folder,
    the outputs of every readable metadata file whose volume and label exist (a case cut short
    is left out); without it (another code base's arrays), every name with both `vol/` and
    `seg/` files."""
    root = pathlib.Path(root)
    meta_dir = root / "meta"
    if meta_dir.is_dir():
        names = set()
        for p in meta_dir.glob("*.json"):
            meta = read_meta(p)
            if meta:
                names.update(n for n in _outputs(meta) if _outputs_exist(root, n))
        return sorted(names)
    vols = {p.name[: -len("_vol.npy")] for p in (root / "vol").glob("*_vol.npy")}
    return sorted(n for n in vols if (root / "seg" / f"{n}_seg.npy").exists())


def _write(out_root: pathlib.Path, name: str, vol: np.ndarray, seg: np.ndarray) -> None:
    for sub, arr in (("vol", vol), ("seg", seg)):
        path = out_root / sub / f"{name}_{sub}.npy"
        with atomic.path(path) as tmp:
            np.save(tmp, arr)


def _present_channels(case: RawCase, spec: DatasetSpec) -> list[int]:
    return [k for k, s in enumerate(spec.file_suffixes) if s in case.images]


def _record(case: RawCase, spec: DatasetSpec, settings: Settings, for_prediction: bool) -> dict:
    """The recorded settings; for prediction also the inputs (a changed file is done again)."""
    record = settings.record(spec)
    if for_prediction:
        record["inputs"] = {
            s: [str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
            for s, p in case.images.items()
        }
    return record


def _case_meta(
    case: RawCase, spec: DatasetSpec, affine, header, settings: Settings, for_prediction=False
) -> dict:
    """What is needed to put a prediction back into the case's original geometry."""
    first = next(s for s in spec.file_suffixes if s in case.images)
    return {
        "case": case.name,
        "modalities": list(spec.modalities),
        "original_shape": header["shape"],
        "affine": np.asarray(affine).tolist(),
        "header": header,
        "reference": str(case.images[first].resolve()),
        "raw_files": {s: str(p.resolve()) for s, p in case.images.items()},
        "label_file": None if for_prediction else str(case.label.resolve()),
        "label_map": {str(k): v for k, v in spec.label_map.items()},
        "note": case.note,
        "settings": _record(case, spec, settings, for_prediction),
        "present": [s in case.images for s in spec.file_suffixes],  # per modality
    }


def _geometry(vol, seg, box, affine, settings: Settings, axes):
    """Zoom the cropped (vol, seg) and describe the resulting grid (metadata fields)."""
    cropped = list(seg.shape)
    shape = zoom_shape(cropped, settings.zoom, axes)
    if list(shape) != cropped:
        vol, seg = resample_image(vol, shape), resample_labels(seg, shape)
    scale = [c / n for c, n in zip(cropped, shape)]
    grid = grid_affine(affine, box, scale)
    geometry = {
        "crop": [[a, b] for a, b, _, _ in box],
        "pad": [[p, q] for _, _, p, q in box],
        "cropped_shape": cropped,
        "shape": list(shape),
        "zoom": float(settings.zoom),
        "scale": scale,
        "spacing": np.linalg.norm(grid[:3, :3], axis=0).tolist(),
        "grid_affine": grid.tolist(),
    }
    return vol, seg, geometry


def preprocess_brats_case(
    case: RawCase, out_root: pathlib.Path, settings: Settings, for_prediction: bool = False
) -> CaseResult:
    name = brats_prefix(case.name) + case.name
    meta_path = out_root / "meta" / f"{name}.json"
    if _done(out_root, meta_path, _record(case, BRATS, settings, for_prediction)):
        return CaseResult(case.name, [name], skipped=True)
    meta_path.unlink(missing_ok=True)  # outputs are rewritten below: not complete until then
    vol, seg, affine, header = _load_case(case, BRATS, for_prediction)
    if settings.brain_box == "original":
        nonzero = vol.max(axis=-1) != 0
        box_fn = crop_box_original
    else:
        nonzero = vol.max(axis=-1) > 0
        box_fn = crop_box
    if not nonzero.any():
        raise CaseError("empty brain: every voxel of every modality is zero")
    box = box_fn(nonzero, settings.min_size)
    vol, seg = apply_box(vol, box), apply_box(seg, box)
    vol, seg, geometry = _geometry(vol, seg, box, affine, settings, (0, 1, 2))
    vol = zscore(vol, vol.sum(axis=-1) > 0, _present_channels(case, BRATS))
    _write(out_root, name, vol.astype(np.float32), seg.astype(np.uint8))
    meta = _case_meta(case, BRATS, affine, header, settings, for_prediction)
    meta.update(name=name, outputs=[name], **geometry)
    _write_json(meta_path, meta)
    return CaseResult(case.name, [name], note=case.note)


def preprocess_myops_case(
    case: RawCase, out_root: pathlib.Path, settings: Settings, for_prediction: bool = False
) -> CaseResult:
    meta_path = out_root / "meta" / f"{case.name}.json"
    done = _done(out_root, meta_path, _record(case, MYOPS, settings, for_prediction))
    if done:
        return CaseResult(case.name, done["outputs"], skipped=True)
    meta_path.unlink(missing_ok=True)
    vol, seg, affine, header = _load_case(case, MYOPS, for_prediction)
    body = vol.sum(axis=-1) > 0
    if not body.any():
        raise CaseError("empty image: every voxel of every modality is zero")
    box = [(0, n, 0, 0) for n in seg.shape]  # MyoPS is not cropped
    vol, seg, geometry = _geometry(vol, seg, box, affine, settings, (0, 1))
    vol = zscore(vol, vol.sum(axis=-1) > 0, _present_channels(case, MYOPS))
    names = []
    for i in range(vol.shape[2]):
        name = f"{case.name}_slice_{i}"
        _write(
            out_root,
            name,
            vol[:, :, i : i + 1].astype(np.float32),
            seg[:, :, i : i + 1].astype(np.uint8),
        )
        names.append(name)
    meta = _case_meta(case, MYOPS, affine, header, settings, for_prediction)
    meta.update(name=case.name, outputs=names, slices=names, **geometry)
    _write_json(meta_path, meta)
    return CaseResult(case.name, names, note=case.note)


CASE_FUNCTIONS = {"brats2020": preprocess_brats_case, "myops2020": preprocess_myops_case}


def _run_case(args) -> CaseResult:
    fn_name, case, out_root, settings, *for_prediction = args
    try:
        return CASE_FUNCTIONS[fn_name](case, out_root, settings, *for_prediction)
    except CaseError as e:
        return CaseResult(case.name, [], error=str(e))
    except Exception as e:  # a corrupt file surfaces as many kinds of errors
        return CaseResult(case.name, [], error=f"{type(e).__name__}: {e}")


@dataclasses.dataclass
class Summary:
    processed: list[str]  # output names (slices for MyoPS)
    skipped: list[str]  # cases already done
    failed: dict[str, str]  # case -> reason
    notes: dict[str, str]


def preprocess(
    spec: DatasetSpec,
    raw_dir: str | pathlib.Path,
    out_root: str | pathlib.Path,
    min_size: int = 128,
    workers: int = 1,
    progress=None,
    *,
    zoom: float = 1.0,
    brain_box: str = "ours",
    for_prediction: bool = False,
    scanned: tuple[list[RawCase], dict[str, str]] | None = None,
) -> Summary:
    """Preprocess every case found under `raw_dir` (`discover`, any depth) into `out_root`;
    a case already done with the same settings is skipped. `for_prediction`: cases without
    labels and with missing modality files (module docstring). `scanned`: `scan`'s result if
    the caller has it (its failed cases are not read again)."""
    settings = Settings(int(min_size), float(zoom), brain_box)
    out = pathlib.Path(out_root)
    cases, problems = scanned or scan(spec, raw_dir, for_prediction)
    for sub in ("vol", "seg", "meta"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(spec.name, c, out, settings, for_prediction) for c in cases if c.name not in problems]
    if workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds JAX threads
        with ctx.Pool(min(workers, len(jobs))) as pool:
            it = pool.imap_unordered(_run_case, jobs)
            results = list(progress(it, total=len(jobs)) if progress else it)
    else:
        results = [_run_case(j) for j in (progress(jobs) if progress else jobs)]
    results += [CaseResult(c.name, [], error=problems[c.name]) for c in cases if c.name in problems]
    summary = Summary([], [], {}, {})
    for r in sorted(results, key=lambda r: r.case):
        if r.error:
            summary.failed[r.case] = r.error
        elif r.skipped:
            summary.skipped.append(r.case)
            summary.processed += r.outputs
        else:
            summary.processed += r.outputs
        if r.note:
            summary.notes[r.case] = r.note
    return summary
