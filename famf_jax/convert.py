"""Import the original PyTorch weights (spec famf-net-torch-keys.txt).

`from_torch(state_dict)` maps OursNet's state_dict (key -> numpy array) onto Flax variables;
`from_torch_dqn` does the same for the RDO Q-network. Both refuse a missing key, an unexpected
key or a wrong shape, naming the offending keys. torch itself is only needed to read a `.pth`
file (`load_pth`, used by `run.py --mode=import_torch`), never by the core; a `.npz` of the same
keys needs no torch.
"""

from __future__ import annotations

import pathlib
import zipfile
from collections.abc import Mapping

import flax
import jax
import numpy as np

from common.errors import brief
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
    missing = sorted(set(wanted) - given)
    unexpected = sorted(given - set(wanted) - extra_ok)
    problems = [f"missing key {k!r}" for k in missing]
    problems += [f"unexpected key {k!r}" for k in unexpected]
    out = {}
    for key, path in wanted.items():
        if key not in state_dict:
            continue
        try:
            arr = np.asarray(state_dict[key], dtype=np.float32)
        except (TypeError, ValueError):
            problems.append(f"key {key!r} is not an array ({type(state_dict[key]).__name__})")
            continue
        leaf = path[-1]
        expect = _expected_torch_shape(flat[path].shape, leaf)
        if arr.shape != expect:
            problems.append(f"key {key!r} has shape {arr.shape}, expected {expect}")
            continue
        out[path] = _to_flax(arr, leaf)
    if problems:
        raise ValueError(_problem_summary(problems, len(missing), len(unexpected), len(wanted)))
    nested = flax.traverse_util.unflatten_dict(out)
    return {col: nested[col] for col in template}


def _problem_summary(problems: list[str], missing: int, unexpected: int, wanted: int) -> str:
    """One line: the first problems by name, then how many more of each kind."""
    text = "cannot import the PyTorch weights: " + "; ".join(problems[:4])
    if len(problems) > 4:
        text += (
            f"; and {len(problems) - 4} more ({missing} of {wanted} keys missing, "
            f"{unexpected} unexpected, {len(problems) - missing - unexpected} other)"
        )
    if missing == wanted:
        text += " (none of the expected keys is there: not the original network's state_dict?)"
    return text


def _check_edge_kernels(state_dict: Mapping[str, np.ndarray]) -> None:
    gx, gy = handcrafted.gaussian_derivative_kernels()
    for key, kernel in zip(_FROZEN_EDGE_KEYS, (gx, gy)):
        if key not in state_dict:
            raise ValueError(f"cannot import the PyTorch weights: missing key {key!r}")
        try:
            w = np.asarray(state_dict[key], dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"key {key!r} is not an array") from None
        if w.shape != (3, 3, 5, 5):
            raise ValueError(f"key {key!r} has shape {w.shape}, expected (3, 3, 5, 5)")
        if not np.allclose(w, kernel[None, None], atol=1e-6):
            raise ValueError(f"key {key!r} differs from the fixed derivative-of-Gaussian kernel")


def from_torch(state_dict: Mapping[str, np.ndarray]) -> dict:
    """OursNet state_dict (numpy values) -> {'params', 'batch_stats', 'cam_stats'} of
    `FAMFNet()`; the original keeps one set of running statistics, so both sets are it."""
    # The key inside the trace: nothing compiles before the keys are checked.
    template = jax.eval_shape(lambda: init_variables(FAMFNet(), jax.random.key(0), 64))
    out = _convert(state_dict, template, set(_FROZEN_EDGE_KEYS))  # names all wrong keys
    _check_edge_kernels(state_dict)
    out["cam_stats"] = jax.tree.map(np.copy, out["batch_stats"])
    return out


def from_torch_dqn(state_dict: Mapping[str, np.ndarray], state_dim: int | None = None) -> dict:
    """DQN state_dict (numpy values) -> {'params'} of `rdo.QNetwork`."""
    from famf_jax.rdo import QNetwork, init_qnetwork

    if state_dim is None:
        if "fc.0.weight" not in state_dict:
            raise ValueError("cannot import the DQN weights: missing key 'fc.0.weight'")
        state_dim = int(np.asarray(state_dict["fc.0.weight"]).shape[1])
    template = jax.eval_shape(lambda: init_qnetwork(QNetwork(), jax.random.key(0), state_dim))
    return _convert(state_dict, {"params": template}, set())


def load_pth(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """A state_dict as numpy arrays from a PyTorch checkpoint (`.pth`, needs torch) or from a
    `.npz` of the same keys (no torch needed: `numpy.savez(f, **{k: v.numpy() ...})`).

    The file is checked before torch is imported; errors name the file and what is wrong."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_file():
        raise IsADirectoryError(f"{path} is a folder, expected a .pth or .npz file")
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"{path} is empty")
    if path.suffix == ".npz" or (head[:2] == b"PK" and _is_npz(path)):
        return _load_npz(path)
    if head[:2] == b"PK":  # torch's zip format: check the archive before torch reads it
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ValueError(f"{path} is a damaged zip archive ({e})") from None
        if bad is not None:
            raise ValueError(f"{path} is damaged: the archive member {bad} fails its checksum")
        if not any(n.endswith("data.pkl") for n in names):
            raise ValueError(f"{path} is a zip archive but not a PyTorch checkpoint (no data.pkl)")
    elif head[:1] != b"\x80":  # neither zip nor pickle (torch's legacy format)
        raise ValueError(
            f"{path} is not a PyTorch checkpoint (neither torch's zip format nor a pickle)"
        )
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"reading {path} needs torch (pip install torch), or save the state_dict as .npz"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for damaged or foreign files
        raise ValueError(f"{path} cannot be read by torch ({brief(e)})") from e
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state_dict")
    out = {}
    for k, v in obj.items():
        if not hasattr(v, "detach"):
            raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, expected a tensor")
        out[str(k)] = v.detach().cpu().numpy()
    return out


def _is_npz(path: pathlib.Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return all(n.endswith(".npy") for n in z.namelist()) and bool(z.namelist())
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def _load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except Exception as e:  # numpy raises ValueError, OSError, BadZipFile, ... for bad files
        raise ValueError(f"{path} is not a readable .npz ({brief(e)})") from e
