"""Faithful CAMs of a very confident model against PyTorch, live (needs torch).

For logit margins above about 80 the original's XGradCAM gradient is a subnormal float32,
which PyTorch keeps and XLA's CPU flushes; `famf_jax.cam` emulates PyTorch's arithmetic. This
sets conv10's bias of the parity model (`famf_torch_parity.OursNet` on the reference weights,
one generated lesion pair) so that class 0, then class 1, wins by each margin (the two
classes' maps differ: a map constant at every margin is the weights', not the margin's), and
prints the largest difference between PyTorch's CAMs (autograd, as torchcam) and faithful
`predict`'s, or whether a map is constant (NaN in PyTorch, zeros here, B20):

    python parity/confident_cams.py [--size 256]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from famf_jax import convert, inference  # noqa: E402
from parity import reference  # noqa: E402

MARGINS = (5.0, 20.0, 80.0, 85.0, 88.0, 90.0, 92.0, 94.0, 96.0, 98.0, 101.0)


def main() -> None:
    import torch

    from parity.famf_torch_parity import lesion_images, reference_model, xgradcam

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    sd, model = reference_model(args.size, args.seed)
    x1, x2 = lesion_images(1, args.size, args.seed + 1)
    t1, t2 = torch.tensor(x1), torch.tensor(x2)
    ones = torch.ones(1, args.size // 8, args.size // 8)
    with torch.no_grad():
        model(0, t1, t2, ones, ones)
        f9 = torch.cat([model.acts["fire9_1"], model.acts["fire9_2"]], 1)
        raw = model.conv10(f9).mean((2, 3))[0] - model.conv10.bias
    for winner, margin in ((c, m) for c in (0, 1) for m in MARGINS):
        bias = np.zeros(2, np.float32)
        bias[1 - winner] = float(raw[winner] - raw[1 - winner]) - margin  # `winner` by margin
        model.conv10.bias.data = torch.tensor(bias)
        probs, _ = model(0, t1, t2, ones, ones)
        cams = xgradcam(model, probs)
        variables = convert.from_torch(dict(sd, **{"conv10.bias": bias}))
        ours = inference.predict(variables, reference.nhwc(x1), reference.nhwc(x2), faithful=True)
        row = []
        for name, cam in zip(("cam_bmode", "cam_swe"), cams):
            theirs, mine = cam.numpy(), np.asarray(ours[name])
            if np.isnan(theirs).all():
                row.append(
                    f"{name} constant in PyTorch, here {'zeros' if not mine.any() else 'not'}"
                )
            else:
                row.append(f"{name} max diff {np.abs(mine - theirs).max():.2g}")
        p_o = probs[0, 1 - winner].item()
        print(f"class {winner} by {margin:5.1f}  PyTorch p_o {p_o:.3g}  " + "; ".join(row))


if __name__ == "__main__":
    main()
