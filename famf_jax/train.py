"""FAMF-Net training: the original's procedure (spec section 4), one jitted step per iteration.

Per step: CAM pass (warm off), closed-form CAMs, main pass (warm on after the warm-up), the
RDO agent's action from the step's own probabilities, the focal loss with the resulting alpha and
gamma, and the optimiser step (RDO is part of the optimiser chain, see rdo.py). Deviations
from the original unless `faithful`: the CAM pass and the main pass keep their own running
batch statistics (B11, `cam_stats` and `batch_stats`: after the warm-up they normalise
different inputs); the alpha/gamma updates start at the warm-up epoch (B15; faithful: one epoch
later). In both modes: the look-ahead batch is replaced by a one-step-late transition (B9, B10:
the next state is the next step's own batch), MAF's parameters do not move before the warm-up
ends (the original's SGD skips parameters without a gradient), and validation follows
`train.eval_every` counted from the first epoch: after epochs 2, 4, ... (the original's
`epoch % 2 == 0` validates after 1, 3, ...: the same number, one epoch later). With
`train.stream_loss` > 0 (the demo's recipe, not the original's) each stream's own logits add
their loss too, so that a stream whose cue another stream already explains still learns.

This file holds the step, its flags per step and the train metrics; the loop (resume, logging,
validation cadence, best checkpoints) is `common.training.train_loop`, and the state, data and
checkpoint locations are in `famf_jax.experiment`. Folds train one after another into
`<workdir>/fold_<k>/`; each fold resumes from its latest checkpoint, so `--mode=train` after a
crash continues where it stopped.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from common import atomic, loader, nonfinite, optim, parallel
from common.loader import iterate
from common.training import TrainResult, train_loop
from famf_jax import dataset, pipeline, rdo
from famf_jax.experiment import (
    TrainState,
    build_model,
    checkpointer,
    create_state,
    fold_dir,
    image_config,
    modalities,
    rdo_config,
    resolve_data,
    split_metrics,
    uses_fusion,
    validate_config,
)
from famf_jax.inference import two_pass
from famf_jax.losses import cross_entropy, focal_loss


def loss_and_selection(cfg, model, state: TrainState, batch: dict, active, warm: bool):
    """The step's loss as a function of the parameters, with its aux outputs: the focal loss
    (or cross-entropy) of the logits, plus `train.stream_loss` x each stream's own."""

    def loss_fn(params):
        variables = dict(state.variables, params=params)
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
        aux = {"stats": stats, "probs": out["probs"]}
        if cfg.rdo.enabled:
            s = rdo.state_vector(out["probs"], labels)
            sel = rdo.select(rdo_config(cfg), rdo.find_state(state.opt_state), s, active)
            alpha0, gamma = sel.alpha0, sel.gamma
            aux.update(selection=sel, rdo_state=s)
        else:
            alpha0, gamma = cfg.rdo.alpha0, cfg.rdo.gamma

        def objective(logits):
            if cfg.train.loss == "ce":
                return cross_entropy(logits, labels)
            return focal_loss(logits, labels, alpha0, gamma, cfg.train.double_softmax)

        loss = objective(out["logits"])
        alone = [v for k, v in out.items() if k.startswith("stream_logits_")]  # two streams
        if cfg.train.stream_loss and alone:
            aux["fused_loss"] = loss  # logged beside the total
            loss = loss + cfg.train.stream_loss * sum(objective(z) for z in alone)
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
    if not warm and "muatt_1" in state.params:
        # MAF is not in this step's graph: the original's SGD skips it (grad None), no decay.
        held = {k: jax.tree.map(lambda _, f=k == "muatt_1": f, v) for k, v in state.params.items()}
        params, opt_state = optim.hold((params, opt_state), (state.params, state.opt_state), held)
    stats = aux["stats"]
    new = TrainState(state.step + 1, params, stats["batch_stats"], stats["cam_stats"], opt_state)
    ok = nonfinite.all_finite((loss, grads))
    new = nonfinite.keep_if(ok, new, state.replace(step=state.step + 1))
    out = {"loss": loss, "counts": jnp.where(ok, counts, 0), "skipped": nonfinite.skipped(ok)}
    if "fused_loss" in aux:
        out["fused_loss"] = aux["fused_loss"]
    r = rdo.find_state(new.opt_state)
    if r is not None:
        out.update(alpha0=r.alpha0, gamma=r.gamma, reward=r.pending_reward, dqn_loss=r.dqn_loss)
    return new, out


def jit_train_step(cfg, tx, shard: parallel.Sharding | None = None, state=None):
    """The jitted step; with `shard` (and the `state` it shards), data-parallel over its mesh."""
    fn = functools.partial(train_step, cfg, tx)
    return parallel.jit_step(fn, shard, state, static_argnames="warm")


def device_batch(batch: dict, shard: parallel.Sharding | None = None) -> dict:
    """Host batch -> device arrays (sharded over the mesh's devices with `shard`)."""
    inputs = {k: np.asarray(batch[k]) for k in ("bmode", "swe", "label")}
    return shard.put_batch(inputs) if shard is not None else jax.device_put(inputs)


