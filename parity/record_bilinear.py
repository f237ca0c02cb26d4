"""Record PyTorch's CPU bilinear upsampling of CAM-like maps for tests/test_raa.py.

Needs torch (not a project requirement). The original upsamples its 1/8-size CAMs by 4 with
`F.interpolate(..., mode="bilinear", align_corners=False)` before the region rules, which
compare window sums and gradient magnitudes at float32 resolution: faithful RAA has to round
as PyTorch does. PyTorch runs one kernel up to output height + width = 128 and another beyond,
so the sides recorded cover both (16 and 64: the first; 68 and 128: the second):

    python parity/record_bilinear.py      # writes tests/data/torch_bilinear_x4.npz
"""

from __future__ import annotations

import pathlib

import numpy as np

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests/data/torch_bilinear_x4.npz"
SIDES = (4, 16, 17, 32)  # input sides; outputs 4x
SEED = 11


def inputs() -> dict[int, np.ndarray]:
    """(2, h, h) float32 maps in [0, 1] per input side h, from SEED."""
    rng = np.random.default_rng(SEED)
    return {h: rng.random((2, h, h)).astype(np.float32) for h in SIDES}


def upsample(x: np.ndarray) -> np.ndarray:
    import torch  # here: tests import `inputs` without torch
    import torch.nn.functional as F

    h = x.shape[-1]
    t = torch.from_numpy(x)[:, None]
    return F.interpolate(t, (4 * h, 4 * h), mode="bilinear", align_corners=False)[:, 0].numpy()


def main() -> None:
    import torch

    torch.set_num_threads(2)
    out = {f"out{h}": upsample(x) for h, x in inputs().items()}
    np.savez_compressed(OUT, seed=SEED, torch_version=torch.__version__, **out)
    print(f"wrote {OUT} (torch {torch.__version__})")


if __name__ == "__main__":
    main()
