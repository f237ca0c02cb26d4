"""Import the original PyTorch weights (spec famf-net-torch-keys.txt).

`from_torch(state_dict)` maps OursNet's state_dict (key -> numpy array) onto Flax variables;
`from_torch_dqn` does the same for the RDO Q-network. Both refuse a missing key, an unexpected
key or a wrong shape, naming every offending key. torch itself is only needed to read a `.pth`
file (`load_pth`, used by `run.py --mode=import_torch`), never by the core.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax
import jax
import numpy as np

from famf_jax import handcrafted
from famf_jax.model import FAMFNet, init_variables

_LEAF = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
_FROZEN_EDGE_KEYS = ("muatt_1.edge_extract.Gx_weight", "muatt_1.edge_extract.Gy_weight")


def _torch_key(path: tuple[str, ...]) -> str:
    """Flax path -> PyTorch key, e.g. ('fire2_1', 'squeeze', 'bn', 'mean') ->
    'fire2_1.squeeze.1.running_mean'; the fusion's shared BN is `muatt_1.relu.0`."""
    *modules, leaf = path
    names = []
    for i, m in enumerate(modules):
        if m == "bn" and modules[0] == "muatt_1":
            names.append("relu.0")
        elif m == "fc_0" or m == "fc_2":
            names.append(m.replace("_", "."))
        elif i > 0 and m in ("conv", "bn") and modules[0] != "muatt_1":
            names.append("0" if m == "conv" else "1")
        else:
            names.append(m)
    return ".".join(names + [_LEAF[leaf]])


def _to_flax(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:  # conv (out, in, kh, kw) -> (kh, kw, in, out)
        return array.transpose(2, 3, 1, 0)
    if leaf == "kernel" and array.ndim == 2:  # linear (out, in) -> (in, out)
        return array.T
    return array


def _expected_torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _convert(state_dict: Mapping[str, np.ndarray], template: dict, extra_ok: set[str]) -> dict:
    flat = {
        (col, *path): leaf
        for col, tree in template.items()
        for path, leaf in flax.traverse_util.flatten_dict(tree).items()
    }
    wanted = {_torch_key(k[1:]): k for k in flat}
    given = {k for k in state_dict if not k.endswith("num_batches_tracked")}
    problems = [f"missing key {k!r}" for k in sorted(set(wanted) - given)]
    problems += [f"unexpected key {k!r}" for k in sorted(given - set(wanted) - extra_ok)]
    out = {}
    for key, path in wanted.items():
        if key not in state_dict:
            continue
        arr = np.asarray(state_dict[key], dtype=np.float32)
        leaf = path[-1]
        expect = _expected_torch_shape(flat[path].shape, leaf)
        if arr.shape != expect:
            problems.append(f"key {key!r} has shape {arr.shape}, expected {expect}")
            continue
        out[path] = _to_flax(arr, leaf)
    if problems:
        raise ValueError("cannot import the PyTorch weights:\n  " + "\n  ".join(problems))
    nested = flax.traverse_util.unflatten_dict(out)
    return {col: nested[col] for col in template}


def _check_edge_kernels(state_dict: Mapping[str, np.ndarray]) -> None:
    gx, gy = handcrafted.gaussian_derivative_kernels()
    for key, kernel in zip(_FROZEN_EDGE_KEYS, (gx, gy)):
        if key not in state_dict:
            raise ValueError(f"cannot import the PyTorch weights:\n  missing key {key!r}")
        w = np.asarray(state_dict[key], dtype=np.float32)
        if w.shape != (3, 3, 5, 5):
            raise ValueError(f"key {key!r} has shape {w.shape}, expected (3, 3, 5, 5)")
        if not np.allclose(w, kernel[None, None], atol=1e-6):
            raise ValueError(f"key {key!r} differs from the fixed derivative-of-Gaussian kernel")


def from_torch(state_dict: Mapping[str, np.ndarray]) -> dict:
    """OursNet state_dict (numpy values) -> {'params', 'batch_stats', 'cam_stats'} of
    `FAMFNet()`; the original keeps one set of running statistics, so both sets are it."""
    template = jax.eval_shape(lambda k: init_variables(FAMFNet(), k, 64), jax.random.key(0))
    _check_edge_kernels(state_dict)
    out = _convert(state_dict, template, set(_FROZEN_EDGE_KEYS))
    out["cam_stats"] = jax.tree.map(np.copy, out["batch_stats"])
    return out


def from_torch_dqn(state_dict: Mapping[str, np.ndarray], state_dim: int | None = None) -> dict:
    """DQN state_dict (numpy values) -> {'params'} of `rdo.QNetwork`."""
    from famf_jax.rdo import QNetwork, init_qnetwork

    if state_dim is None:
        state_dim = int(np.asarray(state_dict["fc.0.weight"]).shape[1])
    template = jax.eval_shape(lambda k: init_qnetwork(QNetwork(), k, state_dim), jax.random.key(0))
    return _convert(state_dict, {"params": template}, set())


def load_pth(path: str) -> dict[str, np.ndarray]:
    """Read a PyTorch checkpoint into numpy arrays (needs torch; optional dependency)."""
    try:
        import torch
    except ImportError as e:
        raise SystemExit("reading a .pth file needs torch: pip install torch") from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    return {k: v.detach().cpu().numpy() for k, v in obj.items()}