def step_flags(cfg, step: int, steps_per_epoch: int) -> tuple[bool, bool, bool]:
    """(warm, active, new_epoch) of a global step: MAF on, alpha/gamma may move, first step."""
    epoch, in_epoch = divmod(step, steps_per_epoch)
    warm = uses_fusion(cfg) and epoch >= cfg.train.warmup_epochs
    # RDO's activity follows the epoch, not the fusion switch: it acts in the fusion-off and
    # single-stream ablations too.
    active = epoch > cfg.train.warmup_epochs if cfg.faithful else epoch >= cfg.train.warmup_epochs
    return warm, active, in_epoch == 0


def warm_after(cfg, epochs_done: int) -> bool:
    """Whether a checkpoint taken after `epochs_done` epochs is evaluated with MAF on: as the
    last epoch trained (epoch `epochs_done - 1`) ran, so the checkpoint after the last warm-up
    epoch is evaluated, and chosen, as trained (without MAF)."""
    return uses_fusion(cfg) and epochs_done - 1 >= cfg.train.warmup_epochs


def train_metrics(rows: list[dict]) -> dict[str, float]:
    """Accuracy, sensitivity and specificity of an epoch's pre-step predictions."""
    tp, fp, tn, fn = np.sum([r["counts"] for r in rows], axis=0)
    return {
        "train/accuracy": (tp + tn) / max(tp + fp + tn + fn, 1),
        "train/sensitivity": tp / max(tp + fn, 1),
        "train/specificity": tn / max(tn + fp, 1),
    }


def train_fold(cfg, data: dataset.FamfData, fold: int, workdir: pathlib.Path) -> TrainResult:
    train_records = data.split(fold, "train")
    valid_records = data.split(fold, "valid")
    bs = cfg.train.batch_size
    spe = pipeline.steps_per_epoch(len(train_records), bs)
    if spe == 0:
        raise dataset.DataError(f"fold {fold}: {len(train_records)} training patients < batch {bs}")
    state, tx = create_state(cfg, spe)
    shard = parallel.Sharding(parallel.mesh(), cfg.parallel.fsdp)
    state = jax.device_put(state, shard.state(state))
    logging.info(shard.describe(bs))
    ds = pipeline.train_dataset(train_records, image_config(cfg), cfg.seed + fold, None)
    ds = loader.process_rows(ds, bs, jax.process_index(), jax.process_count())
    jitted = jit_train_step(cfg, tx, shard, state)
    flags = {b: jax.device_put(jnp.asarray(b), shard.replicated) for b in (False, True)}

    def step_fn(state, batch, step):
        warm, active, new_epoch = step_flags(cfg, step, spe)
        return jitted(state, batch, flags[active], flags[new_epoch], warm=warm)

    def evaluate(state, epochs_done):
        warm = warm_after(cfg, epochs_done)
        variables = parallel.local_copy(state.variables)
        m, _ = split_metrics(cfg, variables, valid_records, warm, f"fold {fold} valid")
        return {k: v for k, v in m.items() if np.isscalar(v)}

    meta = {"config": cfg.to_dict(), "fold": fold, "steps_per_epoch": spe}
    ckpt = checkpointer(workdir, fold)
    _, result = train_loop(
        state,
        step_fn,
        iter(iterate(ds, cfg.data.workers, batch_size=bs // jax.process_count())),
        workdir=fold_dir(workdir, fold),
        checkpointer=ckpt,
        steps_per_epoch=spe,
        epochs=cfg.train.epochs,
        to_device=functools.partial(device_batch, shard=shard),
        evaluate=evaluate,
        eval_every=cfg.train.eval_every,
        log_every=cfg.train.log_every,
        meta=lambda epochs_done: dict(meta, warm=warm_after(cfg, epochs_done)),
        epoch_metrics=train_metrics,
        log_exclude=("counts",),
        postfix_keys=("alpha0", "gamma"),
        desc=f"fold {fold} train",
        max_skipped_in_row=cfg.train.max_skipped_in_row,
        max_replaced=cfg.data.max_replaced,
    )
    ckpt.close()
    return result


def train(cfg, workdir: str | pathlib.Path) -> list[TrainResult]:
    """Trains every fold; result k is fold k's."""
    validate_config(cfg)
    if cfg.train.stream_loss and len(modalities(cfg)) == 1:
        logging.warning(
            "train.stream_loss=%g does nothing with one stream (model.modalities=%s): its "
            "loss is the fused one; set 0 to compare ablations under the same objective",
            cfg.train.stream_loss,
            cfg.model.modalities,
        )
    elif cfg.train.stream_loss and cfg.faithful:
        logging.warning(
            "faithful with train.stream_loss=%g: the original trains the fused loss alone "
            "(set --config.train.stream_loss=0 to reproduce it)",
            cfg.train.stream_loss,
        )
    # Training's batch splits over the devices; evaluation pads its own (any device count).
    parallel.check_batch(cfg.train.batch_size, "train.batch_size")
    workdir = pathlib.Path(workdir)
    # Every check before anything is written; data generated by process 0 alone.
    data = parallel.main_first(lambda: resolve_data(cfg, workdir, training=True), "famf data")
    parallel.assert_same(data.folds, "the folds")
    workdir.mkdir(parents=True, exist_ok=True)
    if parallel.is_main():
        atomic.write_text(workdir / "config.json", cfg.to_json_best_effort(indent=1))
    folds = len(data.folds)
    logging.info(
        "data: %d patients, %d fold(s), test %d",
        len(data.records),
        folds,
        len(data.folds[0]["test"]),
    )
    return [train_fold(cfg, data, k, workdir) for k in range(folds)]
