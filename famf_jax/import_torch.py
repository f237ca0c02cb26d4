"""`run.py --mode=import_torch`: the original's .pth weights into an orbax checkpoint."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

from famf_jax import convert, rdo
from famf_jax.experiment import checkpointer, create_state


def import_checkpoint(cfg, workdir: str | pathlib.Path) -> pathlib.Path:
    """Writes fold_0's checkpoint at step 0 from `import_path` (and `import_dqn_path`)."""
    if not cfg.import_path:
        raise ValueError("--mode=import_torch needs --config.import_path=<file.pth>")
    variables = convert.from_torch(convert.load_pth(cfg.import_path))
    state, _ = create_state(cfg, 1)
    state = state.replace(
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        cam_stats=variables["cam_stats"],
    )
    if cfg.import_dqn_path:
        q = convert.from_torch_dqn(convert.load_pth(cfg.import_dqn_path), cfg.train.batch_size + 2)
        r = rdo.find_state(state.opt_state)
        if r is None:
            raise ValueError("import_dqn_path given but rdo.enabled is False")
        new_r = r._replace(q_params=q["params"], target_params=q["params"])
        state = state.replace(
            opt_state=jax.tree_util.tree_map(lambda x: x, _replace_rdo(state.opt_state, new_r))
        )
    state = jax.tree_util.tree_map(jnp.asarray, state)
    ckpt = checkpointer(pathlib.Path(workdir), 0)
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
    return pathlib.Path(workdir) / "fold_0" / "checkpoints"


def _replace_rdo(opt_state, new):
    if isinstance(opt_state, rdo.RDOState):
        return new
    if isinstance(opt_state, tuple) and not hasattr(opt_state, "_fields"):
        return tuple(_replace_rdo(s, new) for s in opt_state)
    return opt_state
