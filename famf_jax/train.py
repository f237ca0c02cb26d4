"""FAMF-Net training: the original's procedure (spec section 4), one jitted step per iteration.

Per step: CAM pass (warm off), closed-form CAMs, main pass (warm on after the warm-up), the
RDO agent's action from the step's own probabilities, the focal loss with the resulting alpha and
gamma, and the optimiser step (RDO is part of the optimiser chain, see rdo.py). Deviations
from the original unless `faithful`: batch statistics are written by the main pass only (B11);
the look-ahead batch is replaced by a one-step-late transition (B9, B10); the alpha/gamma
updates start at the warm-up epoch, like MAF (B15; faithful: one epoch later).

Folds train one after another into `<workdir>/fold_<k>/`; each fold resumes from its latest
checkpoint, so `--mode=train` after a crash continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
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
from common.logging import MetricWriter, progress
from famf_jax import dataset, pipeline, rdo, synthetic
from famf_jax.inference import predict_core, two_pass
from famf_jax.losses import cross_entropy, focal_loss
from famf_jax.model import FAMFNet, init_variables

BEST_CRITERIA = ("f1_acc", "f1", "accuracy")
STREAMS = {"both": ("bmode", "swe"), "bmode": ("bmode",), "swe": ("swe",)}


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def validate_config(cfg) -> None:
    """Fail at once, with one line, on a value the run would only trip over later."""
    choices = {
        "train.optimizer": (cfg.train.optimizer, ("sgd", "adamw")),
        "train.loss": (cfg.train.loss, ("focal", "ce")),
        "model.modalities": (cfg.model.modalities, tuple(STREAMS)),
        "eval.criterion": (cfg.eval.criterion, BEST_CRITERIA),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    if cfg.data.image_size <= 0 or cfg.data.image_size % 8:
        raise ValueError(
            f"data.image_size must be a positive multiple of 8, not {cfg.data.image_size}"
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
    return FAMFNet(faithful=cfg.faithful, modalities=modalities(cfg))


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
        jnp.zeros((), jnp.int32), v["params"], v["batch_stats"], tx.init(v["params"])
    )
    return state, tx


def loss_and_selection(cfg, model, state: TrainState, batch: dict, active, warm: bool):
    """The step's loss as a function of the parameters, with its aux outputs."""

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        out, stats = two_pass(
            model,
            variables,
            batch["bmode"],
            batch["swe"],
            warm=warm,
            train=True,
            every_pass_statistics=cfg.faithful,
        )
        labels = batch["label"]
        aux = {"batch_stats": stats, "probs": out["probs"]}
        if cfg.rdo.enabled:
            s = rdo.state_vector(out["probs"], labels)
            sel = rdo.select(rdo_config(cfg), rdo.find_state(state.opt_state), s, active)
            alpha0, gamma = sel.alpha0, sel.gamma
            aux.update(selection=sel, rdo_state=s)
        else:
            alpha0, gamma = cfg.rdo.alpha0, cfg.rdo.gamma
        if cfg.train.loss == "ce":
            loss = cross_entropy(out["logits"], labels)
        else:
            loss = focal_loss(out["logits"], labels, alpha0, gamma, cfg.train.double_softmax)
        return loss, aux

    return loss_fn


def train_step(cfg, tx, state: TrainState, batch: dict, active, new_epoch, *, warm: bool):
    """One optimisation step. active: alpha/gamma may move; new_epoch: first step of an epoch."""
    model = build_model(cfg)
    loss_fn = loss_and_selection(cfg, model, state, batch, active, warm)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    counts = rdo.batch_counts(aux["probs"], batch["label"])
    extras = {}
    if cfg.rdo.enabled:
        extras = dict(
            rdo_selection=aux["selection"],
            rdo_state=aux["rdo_state"],
            rdo_counts=counts,
            rdo_new_epoch=new_epoch,
        )
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extras)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(state.step + 1, params, aux["batch_stats"], opt_state)
    out = {"loss": loss, "counts": counts}
    r = rdo.find_state(opt_state)
    if r is not None:
        out.update(alpha0=r.alpha0, gamma=r.gamma, reward=r.pending_reward, dqn_loss=r.dqn_loss)
    return new, out


