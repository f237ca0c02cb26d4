"""What training, evaluation and prediction of FAMF-Net all need.

The checked config and the streams it selects, the model, the train state (its template is what
a checkpoint is restored into, so the optimiser that shapes it lives here too), where the data
comes from (`resolve_data`), where a fold's checkpoints are (`fold_dir`, `checkpointer`), how the
chosen one is restored (`restore_for_eval`), and eval-mode prediction of records with its
metrics, which validation during training and the final evaluation share.
"""

from __future__ import annotations

import math
import os
import pathlib
import shutil
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from common import metrics as metrics_lib
from common import optim, parallel
from common.checkpoint import Checkpointer
from common.errors import brief
from common.loader import iterate
from common.logging import progress
from common.once import run_once
from famf_jax import dataset, pipeline, rdo, synthetic
from famf_jax.inference import predict_core
from famf_jax.model import FAMFNet, init_variables

# f1_acc, f1, accuracy: the original's (at 0.5); f1_best_auc: threshold-free (see split_metrics)
BEST_CRITERIA = ("f1_acc", "f1", "accuracy", "f1_best_auc")
STREAMS = {"both": ("bmode", "swe"), "bmode": ("bmode",), "swe": ("swe",)}


def _range_problem(name: str, value, low, high, *, low_open=False, high_open=False) -> str | None:
    """The message for `value` outside [low, high] (open ends as given), or None. NaN and
    infinity fail (an unbounded weight of inf would skip every step as non-finite)."""
    try:
        ok = low is None or (value > low if low_open else value >= low)
        ok = ok and (high is None or (value < high if high_open else value <= high))
        ok = ok and math.isfinite(value)
    except TypeError:
        ok = False
    if ok:
        return None
    if high is None:
        return f"{name} must be {'>' if low_open else '>='} {low}, not {value!r}"
    where = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return f"{name} must be in {where}, not {value!r}"


