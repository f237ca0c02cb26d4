"""Parity of `famf_jax.inference.predict(faithful=True)` with a PyTorch model of the original.

`OursNet` below is written from the specification (../shared/spec/famf-net.md, sections 2.1-2.6)
with the original's own operations: NCHW convolutions, `nn.BatchNorm2d`, `F.interpolate`,
`F.unfold` + `torch.var` for the colour moments, numpy/scipy region rules on the host,
`F.affine_grid` + `F.grid_sample` for the (axis-swapped, B3) translations, and XGradCAM by
autograd as torchcam computes it (no closed form). Its state_dict has the original's keys, so
the JAX side goes through `famf_jax.convert.from_torch` as a user's checkpoint would.

Needs torch (`pip install torch`). Run:

    python parity/famf_torch_parity.py [--size 256] [--batch 3]
    python parity/famf_torch_parity.py --size 32 --batch 3 --seed 6 --record

`--record` stores the inputs and the original's outputs in tests/data/famf_torch_reference.npz
(the weights are regenerated from the seed by `parity.reference.random_state_dict`, checked by
their fingerprint), which tests/test_torch_parity.py compares against everywhere (CI has no
torch). Seed 6: the network's own CAMs give a B-mode centre off the fallback and SWE centres
that differ between samples (seeds 0-5 at 32x32: the fallback centre or a NaN B-mode CAM for
every sample).

Prints the largest deviations and exits non-zero if a tolerance of the issue is missed:
probabilities and CAMs 1e-4, centres exact, MAF outputs 1e-3 relative.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from parity import reference  # noqa: E402
from parity.raa_reference import bmode_centre, swe_centre  # noqa: E402


class Fire(nn.Module):
    def __init__(self, cin, cout, s):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, s, 1), nn.BatchNorm2d(s), nn.ReLU())
        self.expand_1x1 = nn.Sequential(
            nn.Conv2d(s, cout // 2, 1), nn.BatchNorm2d(cout // 2), nn.ReLU()
        )
        self.expand_3x3 = nn.Sequential(
            nn.Conv2d(s, cout // 2, 3, padding=1), nn.BatchNorm2d(cout // 2), nn.ReLU()
        )

    def forward(self, x):
        x = self.squeeze(x)
        return torch.cat([self.expand_1x1(x), self.expand_3x3(x)], 1)


class GaussianEdgeExtractor(nn.Module):
    def __init__(self):
        super().__init__()
        a = torch.arange(-2.0, 3.0)
        y, x = torch.meshgrid(a, a, indexing="ij")
        g = torch.exp(-(x**2 + y**2) / 2) / (2 * math.pi)
        self.Gx_weight = nn.Parameter((-x * g).expand(3, 3, 5, 5).clone(), requires_grad=False)
        self.Gy_weight = nn.Parameter((-y * g).expand(3, 3, 5, 5).clone(), requires_grad=False)

    def forward(self, x):
        hx = F.conv2d(x, self.Gx_weight, padding=2)
        hy = F.conv2d(x, self.Gy_weight, padding=2)
        return torch.tanh(torch.sqrt(hx**2 + hy**2 + 1e-8))


def local_color_moments(x, window=5):
    b, c, h, w = x.shape
    p = F.unfold(x, window, padding=window // 2).view(b, c, window * window, h * w)
    mean = p.mean(2)
    var = p.var(2)  # unbiased, as torch.var's default
    skew = ((p - mean[:, :, None]) ** 3).mean(2) / (torch.sqrt(var) ** 3 + 1e-6)
    return torch.cat([mean, var, skew], 1).view(b, 3 * c, h, w)


class MutualAttentionRegister(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = size
        self.edge_extract = GaussianEdgeExtractor()
        self.conv1 = nn.Conv2d(3, 128, 3, padding=1)
        self.conv2 = nn.Conv2d(9, 128, 3, padding=1)
        self.relu = nn.Sequential(nn.BatchNorm2d(128), nn.ReLU6())

    def forward(self, warm, feat1, feat2, cam1, cam2, x_gray, x_swe):
        s, b = self.size, feat1.shape[0]
        edge = F.interpolate(
            self.edge_extract(x_gray), (s, s), mode="bilinear", align_corners=False
        )
        feat1_edge = F.relu6(self.conv1(edge))
        colour = F.interpolate(
            local_color_moments(x_swe), (s, s), mode="bilinear", align_corners=False
        )
        feat2_color = self.conv2(colour)
        c1 = F.interpolate(cam1[:, None], (s, s), mode="bilinear", align_corners=False)[:, 0]
        c2 = F.interpolate(cam2[:, None], (s, s), mode="bilinear", align_corners=False)[:, 0]
        mask1, mask2 = torch.zeros_like(feat1), torch.zeros_like(feat2)
        idx1, idx2 = torch.zeros(b, 2), torch.zeros(b, 2)
        half = (s // 4) // 2
        if warm:
            for i in range(b):
                # float32, as the original hands its CAM tensors to numpy and scipy
                x1, y1 = bmode_centre(c1[i].detach().numpy())
                x2, y2 = swe_centre(c2[i].detach().numpy())
                idx1[i] = torch.tensor([x1, y1], dtype=torch.float32)
                idx2[i] = torch.tensor([x2, y2], dtype=torch.float32)
                mask1[
                    i,
                    :,
                    max(0, x1 - half) : min(s, x1 + half),
                    max(0, y1 - half) : min(s, y1 + half),
                ] = 1
                mask2[
                    i,
                    :,
                    max(0, x2 - half) : min(s, x2 + half),
                    max(0, y2 - half) : min(s, y2 + half),
                ] = 1
        move2, move1 = (idx2 - idx1) / (s // 2), (idx1 - idx2) / (s // 2)
        eye = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).expand(b, 2, 2)
        theta2 = torch.cat([eye, move2[:, :, None]], 2)  # row difference on x: the B3 swap
        theta1 = torch.cat([eye, move1[:, :, None]], 2)
        grid2 = F.affine_grid(theta2, (b, 1, s, s), align_corners=False)
        grid1 = F.affine_grid(theta1, (b, 1, s, s), align_corners=False)
        feat2_move = F.grid_sample(feat2_color * mask2, grid2, align_corners=False)
        feat1_edge_move = F.grid_sample(feat1_edge * mask1, grid1, align_corners=False)
        n = s * s
        f1, f2 = feat1.view(b, 128, n), feat2.view(b, 128, n)
        f2_attn = torch.softmax(torch.bmm(feat2_move.view(b, 128, n), f1.transpose(1, 2)), -1)
        g2 = torch.bmm(f2_attn, f1).view(b, 128, s, s)
        f1_attn = torch.softmax(torch.bmm(feat1_edge_move.view(b, 128, n), f2.transpose(1, 2)), -1)
        e2 = torch.bmm(f1_attn, f2).view(b, 128, s, s)
        g2, e2 = self.relu(g2), self.relu(e2)
        extras = {"idx1": idx1, "idx2": idx2, "g2": g2, "e2": e2}
        return ((g2, e2) if warm else (feat1, feat2)), extras


class OursNet(nn.Module):
    def __init__(self, size=256):
        super().__init__()
        fires = [
            (96, 128, 16),
            (128, 128, 16),
            (128, 256, 32),
            (256, 256, 32),
            (256, 384, 48),
            (384, 384, 48),
            (384, 512, 64),
            (512, 512, 64),
        ]
        for sfx in ("1", "2"):
            setattr(
                self,
                f"stem_{sfx}",
                nn.Sequential(
                    nn.Conv2d(3, 96, 3, padding=1),
                    nn.BatchNorm2d(96),
                    nn.ReLU(),
                    nn.MaxPool2d(2, 2),
                ),
            )
            for i, (cin, cout, sq) in enumerate(fires, start=2):
                setattr(self, f"fire{i}_{sfx}", Fire(cin, cout, sq))
        self.muatt_1 = MutualAttentionRegister(size // 2)
        self.conv10 = nn.Conv2d(1024, 2, 1)
        self.acts = {}

    def stream(self, sfx, x, fused, f2):
        g = lambda i: getattr(self, f"fire{i}_{sfx}")
        f3 = g(3)(fused) + f2
        f4 = F.max_pool2d(g(4)(f3), 2)
        f5 = g(5)(f4) + f4
        f6 = g(6)(f5)
        f7 = g(7)(f6) + f6
        f8 = F.max_pool2d(g(8)(f7), 2)
        return g(9)(f8)

    def forward(self, warm, x1, x2, cam1, cam2):
        f2_1 = self.fire2_1(self.stem_1(x1))
        f2_2 = self.fire2_2(self.stem_2(x2))
        (g2, e2), extras = self.muatt_1(warm, f2_1, f2_2, cam1, cam2, x1, x2)
        f9_1 = self.stream("1", x1, g2, f2_1)
        f9_2 = self.stream("2", x2, e2, f2_2)
        self.acts = {"fire9_1": f9_1, "fire9_2": f9_2}
        for a in self.acts.values():
            if a.requires_grad:
                a.retain_grad()
        out = self.conv10(torch.cat([f9_1, f9_2], 1)).mean((2, 3))
        return torch.softmax(out, 1), extras


def xgradcam(model, probs):
    """torchcam 0.3.2's XGradCAM of the predicted class's probability, min-max normalised."""
    model.zero_grad()
    c = probs.argmax(1)
    probs.gather(1, c[:, None]).sum().backward()
    cams = []
    for name in ("fire9_1", "fire9_2"):
        a = model.acts[name]
        w = (a.grad * a).sum((2, 3)) / a.sum((2, 3))
        cam = torch.relu(torch.nansum(w[:, :, None, None] * a, 1)).detach()
        cam = cam - cam.flatten(1).min(1).values[:, None, None]
        cams.append(cam / cam.flatten(1).max(1).values[:, None, None])
    return cams


def solver_step(model, optimizer, cur, nxt=None, warm: int = 1, alpha=0.5, gamma=2.0) -> float:
    """One training step as the original's solver_1 runs it (spec 4.2), for timing: the CAM
    pass on `cur` (train-mode forward, XGradCAM by autograd), the main forward with those
    CAMs, the focal loss (variant b, alpha for both classes), backward and the optimiser's
    step; with `nxt`, then the next batch's CAM pass and forward, which the original runs for
    the DQN's next state (4 forward and 3 backward passes in all). The DQN itself (a 6 -> 5
    MLP on 8 transitions) is left out: negligible. cur, nxt: (bmode, swe, labels) tensors,
    NCHW in [-1, 1]."""
    model.train()
    x1, x2, y = cur
    h = x1.shape[-1] // 8
    ones = torch.ones(x1.shape[0], h, h)
    probs0, _ = model(0, x1, x2, ones, ones)
    cam1, cam2 = xgradcam(model, probs0)
    probs, _ = model(warm, x1, x2, cam1, cam2)
    p_true = probs.gather(1, y[:, None])[:, 0]
    loss = (-alpha * (1 - p_true) ** gamma * torch.log(p_true)).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if nxt is not None:
        n1, n2, _ = nxt
        probs_n, _ = model(0, n1, n2, ones, ones)
        cam_n1, cam_n2 = xgradcam(model, probs_n)
        model(warm, n1, n2, cam_n1, cam_n2)  # as the original: with autograd on
    return float(loss.detach())


def lesion_images(batch: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(B-mode, SWE) (B, 3, size, size) float32 in [-1, 1]: generated lesions at random places
    (famf_jax.synthetic), alternately benign and malignant, so that CAMs and centres differ
    from sample to sample (on noise a random network's CAMs barely depend on the input)."""
    from famf_jax import synthetic

    images = synthetic.make_batch(np.random.default_rng(seed), np.arange(batch) % 2, size)
    return tuple(np.ascontiguousarray(x.transpose(0, 3, 1, 2)) for x in images)


