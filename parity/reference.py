"""The torch-free half of the FAMF-Net parity check (issue 11 item 12).

`famf_torch_parity.py` runs a PyTorch model of the original; where torch is not installed (CI)
its outputs come from `tests/data/famf_torch_reference.npz`, which it recorded. Both sides
need the same weights without storing them (1.5 M floats): `random_state_dict(seed)` draws
them with numpy from the original's key list, with random batch-norm statistics and affines so
that eval-mode batch norm matters. `compare` runs our faithful inference on those weights and
inputs and measures it against the reference outputs.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
KEYS = REPO / "tests" / "data" / "famf-net-torch-keys.txt"
RECORDED = REPO / "tests" / "data" / "famf_torch_reference.npz"
# Keys the torch model keeps for itself (a counter), and the fixed edge kernels.
OWN_KEYS = ("num_batches_tracked",)
EDGE_KEYS = ("muatt_1.edge_extract.Gx_weight", "muatt_1.edge_extract.Gy_weight")
# The tolerances: probabilities and CAMs absolute, centres exact, MAF outputs relative.
TOLERANCES = {"probs": 1e-4, "cam": 1e-4, "centre": 0, "fused": 1e-3}


def original_shapes() -> dict[str, tuple[int, ...]]:
    """OursNet's state_dict keys and shapes, from the key list (its DQN section excluded)."""
    shapes, section = {}, None
    for line in KEYS.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif line and not line.startswith("#") and section == "OursNet":
            key, rest = line.split(" ", 1)
            dims = rest.rsplit(" ", 1)[0].strip("()").replace(" ", "")
            shapes[key] = tuple(int(d) for d in dims.split(",") if d)
    return shapes


def nhwc(t) -> np.ndarray:
    """The original's NCHW arrays as this project's NHWC."""
    return np.ascontiguousarray(np.asarray(t).transpose(0, 2, 3, 1))


def random_state_dict(seed: int) -> dict[str, np.ndarray]:
    """OursNet weights, float32, in key order (deterministic per seed):
    - convolution kernels U(-sqrt(6 / fan_in), sqrt(6 / fan_in)), He's scale: with PyTorch's
      default (a sixth of that variance) 19 ReLU layers shrink the input's part of fire9 below
      the biases', and CAMs and centres come out the same for every input;
    - biases U(-0.1 / sqrt(fan_in), 0.1 / sqrt(fan_in));
    - batch norm mean 0.2 N(0, 1), variance 0.5 + U(0, 1), scale 0.8 + 0.4 U(0, 1), shift
      0.1 N(0, 1);
    - the fixed derivative-of-Gaussian edge kernels."""
    from famf_jax.handcrafted import gaussian_derivative_kernels

    rng = np.random.default_rng(seed)
    shapes = original_shapes()
    edges = dict(zip(EDGE_KEYS, gaussian_derivative_kernels()))
    sd = {}
    for key, shape in shapes.items():
        if key.endswith(OWN_KEYS):
            continue
        if key in edges:
            sd[key] = np.broadcast_to(np.asarray(edges[key], np.float32), shape).copy()
            continue
        module, name = key.rsplit(".", 1)
        if f"{module}.running_mean" in shapes:  # a batch norm
            if name == "running_mean":
                value = 0.2 * rng.standard_normal(shape)
            elif name == "running_var":
                value = 0.5 + rng.random(shape)
            elif name == "weight":
                value = 0.8 + 0.4 * rng.random(shape)
            else:
                value = 0.1 * rng.standard_normal(shape)
        else:
            fan_in = np.prod(shapes[f"{module}.weight"][1:])
            bound = np.sqrt(6.0 / fan_in) if name == "weight" else 0.1 / np.sqrt(fan_in)
            value = rng.uniform(-bound, bound, shape)
        sd[key] = value.astype(np.float32)
    return sd


def fingerprint(sd: Mapping[str, np.ndarray]) -> np.ndarray:
    """Sums and absolute sums of all weights (float64): tells "the regenerated weights are not
    the recorded ones" (a numpy or key-list change) apart from a parity failure."""
    values = list(sd.values())
    return np.array(
        [
            sum(float(v.sum(dtype=np.float64)) for v in values),
            sum(float(np.abs(v).sum(dtype=np.float64)) for v in values),
        ]
    )