def validate_config(cfg) -> None:
    """Fail at once, with one line, on a value the run would only trip over later."""
    choices = {
        "train.optimizer": (cfg.train.optimizer, ("sgd", "adamw")),
        "train.loss": (cfg.train.loss, ("focal", "ce")),
        "model.modalities": (cfg.model.modalities, tuple(STREAMS)),
        "eval.criterion": (cfg.eval.criterion, BEST_CRITERIA),
        "eval.operating_point": (
            cfg.eval.operating_point,
            ("smoothed_f1", "f1", "sensitivity"),
        ),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    if cfg.data.image_size <= 0 or cfg.data.image_size % 8:
        raise ValueError(
            f"data.image_size must be a positive multiple of 8 (the CAM grid is 1/8 of it), "
            f"not {cfg.data.image_size}"
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
    d, t, r, e = cfg.data, cfg.train, cfg.rdo, cfg.eval
    checks = [
        ("data.augmentation_prob", d.augmentation_prob, 0, 1, {}),
        ("data.rotation", d.rotation, 0, 180, {}),
        ("data.workers", d.workers, 0, None, {}),
        ("data.max_replaced", d.max_replaced, 0, None, {}),
        ("data.synthetic_patients", d.synthetic_patients, 0, None, {}),
        ("data.synthetic_image_size", d.synthetic_image_size, 8, None, {}),
        ("train.learning_rate", t.learning_rate, 0, None, {"low_open": True}),
        ("train.momentum", t.momentum, 0, 1, {"high_open": True}),
        ("train.weight_decay", t.weight_decay, 0, None, {}),
        ("train.stream_loss", t.stream_loss, 0, None, {}),
        ("train.lr_decay_rate", t.lr_decay_rate, 0, 1, {"low_open": True}),
        ("train.lr_decay_epochs", t.lr_decay_epochs, 1, None, {}),
        ("train.warmup_epochs", t.warmup_epochs, 0, None, {}),
        ("train.eval_every", t.eval_every, 1, None, {}),
        ("train.log_every", t.log_every, 1, None, {}),
        ("train.max_skipped_in_row", t.max_skipped_in_row, 0, None, {}),
        ("eval.overlays", e.overlays, 0, None, {}),
        ("eval.bootstrap", e.bootstrap, 0, None, {}),
    ]
    if e.checkpoint is not None:
        checks.append(("eval.checkpoint", e.checkpoint, 0, None, {}))
    if r.enabled or cfg.train.loss == "focal":
        checks += [
            ("rdo.alpha0", r.alpha0, 0, 1, {}),
            ("rdo.gamma", r.gamma, 0, None, {}),
        ]
    if r.enabled:
        checks += [
            ("rdo.learning_rate", r.learning_rate, 0, None, {"low_open": True}),
            ("rdo.batch_size", r.batch_size, 1, None, {}),
            ("rdo.epsilon_start", r.epsilon_start, 0, 1, {}),
            ("rdo.epsilon_end", r.epsilon_end, 0, 1, {}),
            ("rdo.epsilon_decay_steps", r.epsilon_decay_steps, 0, None, {}),
            ("rdo.target_every", r.target_every, 1, None, {}),
        ]
    for name, value, low, high, kw in checks:
        problem = _range_problem(name, value, low, high, **kw)
        if problem:
            raise ValueError(problem)
    if r.enabled and r.buffer_size <= r.batch_size:
        raise ValueError(
            f"rdo.buffer_size ({r.buffer_size}) must exceed rdo.batch_size ({r.batch_size}): "
            "the DQN learns once its buffer holds more than a batch"
        )


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
        dtype=jnp.bfloat16 if cfg.model.bfloat16 else None,
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
        base = optim.pytorch_adamw(schedule, weight_decay=t.weight_decay)  # counts: see hold
    else:
        raise ValueError(f"train.optimizer must be sgd or adamw, not {t.optimizer!r}")
    if not cfg.rdo.enabled:
        return base
    return optax.chain(rdo.transform(rdo_config(cfg), t.batch_size + 2, seed=cfg.seed + 1), base)


def _initial_state(cfg, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    v = init_variables(build_model(cfg), key, cfg.data.image_size)
    return TrainState(
        jnp.zeros((), jnp.int32),
        v["params"],
        v["batch_stats"],
        jax.tree.map(jnp.copy, v["batch_stats"]),  # own buffers (the step donates the state)
        tx.init(v["params"]),
    )


def create_state(cfg, steps_per_epoch: int) -> tuple[TrainState, optax.GradientTransformation]:
    """(initial state, optimiser), initialised in one compiled call."""
    tx = make_optimizer(cfg, steps_per_epoch)
    init = lambda k: _initial_state(cfg, tx, k)  # noqa: E731
    # XLA's full pipeline: bit for bit the eager init (faster ones move initial weights by an
    # ulp, and with them every published demo run); 16 s against eager's 27 s at the demo.
    return run_once(init, jax.random.key(cfg.seed), compiler_options=None), tx


def state_template(cfg) -> TrainState:
    """The state's shapes and dtypes, traced but never compiled (a restore template)."""
    tx = make_optimizer(cfg, 1)
    return jax.eval_shape(lambda k: _initial_state(cfg, tx, k), jax.random.key(0))


# ---------------------------------------------------------------------------------- data


def image_config(cfg) -> pipeline.ImageConfig:
    d = cfg.data
    return pipeline.ImageConfig(
        d.image_size, d.center_crop, d.crop, d.paired_crop, d.augmentation_prob, d.rotation
    )


def check_writable(folder: pathlib.Path, what: str) -> None:
    """Files can be made in `folder` (or it can be created): checked before the work whose
    result would go there. `what` names the setting in the message."""
    near = pathlib.Path(folder).absolute()
    while not near.exists():
        near = near.parent
    if not near.is_dir():
        raise NotADirectoryError(f"{what}: {near} is a file, not a folder")
    if not os.access(near, os.W_OK | os.X_OK):
        raise PermissionError(f"{what}: {near} is not writable")


def check_workdir(
    workdir: pathlib.Path, must_exist: bool = False, writable: bool = False
) -> pathlib.Path:
    """The workdir as a path; a file there (or, with `must_exist`, nothing; with `writable`,
    no write permission) is an error."""
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(f"--workdir {workdir} is a file, expected a folder")
    if writable:
        check_writable(workdir, f"--workdir {workdir}")
    if must_exist and not workdir.is_dir():
        raise FileNotFoundError(
            f"--workdir {workdir} does not exist: train first (--mode=train), or import "
            "weights (--mode=import_torch)"
        )
    return workdir


def _first_missing(path: pathlib.Path) -> pathlib.Path | None:
    """The outermost folder that creating `path` would create (None if it exists)."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def resolve_data(
    cfg, workdir: pathlib.Path, *, training: bool = False, save: bool = True
) -> dataset.FamfData:
    """The configured data, or a synthetic set generated once into the workdir.

    Checks everything first: `training` asks for a validation patient and a batch of training
    patients in every fold, and that checkpoints already in the workdir can be resumed with this
    config. Without `save` the caller writes a new split plan (`dataset.save_plan`) after its
    own checks. Synthetic data generated by this call is removed again if a check fails."""
    d = cfg.data
    workdir = check_workdir(workdir, writable=True)
    manifest, generated, source = d.manifest, None, None
    if not (manifest or d.root):
        if d.synthetic_patients <= 0:
            raise dataset.DataError(
                "no data: set data.manifest or data.root (and data.splits), or "
                "data.synthetic_patients > 0 for generated data"
            )
        out = synthetic_folder(d.synthetic_dir, workdir)
        if out.exists() and not out.is_dir():
            raise dataset.DataError(f"data.synthetic_dir {out} is a file, expected a folder")
        manifest = out / "manifest.csv"
        if not manifest.exists():
            generated = _first_missing(out)
            logging.info("generating %d synthetic patients in %s", d.synthetic_patients, out)
            synthetic.generate(
                out,
                d.synthetic_patients,
                d.synthetic_image_size,
                seed=cfg.seed,
                progress=lambda it: progress(it, desc="synthetic data"),
            )
        manifest = str(manifest)
        source = f"synthetic data in {out} (data.synthetic_patients={d.synthetic_patients})"
    try:
        data = dataset.load(
            root=d.root,
            splits=d.splits,
            manifest=manifest,
            folds=d.folds,
            seed=cfg.seed,
            workdir=workdir,
            min_train=cfg.train.batch_size if training else 0,
            min_valid=1 if training else 0,
            save=False,
            source=source,
        )
        if training:
            for k in range(len(data.folds)):
                check_resumable(cfg, workdir, k)
    except BaseException:
        if generated is not None:  # only what this call made
            shutil.rmtree(generated, ignore_errors=True)
        raise
    if save:
        dataset.save_plan(data)
    return data


# ---------------------------------------------------------------------------------- checkpoints


def synthetic_folder(synthetic_dir: str | None, workdir: pathlib.Path) -> pathlib.Path:
    """Where a run's generated data are: data.synthetic_dir, by default <workdir>/data."""
    return pathlib.Path(synthetic_dir or pathlib.Path(workdir) / "data")


def fold_dir(workdir: pathlib.Path, fold: int) -> pathlib.Path:
    return pathlib.Path(workdir) / f"fold_{fold}"


def checkpointer(workdir: pathlib.Path, fold: int, read_only: bool = False) -> Checkpointer:
    return Checkpointer(
        fold_dir(workdir, fold) / "checkpoints", best_metrics=BEST_CRITERIA, read_only=read_only
    )


def trained_folds(workdir: pathlib.Path) -> list[int]:
    """Folds of the workdir with a checkpoint folder (`fold_<k>/checkpoints`), in order."""
    folds = [
        int(p.parent.name.split("_", 1)[1])
        for p in pathlib.Path(workdir).glob("fold_*/checkpoints")
        if p.parent.name.split("_", 1)[1].isdigit() and p.is_dir()
    ]
    return sorted(folds)


def checkpoint_steps(workdir: pathlib.Path, fold: int) -> list[int]:
    """Steps saved in a fold, without creating anything (no folder: none)."""
    if not (fold_dir(workdir, fold) / "checkpoints").is_dir():
        return []
    ckpt = checkpointer(workdir, fold, read_only=True)
    try:
        return sorted(ckpt.steps())
    finally:
        ckpt.close()


# Config fields that shape the saved TrainState (parameters, optimiser and RDO state).
STATE_FIELDS = (
    "model.modalities",
    "train.optimizer",
    "rdo.enabled",
    "train.batch_size",  # the DQN's input is batch + 2
    "rdo.buffer_size",
    "faithful",
)
# Config fields that decide what network a checkpoint is: evaluating it under other values
# would run other region rules, CAMs or attention (and fit the operating point to them).
NETWORK_FIELDS = ("model.modalities", "model.fusion", "model.scaled_attention", "faithful")


def _saved_value(saved: dict, name: str):
    node = saved
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


# Fields that change neither the state nor the network under these settings (cfg, the saved
# config): not compared.
_MOOT = {
    "train.batch_size": lambda cfg, saved: not cfg.rdo.enabled,  # the DQN's input size
    "rdo.buffer_size": lambda cfg, saved: not cfg.rdo.enabled,
    # faithful MAF never scales its attention (maf.py)
    "model.scaled_attention": lambda cfg, saved: cfg.faithful and saved.get("faithful") is True,
}


def _differences(cfg, saved: dict, names: tuple[str, ...]) -> list[str]:
    out = []
    for name in names:
        if name in _MOOT and _MOOT[name](cfg, saved):
            continue
        was = _saved_value(saved, name)
        now = cfg
        for part in name.split("."):
            now = now[part]
        if was is not _MISSING and was != now:
            out.append(f"{name}={was!r} (the config has {now!r})")
    return out


def _meta(workdir: pathlib.Path, fold: int, step: int) -> dict:
    ckpt = checkpointer(workdir, fold, read_only=True)
    try:
        return ckpt.meta(step)
    except Exception as e:
        where = fold_dir(workdir, fold) / "checkpoints" / str(step)
        raise ValueError(f"checkpoint {where} is unreadable ({brief(e)})") from e
    finally:
        ckpt.close()


def check_resumable(cfg, workdir: pathlib.Path, fold: int) -> None:
    """Training resumes a fold's latest checkpoint: it must have the config's state shape."""
    for step in reversed(checkpoint_steps(workdir, fold)):
        try:
            saved = _meta(workdir, fold, step).get("config") or {}
        except ValueError:  # damaged: resuming skips it (common.checkpoint.restore_latest)
            continue
        diff = _differences(cfg, saved, STATE_FIELDS)
        if diff:
            where = fold_dir(workdir, fold) / "checkpoints" / str(step)
            raise ValueError(
                f"checkpoint {where}, which training would resume, was made with "
                f"{', '.join(diff)}: use the same values, or a new --workdir"
            )
        return


def choose_checkpoint(cfg, workdir: pathlib.Path, fold: int, n_folds: int | None = None):
    """(step, meta) of the checkpoint evaluate and predict restore for a fold: `eval.checkpoint`
    or the best by `eval.criterion` (an imported checkpoint, without metrics: the latest).
    Every reason it cannot be used is an error naming the folder; nothing is created."""
    where = fold_dir(workdir, fold) / "checkpoints"
    steps = checkpoint_steps(workdir, fold)
    if not steps:
        have = trained_folds(workdir)
        hint = ""
        if n_folds and fold > 0:
            hint = (
                f" (the data plan has {n_folds} folds, data.folds={cfg.data.folds}; folds with "
                f"checkpoints: {have or 'none'}): train them (--mode=train), or evaluate fewer "
                "folds (data.folds)"
            )
        raise FileNotFoundError(
            f"no checkpoint in {where}"
            + (hint or ": train first (--mode=train) or import weights (--mode=import_torch)")
        )
    step = cfg.eval.checkpoint
    if step is not None and step not in steps:
        raise ValueError(f"eval.checkpoint={step}: {where} holds the steps {steps}")
    if step is None:
        ckpt = checkpointer(workdir, fold, read_only=True)
        try:
            step = ckpt.best_step(cfg.eval.criterion)
            if step is None:
                _no_criterion(cfg, ckpt, where, steps)
        finally:
            ckpt.close()
        step = steps[-1] if step is None else step
    meta = _meta(workdir, fold, step)
    diff = _differences(cfg, meta.get("config") or {}, NETWORK_FIELDS)
    if diff:
        raise ValueError(
            f"checkpoint {where / str(step)} was made with {', '.join(diff)}: set the same"
        )
    return step, meta


def _no_criterion(cfg, ckpt, where: pathlib.Path, steps: list[int]) -> None:
    """No step has a number for `eval.criterion`: fine for imported weights (no validation
    metrics at all: the latest is used); an error for checkpoints validated without it (a
    workdir trained before the criterion existed), rather than silently the latest."""
    have = {
        c
        for meta in ckpt.readable_metas(steps).values()
        for c in BEST_CRITERIA
        if isinstance((meta.get("metrics") or {}).get(c), int | float)
    }
    if have:
        raise ValueError(
            f"no checkpoint in {where} has a validation {cfg.eval.criterion} (trained before "
            f"that criterion existed?): set eval.criterion to one they have "
            f"({', '.join(sorted(have))}) or eval.checkpoint to a step ({steps})"
        )


def restore_for_eval(cfg, workdir: pathlib.Path, fold: int, chosen: tuple | None = None):
    """(variables, meta) of the requested checkpoint of a fold (eval.checkpoint or the best);
    `chosen`: the (step, meta) choose_checkpoint already gave, so that a best checkpoint saved
    meanwhile by a training next to it does not replace the one the caller read about.

    Only the network is read back, so evaluation does not depend on how the optimiser's state
    was laid out when the checkpoint was written (train.optimizer=adamw changed its layout)."""
    step, meta = chosen if chosen is not None else choose_checkpoint(cfg, workdir, fold)
    where = fold_dir(workdir, fold) / "checkpoints" / str(step)
    ckpt = checkpointer(workdir, fold, read_only=True)
    try:
        saved, meta = ckpt.restore_as_saved(step)
    except Exception as e:
        raise ValueError(f"checkpoint {where} cannot be restored ({brief(e)})") from e
    finally:
        ckpt.close()
    template = state_template(cfg).variables
    variables = {name: saved.get(name) for name in template}
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    try:
        same = shapes(variables) == shapes(template)
    except (TypeError, ValueError, AttributeError):  # missing collections, other structures
        same = False
    if not same:
        raise ValueError(
            f"checkpoint {where} does not hold the network this config builds (its parameters "
            "or statistics differ in names or shapes)"
        )
    return variables, meta


# ---------------------------------------------------------------------------------- prediction


def _pad_to(x: np.ndarray, size: int) -> np.ndarray:
    """Repeat the last row so a short final batch keeps the compiled shape."""
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), 0)]) if len(x) < size else x


