"""NIfTI reading and writing with the geometry kept (nibabel)."""

from __future__ import annotations

import pathlib

import nibabel as nib
import numpy as np

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def find(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
    """`<folder>/<stem>.nii.gz` or `.nii`, whichever exists."""
    for suffix in NIFTI_SUFFIXES:
        p = folder / f"{stem}{suffix}"
        if p.exists():
            return p
    return None


def is_nifti(path: pathlib.Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def stem(path: pathlib.Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load(path: str | pathlib.Path, dtype=np.float32) -> tuple[np.ndarray, np.ndarray, dict]:
    """(data, affine (4, 4), header fields) of a NIfTI file; data scaled by the header's slope."""
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj).astype(dtype)
    return data, np.asarray(img.affine, np.float64), header_fields(img)


def header_fields(img) -> dict:
    """The header fields needed to write a volume back in the original geometry (JSON-able)."""
    h = img.header
    return {
        "shape": [int(s) for s in img.shape],
        "pixdim": [float(x) for x in h["pixdim"]],
        "qform_code": int(h["qform_code"]),
        "sform_code": int(h["sform_code"]),
        "xyzt_units": int(h["xyzt_units"]),
        "datatype": str(h.get_data_dtype()),
    }


def save(path: str | pathlib.Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
