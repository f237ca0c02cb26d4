"""DMAF-Net training: its state, its jitted step and its validation metric; the loop is
`common.training.train_loop`, shared with FAMF-Net.

One step (section 11): the model on the batch (dropout keyed by the step), the objective with
the betas read from the DTMS state in the optimiser, then the optimiser chain (DTMS monitor,
PyTorch AMSGrad, per-encoder update factors, decoupled weight decay, per-epoch poly lr), fed
the step's raw distillation gaps. Masks are arrays, so one compilation serves every
combination of modalities.

Epochs: an epoch is `steps_per_epoch = N_train // batch_size` steps (219 at batch 1, as the
original); the schedule, the ramps and DTMS use epoch = step // steps_per_epoch, the loop's
epoch, so evaluation, checkpoints and DTMS closes agree (the spec's floor(step * B / N) is the
same at batch 1).
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from common import atomic, loader, nonfinite, parallel, viz
from common.loader import iterate
from common.logging import progress, read_jsonl
from common.training import train_loop
from dmaf_jax import data, dataset, dtms, experiment, losses
from dmaf_jax.experiment import TrainState
from dmaf_jax.inference import to_model_input


def availability_weights(prep: dataset.Prepared) -> np.ndarray:
    """w~ of section 11.11 from the training masks: N / N_m, normalised to mean 1."""
    masks = np.array([prep.masks[n] for n in prep.split["train"]], bool)
    return np.asarray(losses.inverse_availability_weights(masks.sum(0), len(masks)))


def train_step(cfg, tx, spe: int, weights: jax.Array, state: TrainState, batch: dict):
    """One optimisation step; returns (new state, device outputs for the log)."""
    net = experiment.model(cfg)
    spec = experiment.spec_of(cfg)
    step = state.step
    epoch, next_epoch = step // spe, (step + 1) // spe
    ramp_steps = cfg.train.distill_ramp_epochs * spe
    ramp = jnp.clip(step / ramp_steps, 0.0, 1.0) if ramp_steps > 0 else jnp.float32(1)
    monitor = dtms.find_state(state.opt_state)
    key = jax.random.fold_in(jax.random.key(cfg.seed), step)
    mask = batch["mask"].astype(bool)
    onehot = jax.nn.one_hot(batch["label"], spec.num_classes, dtype=jnp.float32)

    def loss_fn(params):
        out = net.apply({"params": params}, batch["image"], mask, train=True, rngs={"dropout": key})
        loss, terms, gaps, valid = losses.objective(
            out,
            onehot,
            mask,
            betas=monitor.beta,
            weights=weights,
            ramp=ramp,
            lambda_cov=cfg.train.lambda_cov,
            lambda_att=cfg.train.lambda_att,
            lambda_proto=cfg.train.lambda_proto,
            grid=experiment.grid(cfg),
            pooled=cfg.faithful,
        )
        return loss, (terms, gaps, valid)

    (loss, (terms, gaps, valid)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(
        grads,
        state.opt_state,
        state.params,
        dtms_gaps=gaps,
        dtms_valid=valid,
        dtms_epoch=epoch,
        dtms_next_epoch=next_epoch,
    )
    params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    ok = nonfinite.all_finite((loss, grads, gaps))
    params, opt_state = nonfinite.keep_if(ok, (params, opt_state), (state.params, state.opt_state))
    new = dtms.find_state(opt_state)
    outputs = {f"loss/{k}": v for k, v in terms.items() if k != "total"}
    outputs.update(
        loss=loss,
        beta=new.beta,
        factor=new.factors,
        gap=new.step_gap,
        rho=new.step_rho,
        ramp=ramp,
        skipped=nonfinite.skipped(ok),
    )
    return TrainState(step + 1, params, opt_state), outputs


def jit_train_step(cfg, tx, spe: int, weights, shard: parallel.Sharding | None = None, state=None):
    """The jitted step; with `shard` (and the `state` it shards), data-parallel over its mesh."""
    fn = functools.partial(train_step, cfg, tx, spe, jnp.asarray(weights, jnp.float32))
    return parallel.jit_step(fn, shard, state)


def host_batch(cfg, batch: dict) -> dict:
    """The step's inputs as numpy arrays; MyoPS's depth axis of size 1 is dropped."""
    image, label = batch["image"], batch["label"]
    if experiment.spatial_rank(cfg) == 2:
        image, label = image[:, :, :, 0], label[:, :, :, 0]
    return {"image": image, "label": label.astype(np.int32), "mask": batch["mask"]}


def device_batch(cfg, batch: dict, shard: parallel.Sharding | None = None) -> dict:
    """Host batch -> device arrays (sharded over the mesh's devices with `shard`)."""
    inputs = host_batch(cfg, batch)
    return shard.put_batch(inputs) if shard is not None else jax.device_put(inputs)


def validation_fn(cfg, cases: list[data.Case]):
    """(state, epoch) -> mean Dice of the selection regions, all modalities present."""
    spec = experiment.spec_of(cfg)
    window = experiment.inference_window(cfg)
    full = np.ones((1, len(spec.modalities)), bool)
    rank = experiment.spatial_rank(cfg)

    def evaluate(state: TrainState, epoch: int) -> dict[str, float]:
        # On this process's devices once, not once per case (several processes: host copies).
        params = jax.device_put(parallel.local_copy(state.params), parallel.local().replicated)
        rows = []
        for case in progress(cases, desc=f"validation epoch {epoch}"):
            vol = to_model_input(np.load(case.vol), rank)
            seg = np.load(case.seg)
            seg = seg[:, :, 0] if rank == 2 else seg
            probs = window.predict(params, vol, full)[0]
            rows.append(experiment.mean_dice(spec, probs.argmax(-1), seg))
        return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}

    return evaluate