def jit_train_step(cfg, tx):
    return jax.jit(functools.partial(train_step, cfg, tx), static_argnames="warm", donate_argnums=0)


def device_batch(batch: dict) -> dict:
    return {k: jnp.asarray(batch[k]) for k in ("bmode", "swe", "label")}


# ---------------------------------------------------------------------------------- evaluation


def image_config(cfg) -> pipeline.ImageConfig:
    d = cfg.data
    return pipeline.ImageConfig(
        d.image_size, d.center_crop, d.crop, d.paired_crop, d.augmentation_prob, d.rotation
    )


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
        )
        probs.append(np.asarray(out["probs"][:n, 1]))
    return np.concatenate(probs) if probs else np.zeros(0)


def split_metrics(cfg, variables, records, warm: bool, desc: str) -> tuple[dict, np.ndarray]:
    p = predict_records(cfg, variables, records, warm=warm, desc=desc)
    labels = np.array([r.label for r in records])
    m = metrics_lib.classification_metrics(labels, p)
    m["f1_acc"] = m["f1"] + m["accuracy"]
    return m, p


# ---------------------------------------------------------------------------------- data


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


def fold_dir(workdir: pathlib.Path, fold: int) -> pathlib.Path:
    return workdir / f"fold_{fold}"


def checkpointer(workdir: pathlib.Path, fold: int, read_only: bool = False) -> Checkpointer:
    return Checkpointer(
        fold_dir(workdir, fold) / "checkpoints", best_metrics=BEST_CRITERIA, read_only=read_only
    )


# ---------------------------------------------------------------------------------- training


@dataclasses.dataclass
class FoldResult:
    fold: int
    best: dict  # criterion -> (step, validation metrics)
    seconds: float


class _TrainLog:
    """Step outputs stay on the device until a flush, so logging adds no per-step sync."""

    def __init__(self, writer: MetricWriter, steps_per_epoch: int):
        self.writer, self.spe = writer, steps_per_epoch
        self.pending: list[dict] = []
        self.losses: list[float] = []
        self.counts = np.zeros(4)  # tp, fp, tn, fn of the epoch's pre-step predictions

    @property
    def epoch_loss(self) -> float:
        return float(np.mean(self.losses)) if self.losses else math.nan

    def add(self, out: dict) -> None:
        self.pending.append(out)

    def flush(self, step: int, epoch: int, end_of_epoch: bool) -> dict:
        """Writes the pending steps (ending at `step`); returns the progress-bar fields."""
        rows = jax.device_get(self.pending)
        for k, row in enumerate(rows):
            scalars = {key: float(v) for key, v in row.items() if key != "counts"}
            self.writer.write(step - len(rows) + k + 1, dict(scalars, epoch=epoch))
            self.losses.append(scalars["loss"])
            self.counts += row["counts"]
        self.pending = []
        fields = {"loss": f"{self.epoch_loss:.4f}"}
        if rows and "alpha0" in rows[-1]:
            fields.update(alpha0=f"{rows[-1]['alpha0']:.3f}", gamma=f"{rows[-1]['gamma']:.3f}")
        if end_of_epoch:
            tp, fp, tn, fn = self.counts
            train = {
                "train/loss": self.epoch_loss,
                "train/accuracy": (tp + tn) / max(self.counts.sum(), 1),
                "train/sensitivity": tp / max(tp + fn, 1),
                "train/specificity": tn / max(tn + fp, 1),
            }
            self.writer.write(step, train)
            self.losses, self.counts = [], np.zeros(4)
        return fields


