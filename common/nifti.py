"""NIfTI reading and writing with the geometry kept (nibabel)."""

from __future__ import annotations

import pathlib

import nibabel as nib
import numpy as np

from common import atomic

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


def header_from_fields(fields: dict, affine: np.ndarray) -> nib.Nifti1Header:
    """A header rebuilt from `header_fields` (for when the reference file is gone)."""
    h = nib.Nifti1Header()
    h.set_data_shape(fields["shape"])
    h.set_qform(affine, code=int(fields["qform_code"]))
    h.set_sform(affine, code=int(fields["sform_code"]))
    h["pixdim"] = np.asarray(fields["pixdim"], np.float32)
    h["xyzt_units"] = int(fields["xyzt_units"])
    return h


def save(
    path: str | pathlib.Path,
    data: np.ndarray,
    affine: np.ndarray | None = None,
    reference: str | pathlib.Path | nib.Nifti1Header | None = None,
) -> None:
    """Write `data` as NIfTI.

    With `reference` (a NIfTI file or a header), its header is kept (q/s-form and their codes,
    units, pixdim, description) with `data`'s shape and dtype and no intensity scaling; an
    `affine` that differs from the reference's replaces both forms, keeping their codes.
    Without one, `affine` is written as q- and s-form with code 1 (scanner)."""
    data = np.asarray(data)
    if reference is None:
        if affine is None:
            raise ValueError("nifti.save needs an affine or a reference header")
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    else:
        if isinstance(reference, nib.Nifti1Header):
            header = reference.copy()
        else:
            header = nib.load(str(reference)).header.copy()
        if affine is not None and not np.allclose(affine, header.get_best_affine()):
            qcode, scode = int(header["qform_code"]), int(header["sform_code"])
            header.set_qform(affine, code=qcode)
            header.set_sform(affine, code=scode)
        pixdim = header["pixdim"].copy()
        header.set_data_shape(data.shape)  # resets the pixdim of unused dimensions
        header["pixdim"] = pixdim
        header.set_data_dtype(data.dtype)
        header.set_slope_inter(1.0, 0.0)  # the reference's scaling does not apply to labels
        img = nib.Nifti1Image(data, None, header=header)
    with atomic.path(path) as tmp:
        nib.save(img, str(tmp))