def plot_dtms(workdir: pathlib.Path, modalities) -> pathlib.Path | None:
    """Betas, update factors and gaps per modality over training, from metrics.jsonl."""
    rows = [r for r in read_jsonl(workdir / "metrics.jsonl") if f"beta/{modalities[0]}" in r]
    if not rows:
        return None
    x = np.array([r["step"] for r in rows])
    series = {}
    for name in ("beta", "factor", "gap"):
        for m in modalities:
            series[f"{name} {m}"] = np.array([r.get(f"{name}/{m}") for r in rows], float)
    return viz.series_plot(x, series, workdir / "dtms.png", "DTMS per modality", "step")


def train(cfg, workdir: str | pathlib.Path):
    workdir = pathlib.Path(workdir)
    experiment.validate_config(cfg)
    # Preprocessing (and its splits and CSVs) by process 0 alone; the others read its output.
    prep = parallel.main_first(
        lambda: dataset.prepare(cfg, workdir, for_training=True), "dmaf data"
    )
    masks = {k: np.asarray(v).tolist() for k, v in prep.masks.items()}
    parallel.assert_same({"split": prep.split, "masks": masks}, "the data split and masks")
    if parallel.is_main():
        atomic.write_text(workdir / "config.json", cfg.to_json_best_effort(indent=1))
    spec = prep.spec
    train_cases = prep.cases("train")
    if not train_cases:
        raise dataset.preprocess.CaseError("no training case: the training split is empty")
    if len(train_cases) < cfg.data.batch_size:
        raise ValueError(
            f"{len(train_cases)} training cases < data.batch_size {cfg.data.batch_size}"
        )
    valid_cases = prep.cases("val")
    spe = experiment.steps_per_epoch(cfg, len(train_cases))
    weights = availability_weights(prep)
    logging.info(
        "training on %d cases (%d steps per epoch), validation %d; availability weights %s",
        len(train_cases),
        spe,
        len(valid_cases),
        dict(zip(spec.modalities, np.round(weights, 3).tolist())),
    )
    state, tx = experiment.create_state(cfg, spe)
    shard = parallel.Sharding(parallel.mesh(), cfg.parallel.fsdp)
    state = jax.device_put(state, shard.state(state))
    logging.info(shard.describe(cfg.data.batch_size))
    ds = data.train_dataset(spec, train_cases, dataset.augment_config(cfg), cfg.seed)
    bs = cfg.data.batch_size
    ds = loader.process_rows(ds, bs, jax.process_index(), jax.process_count())
    local = bs // jax.process_count()
    it = iter(iterate(ds, cfg.data.workers, local, threads=cfg.data.threads))
    step = jit_train_step(cfg, tx, spe, weights, shard, state)
    evaluate = validation_fn(cfg, valid_cases) if valid_cases else None
    ckpt = experiment.checkpointer(workdir)
    try:
        state, result = train_loop(
            state,
            lambda s, b, _: step(s, b),
            it,
            workdir=workdir,
            checkpointer=ckpt,
            steps_per_epoch=spe,
            epochs=cfg.train.epochs,
            to_device=functools.partial(device_batch, cfg, shard=shard),
            evaluate=evaluate,
            eval_every=cfg.train.eval_every,
            checkpoint_every=cfg.train.checkpoint_every,
            log_every=cfg.train.log_every,
            meta={"config": cfg.to_dict(), "steps_per_epoch": spe},
            vector_labels={k: spec.modalities for k in ("beta", "factor", "gap", "rho")},
            postfix_keys=("beta",),
            desc="train",
            max_skipped_in_row=cfg.train.max_skipped_in_row,
            max_replaced=cfg.data.max_replaced,
        )
    finally:
        ckpt.close()
    plot = plot_dtms(workdir, spec.modalities) if parallel.is_main() else None
    if plot:
        logging.info("DTMS plot: %s", plot)
    return result