def predict_records(cfg, variables, records, *, warm: bool, desc: str = "eval") -> np.ndarray:
    """P(class 1) for each record, in order (eval mode, two passes, padded full batches split
    over this process's devices: `eval.batch_size` rounded up to a multiple of their count).

    Read in process: evaluation sets are small, and worker start-up would cost more."""
    shard = parallel.local()
    bs = parallel.round_up(cfg.eval.batch_size, shard.devices)
    variables = jax.device_put(variables, shard.replicated)
    ds = pipeline.eval_dataset(records, image_config(cfg))
    batches = iterate(ds, workers=0, batch_size=bs, drop_remainder=False)
    probs = []
    for batch in progress(batches, total=-(-len(ds) // bs), desc=desc):
        n = len(batch["label"])
        out = predict_core(
            variables,
            shard.put_rows(_pad_to(batch["bmode"], bs)),
            shard.put_rows(_pad_to(batch["swe"], bs)),
            faithful=cfg.faithful,
            warm=warm,
            modalities=modalities(cfg),
            scaled_attention=cfg.model.scaled_attention,
            bfloat16=cfg.model.bfloat16,
        )
        probs.append(np.asarray(out["probs"][:n, 1]))
    return np.concatenate(probs) if probs else np.zeros(0)


def split_metrics(cfg, variables, records, warm: bool, desc: str) -> tuple[dict, np.ndarray]:
    """Classification metrics of a split, and P(1). Plus the checkpoint criteria: `f1_acc`
    (F1 + accuracy at 0.5, the original's) and `f1_best_auc` (the best F1 over thresholds +
    ROC-AUC: how the model does at the best-F1 operating point evaluation will choose on this
    split, exactly with `eval.operating_point=f1`, nearly with `smoothed_f1`, and how it
    ranks; a model whose scores cross 0.5 late is not passed over)."""
    p = predict_records(cfg, variables, records, warm=warm, desc=desc)
    labels = np.array([r.label for r in records])
    m = metrics_lib.classification_metrics(labels, p)
    m["f1_acc"] = m["f1"] + m["accuracy"]
    m["f1_best"] = metrics_lib.best_f1(labels, p)
    # one class in the split (ROC-AUC undefined): F1 alone, so checkpoints still compare
    m["f1_best_auc"] = m["f1_best"] + (m["roc_auc"] if math.isfinite(m["roc_auc"]) else 0.0)
    return m, p
