"""What training, evaluation and prediction of FAMF-Net all need.

The checked config and the streams it selects, the model, the train state (its template is what
a checkpoint is restored into, so the optimiser that shapes it lives here too), where the data
comes from (`resolve_data`), where a fold's checkpoints are (`fold_dir`, `checkpointer`), how the
chosen one is restored (`restore_for_eval`), and eval-mode prediction of records with its
metrics, which validation during training and the final evaluation share.
"""

from __future__ import annotations

import pathlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from common import metrics as metrics_lib
from common.checkpoint import Checkpointer
from common.loader import iterate
from common.logging import progress
from famf_jax import dataset, pipeline, rdo, synthetic
from famf_jax.inference import predict_core
from famf_jax.model import FAMFNet, init_variables

BEST_CRITERIA = ("f1_acc", "f1", "accuracy")
STREAMS = {"both": ("bmode", "swe"), "bmode": ("bmode",), "swe": ("swe",)}


def validate_config(cfg) -> None:
    """Fail at once, with one line, on a value the run would only trip over later."""
    choices = {
        "train.optimizer": (cfg.train.optimizer, ("sgd", "adamw")),
        "train.loss": (cfg.train.loss, ("focal", "ce")),
        "model.modalities": (cfg.model.modalities, tuple(STREAMS)),
        "eval.criterion": (cfg.eval.criterion, BEST_CRITERIA),
        "eval.operating_point": (cfg.eval.operating_point, ("f1", "sensitivity")),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    if cfg.data.image_size <= 0 or cfg.data.image_size % 8:
        raise ValueError(
            f"data.image_size must be a positive multiple of 8, not {cfg.data.image_size}"
        )
    if not 0 < cfg.eval.target_sensitivity <= 1:
        raise ValueError(
            f"eval.target_sensitivity is a fraction in (0, 1], not {cfg.eval.target_sensitivity}"
        )
    for name in ("data.center_crop", "data.crop"):
        v = cfg.data[name.split(".")[1]]
        if not 0 < v <= 1:
            raise ValueError(f"{name} is a fraction in (0, 1], not {v}")
    for name in ("train.batch_size", "train.epochs", "data.folds", "eval.batch_size"):
        section, key = name.split(".")
        if cfg[section][key] < 1:
            raise ValueError(f"{name} must be at least 1, not {cfg[section][key]}")


def modalities(cfg) -> tuple[str, ...]:
    """The streams of `model.modalities` (validated by `validate_config`)."""
    return STREAMS[cfg.model.modalities]


def uses_fusion(cfg) -> bool:
    """RAA + MAF switch on after the warm-up: fusion enabled and both streams present."""
    return bool(cfg.model.fusion) and len(modalities(cfg)) == 2


def build_model(cfg) -> FAMFNet:
    return FAMFNet(
        faithful=cfg.faithful,
        modalities=modalities(cfg),
        scaled_attention=cfg.model.scaled_attention,
    )


# ---------------------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any  # the main pass's running statistics
    cam_stats: Any  # the CAM pass's (corrected mode keeps them apart, see inference.two_pass)
    opt_state: Any

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats, "cam_stats": self.cam_stats}


def rdo_config(cfg) -> rdo.RDOConfig:
    r = cfg.rdo
    return rdo.RDOConfig(
        faithful=cfg.faithful,
        alpha0_init=r.alpha0,
        gamma_init=r.gamma,
        learning_rate=r.learning_rate,
        buffer_size=r.buffer_size,
        batch_size=r.batch_size,
        epsilon_start=r.epsilon_start,
        epsilon_end=r.epsilon_end,
        epsilon_decay_steps=r.epsilon_decay_steps,
        target_every=r.target_every,
    )


def make_optimizer(cfg, steps_per_epoch: int) -> optax.GradientTransformation:
    t = cfg.train
    schedule = optax.exponential_decay(
        t.learning_rate,
        transition_steps=max(1, t.lr_decay_epochs * steps_per_epoch),
        decay_rate=t.lr_decay_rate,
        staircase=True,
    )
    if t.optimizer == "sgd":  # PyTorch SGD(weight_decay): L2 added to the gradient first
        base = optax.chain(
            optax.add_decayed_weights(t.weight_decay), optax.sgd(schedule, momentum=t.momentum)
        )
    elif t.optimizer == "adamw":
        base = optax.adamw(schedule, weight_decay=t.weight_decay)
    else:
        raise ValueError(f"train.optimizer must be sgd or adamw, not {t.optimizer!r}")
    if not cfg.rdo.enabled:
        return base
    return optax.chain(rdo.transform(rdo_config(cfg), t.batch_size + 2, seed=cfg.seed + 1), base)


