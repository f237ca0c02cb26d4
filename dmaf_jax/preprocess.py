"""Raw NIfTI downloads -> the original code base's preprocessed layout (spec sections 1.1, 1.6).

BraTS2020: per case folder, the four modalities stacked [FLAIR, T1ce, T1, T2], cropped to the
brain's bounding box (inclusive; the original drops the last slice, an off-by-one not kept)
widened to at least `min_size` voxels per axis (zero-padded where the volume is smaller),
z-scored per modality inside the brain mask (sum over modalities > 0; the whole crop is
transformed, so the background becomes -mean/std), labels mapped 4 -> 3. Written as
`<out>/vol/<P><case>_vol.npy` (H, W, D, 4) float32 and `<out>/seg/<P><case>_seg.npy` (H, W, D)
uint8, P = HG_/LG_ by the original's case-number rule, plus `<out>/meta/<P><case>.json` with the
crop box, padding, original shape, affine and header (to put predictions back later).

MyoPS2020: per case, the three modalities [C0, DE, T2] z-scored over the voxels where their sum
is > 0, no crop, labels 200/500/600/1220/2221 -> 1..5, written slice by slice as
`<case>_slice_<i>_vol.npy` (H, W, 1, 3) and `_seg.npy` (H, W, 1).

Cases run in parallel worker processes; a case whose JSON exists is skipped; every bad case is
reported by name with its reason at the end instead of stopping the run.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import pathlib
import re

import numpy as np

from common import nifti
from dmaf_jax.modalities import BRATS, MYOPS, DatasetSpec

HGG_LGG_RANGES = ((1, 259, "HG_"), (260, 335, "LG_"), (336, 369, "HG_"))


class CaseError(ValueError):
    """A case that cannot be preprocessed; the message is the reason."""


@dataclasses.dataclass
class CaseResult:
    case: str
    outputs: list[str]
    error: str | None = None
    skipped: bool = False
    note: str | None = None


def brats_prefix(case: str) -> str:
    """HG_ for cases 1-259 and 336-369, LG_ for 260-335 (RFNet naming); '' for other names."""
    m = re.search(r"BraTS20_Training_(\d+)$", case)
    if not m:
        return ""
    n = int(m.group(1))
    return next((p for lo, hi, p in HGG_LGG_RANGES if lo <= n <= hi), "")


def find_files(
    case_dir: pathlib.Path, spec: DatasetSpec
) -> tuple[list[pathlib.Path], pathlib.Path, str | None]:
    """(modality files in channel order, label file, note). The label may be named differently
    (one case of the common BraTS2020 download): then the one other NIfTI file in the folder."""
    case = case_dir.name
    images, missing = [], []
    for suffix in spec.file_suffixes:
        p = nifti.find(case_dir, f"{case}_{suffix}")
        (images if p else missing).append(p or suffix)
    if missing:
        raise CaseError(f"missing modality file(s): {', '.join(missing)}")
    label = nifti.find(case_dir, f"{case}_{spec.label_suffix}")
    note = None
    if label is None:
        others = [p for p in sorted(case_dir.iterdir()) if nifti.is_nifti(p) and p not in images]
        if len(others) != 1:
            raise CaseError(
                f"no label file {case}_{spec.label_suffix}.nii(.gz) and "
                f"{len(others)} other NIfTI files to choose from"
            )
        label, note = others[0], f"label read from {others[0].name}"
    return images, label, note


def _load_case(case_dir: pathlib.Path, spec: DatasetSpec):
    images, label_path, note = find_files(case_dir, spec)
    vols, affine, header = [], None, None
    for p in images:
        data, a, h = nifti.load(p)
        if affine is None:
            affine, header, shape = a, h, data.shape
        elif data.shape != shape:
            raise CaseError(f"shape {data.shape} of {p.name} differs from {shape}")
        elif not np.allclose(a, affine, atol=1e-3):
            raise CaseError(f"affine of {p.name} differs from {images[0].name}")
        if not np.isfinite(data).all():
            raise CaseError(f"{p.name} holds NaN or infinite values")
        vols.append(data)
    seg, a, _ = nifti.load(label_path, np.float64)
    if seg.shape != shape:
        raise CaseError(f"label shape {seg.shape} differs from image shape {shape}")
    if not np.allclose(a, affine, atol=1e-3):
        raise CaseError(f"affine of the label {label_path.name} differs from the images'")
    values = np.unique(seg)
    bad = [int(v) if float(v).is_integer() else float(v) for v in values if v not in spec.label_map]
    if bad:
        raise CaseError(f"label values {bad[:5]} outside {sorted(spec.label_map)}")
    lut = np.zeros(int(max(spec.label_map)) + 1, np.uint8)
    for raw, cls in spec.label_map.items():
        lut[raw] = cls
    seg = lut[seg.astype(np.int64)]
    return np.stack(vols, axis=-1), seg, affine, header, note


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


def apply_box(x: np.ndarray, box) -> np.ndarray:
    x = x[tuple(slice(a, b) for a, b, _, _ in box)]
    pads = [(p, q) for _, _, p, q in box] + [(0, 0)] * (x.ndim - len(box))
    return np.pad(x, pads) if any(p or q for p, q in pads) else x


def zscore(vol: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Per channel (x - mean(x[brain])) / std(x[brain]) over the whole volume."""
    out = np.empty_like(vol, dtype=np.float32)
    for k in range(vol.shape[-1]):
        v = vol[..., k][brain]
        std = float(v.std())
        if std == 0:
            raise CaseError(f"channel {k} is constant inside the brain")
        out[..., k] = (vol[..., k] - v.mean()) / std
    return out