def reference_model(size: int, seed: int) -> tuple[dict, OursNet]:
    """(state_dict, the original network on it in eval mode): `reference.random_state_dict`."""
    sd = reference.random_state_dict(seed)
    model = OursNet(size)
    missing, unexpected = model.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, False)
    assert not unexpected and all(k.endswith(reference.OWN_KEYS) for k in missing), missing
    return sd, model.eval()


def torch_reference(size: int, batch: int, seed: int) -> tuple[dict, dict]:
    """(state_dict, reference): the original model on `reference.random_state_dict(seed)` and
    generated lesion pairs (`lesion_images`, seed + 1), in eval mode: `predict`'s path (CAMs by
    autograd, then the warm pass) and the warm pass on given CAMs (local peaks, unequal row
    and column shifts (B3) and the original's NaN CAM (B20), which random weights do not
    produce). Returns numpy arrays, NCHW as the original returns them."""
    sd, model = reference_model(size, seed)
    x1, x2 = lesion_images(batch, size, seed + 1)
    t1, t2 = torch.tensor(x1), torch.tensor(x2)
    h = size // 8
    probs1, _ = model(0, t1, t2, torch.ones(batch, h, h), torch.ones(batch, h, h))
    cam1, cam2 = xgradcam(model, probs1)
    cam_b, cam_s = reference.given_cams(batch, h)
    with torch.no_grad():
        probs, extras = model(1, t1, t2, cam1, cam2)
        probs_g, extras_g = model(1, t1, t2, torch.tensor(cam_b), torch.tensor(cam_s))
    ref = dict(x1=x1, x2=x2, cam_b=cam_b, cam_s=cam_s, probs=probs, cam1=cam1, cam2=cam2)
    ref["given_probs"] = probs_g
    for k in ("idx1", "idx2", "g2", "e2"):
        ref[k], ref[f"given_{k}"] = extras[k], extras_g[k]
    ref = {k: v.detach().numpy() if torch.is_tensor(v) else v for k, v in ref.items()}
    return sd, ref