def train_fold(cfg, data: dataset.FamfData, fold: int, workdir: pathlib.Path) -> FoldResult:
    t0 = time.time()
    train_records = data.split(fold, "train")
    valid_records = data.split(fold, "valid")
    bs = cfg.train.batch_size
    spe = pipeline.steps_per_epoch(len(train_records), bs)
    if spe == 0:
        raise dataset.DataError(f"fold {fold}: {len(train_records)} training patients < batch {bs}")
    total_steps = spe * cfg.train.epochs
    state, tx = create_state(cfg, spe)
    ds = pipeline.train_dataset(train_records, image_config(cfg), cfg.seed + fold, None)
    it = iter(iterate(ds, cfg.data.workers, batch_size=bs))
    ckpt = checkpointer(workdir, fold)
    meta_base = {"config": cfg.to_dict(), "fold": fold, "steps_per_epoch": spe}
    latest = ckpt.latest_step()
    if latest is not None:
        state, meta = ckpt.restore(latest, state, data_iterator=it)
        state = jax.tree_util.tree_map(jnp.asarray, state)
        logging.info("fold %d: resumed at step %d (epoch %d)", fold, latest, meta["epoch"])
    step_fn = jit_train_step(cfg, tx)
    log = _TrainLog(MetricWriter(fold_dir(workdir, fold)), spe)
    bar = progress(total=total_steps, initial=int(state.step), desc=f"fold {fold} train")
    fused = uses_fusion(cfg)
    for step in range(int(state.step), total_steps):
        epoch, in_epoch = divmod(step, spe)
        last_of_epoch = in_epoch == spe - 1
        warm = fused and epoch >= cfg.train.warmup_epochs
        active = epoch > cfg.train.warmup_epochs if cfg.faithful else warm
        batch = device_batch(next(it))
        state, out = step_fn(
            state, batch, jnp.asarray(active), jnp.asarray(in_epoch == 0), warm=warm
        )
        log.add(out)
        bar.update(1)
        if len(log.pending) >= cfg.train.log_every or last_of_epoch:
            bar.set_postfix(epoch=epoch, **log.flush(step + 1, epoch, end_of_epoch=last_of_epoch))
        if last_of_epoch and ((epoch + 1) % cfg.train.eval_every == 0 or step + 1 == total_steps):
            warm_eval = fused and epoch + 1 >= cfg.train.warmup_epochs
            m, _ = split_metrics(
                cfg, state.variables, valid_records, warm_eval, f"fold {fold} valid"
            )
            log.writer.write(step + 1, {f"valid/{k}": v for k, v in m.items() if np.isscalar(v)})
            logging.info(
                "fold %d epoch %d: valid auc %.3f f1 %.3f acc %.3f, train loss %.4f",
                fold,
                epoch + 1,
                m["roc_auc"],
                m["f1"],
                m["accuracy"],
                log.epoch_loss,
            )
            keep = {k: float(m[k]) for k in BEST_CRITERIA}
            meta = dict(meta_base, epoch=epoch + 1, step=step + 1, warm=warm_eval, metrics=keep)
            ckpt.save(step + 1, state, meta, data_iterator=it, metrics=keep)
    bar.close()
    log.writer.close()
    best = {}
    for c in BEST_CRITERIA:
        s = ckpt.best_step(c)
        best[c] = {"step": s, "metrics": ckpt.meta(s)["metrics"] if s is not None else None}
    ckpt.close()
    result = FoldResult(fold, best, time.time() - t0)
    (fold_dir(workdir, fold) / "train_summary.json").write_text(
        json.dumps(dataclasses.asdict(result), indent=1)
    )
    return result


def train(cfg, workdir: str | pathlib.Path) -> list[FoldResult]:
    validate_config(cfg)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=1))
    data = resolve_data(cfg, workdir)
    folds = len(data.folds)
    logging.info(
        "data: %d patients, %d fold(s), test %d",
        len(data.records),
        folds,
        len(data.folds[0]["test"]),
    )
    return [train_fold(cfg, data, k, workdir) for k in range(folds)]


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
    return {"params": state.params, "batch_stats": state.batch_stats}, meta