def _write(out_root: pathlib.Path, name: str, vol: np.ndarray, seg: np.ndarray) -> None:
    for sub, arr in (("vol", vol), ("seg", seg)):
        path = out_root / sub / f"{name}_{sub}.npy"
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, path)


def _case_meta(case_dir: pathlib.Path, spec: DatasetSpec, affine, header, note) -> dict:
    """What is needed to put a prediction back into the case's original geometry."""
    return {
        "case": case_dir.name,
        "modalities": list(spec.modalities),
        "original_shape": header["shape"],
        "affine": np.asarray(affine).tolist(),
        "header": header,
        "label_map": {str(k): v for k, v in spec.label_map.items()},
        "note": note,
    }


def preprocess_brats_case(
    case_dir: pathlib.Path, out_root: pathlib.Path, min_size: int
) -> CaseResult:
    name = brats_prefix(case_dir.name) + case_dir.name
    meta_path = out_root / "meta" / f"{name}.json"
    if meta_path.exists():
        return CaseResult(case_dir.name, [name], skipped=True)
    vol, seg, affine, header, note = _load_case(case_dir, BRATS)
    nonzero = vol.max(axis=-1) > 0
    if not nonzero.any():
        raise CaseError("empty brain: every voxel of every modality is zero")
    box = crop_box(nonzero, min_size)
    vol, seg = apply_box(vol, box), apply_box(seg, box)
    vol = zscore(vol, vol.sum(axis=-1) > 0)
    _write(out_root, name, vol.astype(np.float32), seg.astype(np.uint8))
    meta = _case_meta(case_dir, BRATS, affine, header, note)
    meta.update(
        name=name,
        crop=[[a, b] for a, b, _, _ in box],
        pad=[[p, q] for _, _, p, q in box],
        shape=list(seg.shape),
    )
    meta_path.write_text(json.dumps(meta, indent=1))
    return CaseResult(case_dir.name, [name], note=note)


def preprocess_myops_case(
    case_dir: pathlib.Path, out_root: pathlib.Path, min_size: int
) -> CaseResult:
    del min_size  # MyoPS slices are not cropped
    meta_path = out_root / "meta" / f"{case_dir.name}.json"
    if meta_path.exists():
        return CaseResult(case_dir.name, json.loads(meta_path.read_text())["slices"], skipped=True)
    vol, seg, affine, header, note = _load_case(case_dir, MYOPS)
    body = vol.sum(axis=-1) > 0
    if not body.any():
        raise CaseError("empty image: every voxel of every modality is zero")
    vol = zscore(vol, body)
    names = []
    for i in range(vol.shape[2]):
        name = f"{case_dir.name}_slice_{i}"
        _write(
            out_root,
            name,
            vol[:, :, i : i + 1].astype(np.float32),
            seg[:, :, i : i + 1].astype(np.uint8),
        )
        names.append(name)
    meta = dict(_case_meta(case_dir, MYOPS, affine, header, note), slices=names)
    meta_path.write_text(json.dumps(meta, indent=1))
    return CaseResult(case_dir.name, names, note=note)


CASE_FUNCTIONS = {"brats2020": preprocess_brats_case, "myops2020": preprocess_myops_case}


def _run_case(args) -> CaseResult:
    fn_name, case_dir, out_root, min_size = args
    try:
        return CASE_FUNCTIONS[fn_name](case_dir, out_root, min_size)
    except CaseError as e:
        return CaseResult(case_dir.name, [], error=str(e))
    except Exception as e:  # a corrupt file surfaces as many kinds of errors
        return CaseResult(case_dir.name, [], error=f"{type(e).__name__}: {e}")


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
) -> Summary:
    """Preprocess every case folder under `raw_dir` into `out_root`."""
    raw, out = pathlib.Path(raw_dir), pathlib.Path(out_root)
    if not raw.is_dir():
        raise FileNotFoundError(f"raw data folder {raw} does not exist")
    cases = sorted(p for p in raw.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not cases:
        raise FileNotFoundError(f"no case folders in {raw}")
    for sub in ("vol", "seg", "meta"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(spec.name, c, out, min_size) for c in cases]
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds JAX threads
        with ctx.Pool(workers) as pool:
            it = pool.imap_unordered(_run_case, jobs)
            results = list(progress(it, total=len(jobs)) if progress else it)
    else:
        results = [_run_case(j) for j in (progress(jobs) if progress else jobs)]
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
