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
from common.once import run_once
from dmaf_jax import dtms, losses
from dmaf_jax.inference import SlidingWindow
from dmaf_jax.layers import bottleneck_grid, check_crop
from dmaf_jax.modalities import SPECS, DatasetSpec
from dmaf_jax.model import DMAFNet, build_model, init_variables

SELECT_METRIC = "dice"
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
    """One-line errors naming the field, for the whole config a run uses: the dataset and data
    block (`dataset.validate_config`), the model, training, DTMS and inference windows. Runs
    before anything is written or compiled."""
    from dmaf_jax import dataset  # the data block's own checks

    dataset.validate_config(cfg)
    check = dataset.check_field
    m, t, x, e = cfg.model, cfg.train, cfg.dtms, cfg.eval
    levels = len(m.channels)
    check(
        levels >= 2 and dataset.positive_ints(m.channels),
        "model.channels",
        "at least two positive widths (one per level)",
        m.channels,
    )
    crop = tuple(cfg.data.crop)
    if 1 in crop[:2]:
        raise ValueError(f"data.crop {crop}: only the depth axis may be 1 (2-D slices)")
    if cfg.dataset == "brats2020" and crop[2] == 1:
        raise ValueError(
            f"data.crop {crop}: a depth of 1 means 2-D slices (MyoPS); BraTS volumes need a "
            "3-D crop"
        )
    if cfg.dataset == "myops2020" and crop[2] != 1:
        raise ValueError(
            f"data.crop {crop}: MyoPS cases are 2-D slices, the crop's depth must be 1"
        )
    try:
        check_crop(model_crop(cfg), levels)
    except ValueError:
        f = 2 ** (levels - 1)
        raise ValueError(
            f"data.crop {crop}: every axis but a depth of 1 must be a multiple of {f} "
            f"(2^(levels - 1) for the {levels} levels of model.channels) and at least {2 * f}"
        ) from None
    if m.channels[-1] % losses.MAA_HEADS:
        raise ValueError(
            f"model.channels[-1] ({m.channels[-1]}) must be a multiple of "
            f"{losses.MAA_HEADS} (the attention alignment's channel groups)"
        )
    check(m.fusion in ("dmaf", "mean"), "model.fusion", "dmaf or mean", m.fusion)
    for name in ("token_dim", "heads", "depth", "mlp"):
        check(m[name] >= 1, f"model.{name}", "at least 1", m[name])
    if m.token_dim % m.heads:
        raise ValueError(
            f"model.token_dim ({m.token_dim}) must be a multiple of model.heads ({m.heads})"
        )
    check(0 <= m.dropout < 1, "model.dropout", "a probability in [0, 1)", m.dropout)
    check(t.select in ("best", "last"), "train.select", "best or last", t.select)
    for name in ("epochs", "eval_every", "log_every", "checkpoint_every"):
        check(t[name] >= 1, f"train.{name}", "at least 1", t[name])
    check(t.learning_rate > 0, "train.learning_rate", "positive", t.learning_rate)
    if "max_skipped_in_row" in t:
        check(
            t.max_skipped_in_row >= 0,
            "train.max_skipped_in_row",
            "at least 0 (0: never stop)",
            t.max_skipped_in_row,
        )
    for name in ("weight_decay", "lambda_cov", "lambda_att", "lambda_proto"):
        check(t[name] >= 0, f"train.{name}", "at least 0", t[name])
    check(
        t.distill_ramp_epochs >= 0, "train.distill_ramp_epochs", "at least 0", t.distill_ramp_epochs
    )
    check(0 <= x.mu < 1, "dtms.mu", "in [0, 1)", x.mu)
    check(0 <= x.k_min <= 1, "dtms.k_min", "in [0, 1]", x.k_min)
    check(x.freeze_epochs >= 0, "dtms.freeze_epochs", "at least 0", x.freeze_epochs)
    ramp = tuple(x.k_ramp)
    check(
        len(ramp) == 2 and 0 <= ramp[0] <= ramp[1],
        "dtms.k_ramp",
        "two epochs (start, end) with 0 <= start <= end",
        ramp,
    )
    check(e.window in ("sliding", "centre"), "eval.window", "sliding or centre", e.window)
    check(e.windows_per_call >= 1, "eval.windows_per_call", "at least 1", e.windows_per_call)
    check(0 <= e.overlap < 1, "eval.overlap", "in [0, 1)", e.overlap)


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
    return run_once(lambda k: _initial_state(cfg, tx, k), jax.random.key(cfg.seed)), tx


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


