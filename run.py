"""Entry point: python run.py --config configs/famf.py:demo --workdir runs/demo --mode train"""

from __future__ import annotations

import logging as pylogging
import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "evaluate", "predict", "import_torch", "preprocess")

config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/famf.py:demo.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Output folder (default runs/<model>_<variant>).")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.DEFINE_string(
    "compilation_cache",
    os.path.expanduser("~/.cache/famf_dmaf_jax/xla"),
    "Persistent XLA compilation cache ('' to disable).",
)
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def _workdir(cfg) -> pathlib.Path:
    return pathlib.Path(FLAGS.workdir or f"runs/{cfg.model_name}_{cfg.variant}")


def _famf(cfg, mode: str, workdir: pathlib.Path) -> None:
    from famf_jax import evaluate, train

    if mode == "train":
        for k, r in enumerate(train.train(cfg, workdir)):
            b = r.best["f1_acc"]
            shown = {c: b["metrics"][c] for c in r.best} if b["metrics"] else None
            print(f"fold {k}: best F1+Acc checkpoint step {b['step']} {shown} ({r.seconds:.0f} s)")
    elif mode == "evaluate":
        result = evaluate.evaluate(cfg, workdir)
        t = result["test"]
        print("test: " + "  ".join(f"{k} {t[k]:.3f}" for k in evaluate.REPORT_KEYS))
        print(f"report: {workdir / 'report.md'}")
    elif mode == "predict":
        print(f"predictions: {evaluate.predict_folder(cfg, workdir)}")
    elif mode == "import_torch":
        from famf_jax import import_torch

        print(f"imported into {import_torch.import_checkpoint(cfg, workdir)}")


class _QuietLibraries(pylogging.Filter):
    """Drops INFO chatter of orbax and grain (every save/restore step); warnings pass."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        noisy = any(f"{os.sep}{lib}{os.sep}" in record.pathname for lib in ("orbax", "grain"))
        return record.levelno >= pylogging.WARNING or not noisy


def _dmaf(cfg, mode: str, workdir: pathlib.Path) -> None:
    if mode == "preprocess":
        from dmaf_jax import dataset

        dataset.preprocess_command(cfg, workdir)
    elif mode == "train":
        from dmaf_jax import train

        r = train.train(cfg, workdir)
        best = r.best.get("dice") or {}
        print(f"last checkpoint: step {r.last['step']} {r.last['metrics']} ({r.seconds:.0f} s)")
        if best.get("step") is not None:
            print(f"best validation Dice: step {best['step']} {best['metrics']}")
    elif mode in ("evaluate", "predict"):
        from dmaf_jax import evaluate

        if mode == "evaluate":
            evaluate.evaluate_command(cfg, workdir)
        else:
            evaluate.predict_command(cfg, workdir)
    else:
        raise ValueError(f"DMAF-Net has no --mode={mode}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    import jax

    if FLAGS.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    cfg = FLAGS.config
    workdir = _workdir(cfg)
    logging.info(
        "config %s:%s, mode %s, workdir %s", cfg.model_name, cfg.variant, FLAGS.mode, workdir
    )
    from common.training import Interrupted
    from famf_jax.dataset import DataError

    try:
        if cfg.model_name == "famf":
            _famf(cfg, FLAGS.mode, workdir)
        elif cfg.model_name == "dmaf":
            _dmaf(cfg, FLAGS.mode, workdir)
        else:
            raise ValueError(f"unknown model {cfg.model_name!r}")
    except (DataError, FileNotFoundError, ValueError) as e:  # CaseError is a ValueError
        sys.exit(f"error: {e}")
    except Interrupted as e:  # SIGINT/SIGTERM during training: a checkpoint was saved
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)


if __name__ == "__main__":  # Grain's worker processes re-import this module
    app.run(main)