def given_cams(batch: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, h, h) CAMs in [0, 1]: a one-cell spike (a local B-mode centre), smooth blobs at other
    places, and NaN maps (the original's 0/0 normalisation of a constant CAM)."""
    yy, xx = np.mgrid[:h, :h]
    cam_b = np.zeros((batch, h, h), np.float32)
    cam_s = np.zeros((batch, h, h), np.float32)
    for i in range(batch):
        kind = i % 3
        if kind == 0:
            cam_b[i, h // 4, (3 * h) // 4] = 1.0
            cam_s[i] = np.exp(-((yy - 0.8 * h) ** 2 + (xx - 0.2 * h) ** 2) / (0.02 * h * h))
        elif kind == 1:
            cam_b[i] = np.exp(-((yy - 0.3 * h) ** 2 + (xx - 0.6 * h) ** 2) / (0.05 * h * h))
            cam_s[i] = np.exp(-((yy - 0.5 * h) ** 2 + (xx - 0.75 * h) ** 2) / (0.03 * h * h))
        else:
            cam_b[i] = np.nan
            cam_s[i] = np.nan

    def norm(c):
        with np.errstate(invalid="ignore"):
            return (c - c.min((1, 2), keepdims=True)) / c.max((1, 2), keepdims=True)

    return norm(cam_b).astype(np.float32), norm(cam_s).astype(np.float32)


def compare(sd: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]) -> dict:
    """{check: (value, tolerance)} of our faithful inference against the reference outputs.

    sd: the state_dict (numpy). ref: inputs `x1`, `x2` (B, 3, H, W) in [-1, 1] and `cam_b`,
    `cam_s` (B, H/8, W/8) given CAMs; the original's outputs (NCHW as it returns them):
    `probs`, `cam1`, `cam2`, `idx1`, `idx2`, `g2`, `e2` of `predict`'s path (its own CAMs) and
    the same with a `given_` prefix for the forward pass on the given CAMs.
    """
    import jax.numpy as jnp

    from famf_jax import convert, inference
    from famf_jax.model import FAMFNet

    variables = convert.from_torch(sd)
    x1, x2 = nhwc(ref["x1"]), nhwc(ref["x2"])
    out = inference.predict(variables, x1, x2, faithful=True)
    # The original's 0/0 normalisation of an all-zero CAM gives NaN where ours gives 0.
    zero_nan = lambda c: np.nan_to_num(c, nan=0.0)  # noqa: E731
    given = FAMFNet(faithful=True).apply(
        variables,
        jnp.asarray(x1),
        jnp.asarray(x2),
        jnp.asarray(zero_nan(ref["cam_b"])),
        jnp.asarray(zero_nan(ref["cam_s"])),
        warm=True,
    )
    given = {k: np.asarray(v) for k, v in given.items()}

    def rel(a, b):
        return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))

    def absolute(a, b):
        return float(np.abs(np.asarray(a) - np.asarray(b)).max())

    def mismatches(a, b):
        return int((np.asarray(a) != np.asarray(b)).sum())

    t = TOLERANCES
    return {
        "probs max abs": (absolute(out["probs"], ref["probs"]), t["probs"]),
        "cam_bmode max abs": (absolute(out["cam_bmode"], zero_nan(ref["cam1"])), t["cam"]),
        "cam_swe max abs": (absolute(out["cam_swe"], zero_nan(ref["cam2"])), t["cam"]),
        "centre_bmode mismatches": (mismatches(out["centre_bmode"], ref["idx1"]), t["centre"]),
        "centre_swe mismatches": (mismatches(out["centre_swe"], ref["idx2"]), t["centre"]),
        "fused_bmode max rel": (rel(out["fused_bmode"], nhwc(ref["g2"])), t["fused"]),
        "fused_swe max rel": (rel(out["fused_swe"], nhwc(ref["e2"])), t["fused"]),
        "given CAMs: probs": (absolute(given["probs"], ref["given_probs"]), t["probs"]),
        "given CAMs: B-mode centres": (
            mismatches(given["centre_bmode"], ref["given_idx1"]),
            t["centre"],
        ),
        "given CAMs: SWE centres": (
            mismatches(given["centre_swe"], ref["given_idx2"]),
            t["centre"],
        ),
        "given CAMs: fused_bmode": (rel(given["fused_bmode"], nhwc(ref["given_g2"])), t["fused"]),
        "given CAMs: fused_swe": (rel(given["fused_swe"], nhwc(ref["given_e2"])), t["fused"]),
    }


def failures(checks: Mapping) -> dict:
    return {k: (v, tol) for k, (v, tol) in checks.items() if not v <= tol}
