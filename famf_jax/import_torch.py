"""`run.py --mode=import_torch`: the original's .pth weights into an orbax checkpoint.

Everything is checked before anything is written: the config, that the workdir holds no
checkpoint of fold 0 yet, and that both files read and convert (errors name the file and the
keys); only then is `<workdir>/fold_0/checkpoints/0` saved (orbax writes it atomically)."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

from famf_jax import convert, rdo
from famf_jax.experiment import (
    check_workdir,
    checkpoint_steps,
    checkpointer,
    create_state,
    fold_dir,
    validate_config,
)


def _read(path: str, field: str, fn):
    """`fn(state_dict)` of the file `path`; errors carry the config field and the file."""
    try:
        state_dict = convert.load_pth(path)
    except (ValueError, OSError) as e:
        raise type(e)(f"{field} {e}") from None
    try:
        return fn(state_dict)
    except ValueError as e:
        raise ValueError(f"{field} {path}: {e}") from None


def import_checkpoint(cfg, workdir: str | pathlib.Path) -> pathlib.Path:
    """Writes fold_0's checkpoint at step 0 from `import_path` (and `import_dqn_path`)."""
    validate_config(cfg)
    if not cfg.import_path:
        raise ValueError("--mode=import_torch needs --config.import_path=<file.pth>")
    if cfg.model.modalities != "both":
        raise ValueError(
            f"model.modalities={cfg.model.modalities!r}: the original network has both streams "
            "(import with model.modalities=both)"
        )
    if cfg.import_dqn_path and not cfg.rdo.enabled:
        raise ValueError("import_dqn_path is set but rdo.enabled is False: the DQN has no place")
    workdir = check_workdir(workdir, writable=True)
    steps = checkpoint_steps(workdir, 0)
    if steps:
        raise FileExistsError(
            f"{fold_dir(workdir, 0) / 'checkpoints'} already holds checkpoints (steps {steps}): "
            "import into a new --workdir"
        )
    variables = _read(cfg.import_path, "import_path", convert.from_torch)
    q = None
    if cfg.import_dqn_path:
        dim = cfg.train.batch_size + 2  # the DQN's state: B probabilities and two class counts

        def dqn(sd):
            try:
                return convert.from_torch_dqn(sd, dim)
            except ValueError as e:
                if "has shape" not in str(e):
                    raise
                raise ValueError(f"{e} (the DQN's input is train.batch_size + 2 = {dim})") from None

        q = _read(cfg.import_dqn_path, "import_dqn_path", dqn)
    state, _ = create_state(cfg, 1)
    state = state.replace(
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        cam_stats=variables["cam_stats"],
    )
    if q is not None:
        r = rdo.find_state(state.opt_state)
        new_r = r._replace(q_params=q["params"], target_params=q["params"])
        state = state.replace(
            opt_state=jax.tree_util.tree_map(lambda x: x, _replace_rdo(state.opt_state, new_r))
        )
    state = jax.tree_util.tree_map(jnp.asarray, state)
    ckpt = checkpointer(workdir, 0)
    meta = {
        "config": cfg.to_dict(),
        "fold": 0,
        "epoch": 0,
        "step": 0,
        "warm": True,
        "metrics": None,
        "imported_from": str(cfg.import_path),
    }
    ckpt.save(0, state, meta)
    ckpt.close()
    return workdir / "fold_0" / "checkpoints"


def _replace_rdo(opt_state, new):
    if isinstance(opt_state, rdo.RDOState):
        return new
    if isinstance(opt_state, tuple) and not hasattr(opt_state, "_fields"):
        return tuple(_replace_rdo(s, new) for s in opt_state)
    return opt_state