def run(args) -> tuple[dict, str]:
    """({check: (value, tolerance)}, a line describing the centres)."""
    sd, ref = torch_reference(args.size, args.batch, args.seed)
    if getattr(args, "record", False):
        meta = {k: np.int64(getattr(args, k)) for k in ("size", "batch", "seed")}
        fingerprint = reference.fingerprint(sd)
        np.savez_compressed(reference.RECORDED, **ref, **meta, fingerprint=fingerprint)
    line = (
        f"{args.size}x{args.size}, batch {args.batch}; centres B-mode {ref['idx1'].tolist()}, "
        f"SWE {ref['idx2'].tolist()}; given CAMs: B-mode {ref['given_idx1'].tolist()}, "
        f"SWE {ref['given_idx2'].tolist()}"
    )
    return reference.compare(sd, ref), line


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--record",
        action="store_true",
        help=f"also write the reference outputs to {reference.RECORDED.relative_to(reference.REPO)}"
        " (CI compares against them without torch)",
    )
    args = ap.parse_args()
    checks, line = run(args)
    print(line)
    for name, (value, tol) in checks.items():
        status = "ok" if value <= tol else "FAILED"
        print(f"{name:26s} {value:.3g}  (tolerance {tol:g})  {status}")
    sys.exit(1 if reference.failures(checks) else 0)


if __name__ == "__main__":
    main()