# The model fields the parameters' shapes depend on (dropout and bfloat16 do not matter).
PARAMETER_FIELDS = ("channels", "fusion", "token_dim", "heads", "depth", "mlp")


def _leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): tuple(getattr(v, "shape", ())) for k, v in flat}


def _check_trained_config(cfg, meta: dict, where: pathlib.Path) -> None:
    """One line when a checkpoint's recorded config has another dataset or model than `cfg`,
    naming the fields that differ."""
    trained = meta.get("config") or {}
    now = cfg.to_dict()
    differ = []
    if trained.get("dataset", now["dataset"]) != now["dataset"]:
        differ.append(f"dataset={trained['dataset']!r} (the config says {now['dataset']!r})")
    model = trained.get("model") or {}
    for k in PARAMETER_FIELDS:
        if k in model and _plain(model[k]) != _plain(now["model"][k]):
            was, says = _plain(model[k]), _plain(now["model"][k])
            differ.append(f"model.{k}={was!r} (the config says {says!r})")
    if differ:
        raise ValueError(
            f"checkpoint {where} was trained with {', '.join(differ)}: set those fields as "
            "trained, or choose another --workdir"
        )


def _check_shapes(state, template, where: pathlib.Path) -> None:
    """One line naming the first parameter whose shape differs from the model's."""
    got, want = _leaf_shapes(state), _leaf_shapes(template)
    for k in sorted(set(got) | set(want)):
        if got.get(k) != want.get(k):
            raise ValueError(
                f"checkpoint {where} does not fit the config's model: parameter {k} has shape "
                f"{got.get(k, 'none')}, the model expects {want.get(k, 'none')}"
            )


def _plain(v):
    """Config values as compared across JSON (tuples become lists)."""
    return [_plain(x) for x in v] if isinstance(v, list | tuple) else v


def _unreadable(where: pathlib.Path, e: BaseException) -> OSError:
    text = " ".join(str(e).split())[:300]
    return OSError(f"checkpoint {where} cannot be read: {type(e).__name__}: {text}")


def checkpoint_meta(cfg, workdir: pathlib.Path) -> tuple[int, dict]:
    """(step, recorded meta) of the checkpoint `restore_params` would restore, without reading
    its arrays or tracing the model: one-line errors for no checkpoint, an unreadable one, or
    one whose recorded config has another dataset or model."""
    workdir = pathlib.Path(workdir)
    if not checkpoint_dir(workdir).is_dir():
        raise FileNotFoundError(
            f"no checkpoints in {checkpoint_dir(workdir)}: train first (--mode=train with this "
            "--workdir)"
        )
    ckpt = checkpointer(workdir, read_only=True)
    try:
        step = chosen_step(cfg, ckpt)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}: train first")
        where = checkpoint_dir(workdir) / str(step)
        try:
            meta = ckpt.meta(step)
        except Exception as e:  # orbax and tensorstore raise many kinds on damage
            raise _unreadable(where, e) from e
    finally:
        ckpt.close()
    _check_trained_config(cfg, meta, where)
    return step, meta


def restore_params(cfg, workdir: pathlib.Path) -> tuple[Any, dict]:
    """(params, meta) of the chosen checkpoint (`checkpoint_meta`'s checks first; no
    compilation happens here)."""
    step, _ = checkpoint_meta(cfg, workdir)
    where = checkpoint_dir(workdir) / str(step)
    template = state_template(cfg)
    ckpt = checkpointer(workdir, read_only=True)
    try:
        state, meta = ckpt.restore(step, template)
    except Exception as e:
        raise _unreadable(where, e) from e
    finally:
        ckpt.close()
    _check_shapes(state, template, where)
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