def create_state(cfg, steps_per_epoch: int) -> tuple[TrainState, optax.GradientTransformation]:
    model = build_model(cfg)
    v = init_variables(model, jax.random.key(cfg.seed), cfg.data.image_size)
    tx = make_optimizer(cfg, steps_per_epoch)
    state = TrainState(
        jnp.zeros((), jnp.int32),
        v["params"],
        v["batch_stats"],
        jax.tree.map(jnp.copy, v["batch_stats"]),  # own buffers (the step donates the state)
        tx.init(v["params"]),
    )
    return state, tx


# ---------------------------------------------------------------------------------- data


def image_config(cfg) -> pipeline.ImageConfig:
    d = cfg.data
    return pipeline.ImageConfig(
        d.image_size, d.center_crop, d.crop, d.paired_crop, d.augmentation_prob, d.rotation
    )


def resolve_data(cfg, workdir: pathlib.Path) -> dataset.FamfData:
    """The configured data, or a synthetic set generated once into the workdir."""
    d = cfg.data
    manifest = d.manifest
    if not (manifest or d.root):
        if d.synthetic_patients <= 0:
            raise dataset.DataError("no data: set data.manifest or data.root (and data.splits)")
        out = pathlib.Path(d.synthetic_dir or workdir / "data")
        manifest = out / "manifest.csv"
        if not manifest.exists():
            logging.info("generating %d synthetic patients in %s", d.synthetic_patients, out)
            synthetic.generate(
                out,
                d.synthetic_patients,
                d.synthetic_image_size,
                seed=cfg.seed,
                progress=lambda it: progress(it, desc="synthetic data"),
            )
        manifest = str(manifest)
    return dataset.load(
        root=d.root,
        splits=d.splits,
        manifest=manifest,
        folds=d.folds,
        seed=cfg.seed,
        workdir=workdir,
    )


# ---------------------------------------------------------------------------------- checkpoints


def fold_dir(workdir: pathlib.Path, fold: int) -> pathlib.Path:
    return pathlib.Path(workdir) / f"fold_{fold}"


def checkpointer(workdir: pathlib.Path, fold: int, read_only: bool = False) -> Checkpointer:
    return Checkpointer(
        fold_dir(workdir, fold) / "checkpoints", best_metrics=BEST_CRITERIA, read_only=read_only
    )


def restore_for_eval(cfg, workdir: pathlib.Path, fold: int):
    """(variables, meta) of the requested checkpoint of a fold (eval.checkpoint or the best)."""
    ckpt = checkpointer(workdir, fold, read_only=True)
    step = cfg.eval.checkpoint
    if step is None:  # the best by the criterion; an imported checkpoint has no metrics
        step = ckpt.best_step(cfg.eval.criterion) or ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {fold_dir(workdir, fold)}: train first")
    template, _ = create_state(cfg, 1)
    state, meta = ckpt.restore(step, template)
    ckpt.close()
    return state.variables, meta


# ---------------------------------------------------------------------------------- prediction


def _pad_to(x: np.ndarray, size: int) -> np.ndarray:
    """Repeat the last row so a short final batch keeps the compiled shape."""
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), 0)]) if len(x) < size else x


def predict_records(cfg, variables, records, *, warm: bool, desc: str = "eval") -> np.ndarray:
    """P(class 1) for each record, in order (eval mode, two passes, padded full batches).

    Read in process: evaluation sets are small, and worker start-up would cost more."""
    bs = cfg.eval.batch_size
    ds = pipeline.eval_dataset(records, image_config(cfg))
    batches = iterate(ds, workers=0, batch_size=bs, drop_remainder=False)
    probs = []
    for batch in progress(batches, total=-(-len(ds) // bs), desc=desc):
        n = len(batch["label"])
        out = predict_core(
            variables,
            jnp.asarray(_pad_to(batch["bmode"], bs)),
            jnp.asarray(_pad_to(batch["swe"], bs)),
            faithful=cfg.faithful,
            warm=warm,
            modalities=modalities(cfg),
            scaled_attention=cfg.model.scaled_attention,
        )
        probs.append(np.asarray(out["probs"][:n, 1]))
    return np.concatenate(probs) if probs else np.zeros(0)


def split_metrics(cfg, variables, records, warm: bool, desc: str) -> tuple[dict, np.ndarray]:
    """Classification metrics of a split (plus `f1_acc`, the default criterion), and P(1)."""
    p = predict_records(cfg, variables, records, warm=warm, desc=desc)
    labels = np.array([r.label for r in records])
    m = metrics_lib.classification_metrics(labels, p)
    m["f1_acc"] = m["f1"] + m["accuracy"]
    return m, p
