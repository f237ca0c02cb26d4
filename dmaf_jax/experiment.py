"""What training, evaluation and prediction of DMAF-Net all need: the model for a config, the
state template, where the checkpoints are and which one is restored.

Checkpoints live in `<workdir>/checkpoints` with the selection metric `dice` (the mean Dice of
the dataset's headline regions with all modalities present, on the validation split). The
chosen checkpoint is `eval.checkpoint` if set, else the best by validation Dice, else (no
validation split, as MyoPS's protocol, or `train.select = "last"`) the latest.
"""

from __future__ import annotations

import pathlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from common import optim
from common.checkpoint import Checkpointer
from dmaf_jax import dtms, losses
from dmaf_jax.inference import SlidingWindow
from dmaf_jax.layers import bottleneck_grid, check_crop
from dmaf_jax.modalities import SPECS, DatasetSpec
from dmaf_jax.model import DMAFNet, build_model, init_variables

SELECT_METRIC = "dice"
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# The regions whose mean Dice chooses the best checkpoint.
SELECTION_REGIONS = {"brats2020": ("wt", "tc", "et"), "myops2020": ("lvb", "rvb", "myo")}


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def spec_of(cfg) -> DatasetSpec:
    return SPECS[cfg.dataset]


def spatial_rank(cfg) -> int:
    """3 for volumes, 2 for slices (a crop whose depth is 1: MyoPS)."""
    return 2 if tuple(cfg.data.crop)[2] == 1 else 3


def model_crop(cfg) -> tuple[int, ...]:
    """The spatial shape the network sees: the crop, without MyoPS's depth of 1."""
    return tuple(cfg.data.crop)[: spatial_rank(cfg)]


def validate_config(cfg) -> None:
    """One-line errors for model and training values (the data block: dataset.validate_config)."""
    crop = model_crop(cfg)
    if 1 in crop:
        raise ValueError(f"data.crop {tuple(cfg.data.crop)}: only the depth axis may be 1 (2-D)")
    check_crop(crop, len(cfg.model.channels))
    if cfg.model.channels[-1] % losses.MAA_HEADS:
        raise ValueError(
            f"model.channels[-1] ({cfg.model.channels[-1]}) must be a multiple of "
            f"{losses.MAA_HEADS} (the attention alignment's channel groups)"
        )
    if cfg.model.token_dim % cfg.model.heads:
        raise ValueError(
            f"model.token_dim ({cfg.model.token_dim}) must be a multiple of model.heads "
            f"({cfg.model.heads})"
        )
    if cfg.train.select not in ("best", "last"):
        raise ValueError(f"train.select must be best or last, not {cfg.train.select!r}")
    for name in ("epochs", "eval_every", "log_every"):
        if cfg.train[name] < 1:
            raise ValueError(f"train.{name} must be at least 1, not {cfg.train[name]}")


def grid(cfg) -> tuple[int, ...]:
    return bottleneck_grid(model_crop(cfg), len(cfg.model.channels))


def model(cfg) -> DMAFNet:
    return build_model(cfg, spec_of(cfg))


def inference_window(cfg) -> SlidingWindow:
    """The sliding windows of validation, evaluation and prediction: the training crop, or
    only the centred crop (`eval.window = "centre"`, MyoPS's protocol)."""
    if cfg.eval.window not in ("sliding", "centre"):
        raise ValueError(f"eval.window must be sliding or centre, not {cfg.eval.window!r}")
    return SlidingWindow(
        model(cfg),
        model_crop(cfg),
        cfg.eval.windows_per_call,
        cfg.eval.overlap,
        centre=cfg.eval.window == "centre",
    )


def steps_per_epoch(cfg, num_train: int) -> int:
    """Iterations per epoch: the training cases at the batch size (219 at batch 1)."""
    return max(1, num_train // cfg.data.batch_size)


def optimizer(cfg, spe: int):
    """Section 11.14's chain with the per-epoch poly schedule and DTMS."""
    epoch_of = optim.epoch_of_step(1, spe)
    schedule = optim.poly_schedule(cfg.train.learning_rate, cfg.train.epochs, epoch_of)
    x = cfg.dtms
    return dtms.make_optimizer(
        learning_rate=schedule,
        num_modalities=len(spec_of(cfg).modalities),
        weight_decay=cfg.train.weight_decay,
        mu=x.mu,
        freeze_epochs=x.freeze_epochs,
        k_ramp=tuple(x.k_ramp),
        k_min=x.k_min,
        reweight=x.reweight,
        scale=x.scale,
        faithful=cfg.faithful,
    )


def _initial_state(cfg, tx, key: jax.Array) -> TrainState:
    params = init_variables(model(cfg), key, model_crop(cfg))["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def create_state(cfg, spe: int = 1) -> tuple[TrainState, Any]:
    """(initial state, optimiser), initialised in one jitted call."""
    tx = optimizer(cfg, spe)
    key = jax.random.key(cfg.seed)
    # Runs once: XLA's cheap pipeline compiles it in a third of the time (64 s -> 21 s, demo).
    init = jax.jit(lambda k: _initial_state(cfg, tx, k))
    return init.lower(key).compile(FAST_COMPILE)(key), tx


def state_template(cfg) -> TrainState:
    """The state's shapes and dtypes, traced but never compiled (a restore template)."""
    return jax.eval_shape(lambda k: _initial_state(cfg, optimizer(cfg, 1), k), jax.random.key(0))


def checkpoint_dir(workdir: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir) / "checkpoints"


def checkpointer(workdir: pathlib.Path, read_only: bool = False) -> Checkpointer:
    return Checkpointer(checkpoint_dir(workdir), best_metrics=(SELECT_METRIC,), read_only=read_only)


def chosen_step(cfg, ckpt: Checkpointer) -> int | None:
    if cfg.eval.checkpoint is not None:
        if cfg.eval.checkpoint not in ckpt.steps():
            raise FileNotFoundError(
                f"eval.checkpoint={cfg.eval.checkpoint} is not among the saved steps "
                f"{sorted(ckpt.steps())}"
            )
        return cfg.eval.checkpoint
    if cfg.train.select == "best":
        best = ckpt.best_step(SELECT_METRIC)
        if best is not None:
            return best
    return ckpt.latest_step()


def restore_params(cfg, workdir: pathlib.Path) -> tuple[Any, dict]:
    """(params, meta) of the chosen checkpoint."""
    workdir = pathlib.Path(workdir)
    if not checkpoint_dir(workdir).is_dir():
        raise FileNotFoundError(f"no checkpoints in {checkpoint_dir(workdir)}: train first")
    ckpt = checkpointer(workdir, read_only=True)
    step = chosen_step(cfg, ckpt)
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}: train first")
    state, meta = ckpt.restore(step, state_template(cfg))
    ckpt.close()
    return state.params, meta


def mean_dice(spec: DatasetSpec, pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Dice per selection region and their mean (`dice`)."""
    from common import metrics

    regions = metrics.BRATS_REGIONS if spec.name == "brats2020" else metrics.MYOPS_REGIONS
    out = {}
    for r in SELECTION_REGIONS[spec.name]:
        labels = regions[r]
        out[f"dice_{r}"] = metrics.dice(np.isin(pred, labels), np.isin(label, labels))
    out[SELECT_METRIC] = float(np.mean([out[f"dice_{r}"] for r in SELECTION_REGIONS[spec.name]]))
    return out
