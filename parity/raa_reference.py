"""The original's region rules as plain numpy/scipy, written from spec section 2.5.

The reference the in-jit RAA is checked against (tests/test_raa.py) and the host step of the
PyTorch model of the original (famf_torch_parity.py).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, signal


def bmode_centre(f: np.ndarray, low_gradient=lambda g: g < 0.2) -> tuple[int, int]:
    """Argmax, then the bounding-box centre of its low-gradient 4-connected component (numpy's
    NaN behaviour included: an all-NaN map gives (0, 0))."""
    xm, ym = np.unravel_index(np.argmax(f), f.shape)
    gmag = np.hypot(np.gradient(f, axis=0), np.gradient(f, axis=1))
    labels, _ = ndimage.label(low_gradient(gmag))
    lab = labels[xm, ym]
    if lab == 0:
        return int(xm), int(ym)
    rows, cols = ndimage.find_objects(labels)[lab - 1]
    return (rows.start + rows.stop) // 2, (cols.start + cols.stop) // 2


def swe_centre(f: np.ndarray) -> tuple[int, int]:
    """Centre of the S/4 x S/4 window with the largest sum (scipy's convolve2d, 'valid')."""
    w = f.shape[0] // 4
    sums = signal.convolve2d(f, np.ones((w, w)), "valid")
    u, v = np.unravel_index(np.argmax(sums), sums.shape)
    return int(u) + w // 2, int(v) + w // 2
