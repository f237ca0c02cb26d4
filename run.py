"""Entry point: python run.py --config configs/famf.py:demo --workdir runs/demo --mode train"""

from __future__ import annotations

import logging as pylogging
import os
import pathlib
import signal
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
    from famf_jax import evaluate, predict, train

    if mode == "train":
        for k, r in enumerate(train.train(cfg, workdir)):
            c = cfg.eval.criterion
            b = r.best[c]
            if b["step"] is None:
                print(f"fold {k}: no checkpoint was validated with {c} ({r.seconds:.0f} s)")
                continue
            shown = {m: b["metrics"].get(m) for m in r.best} if b["metrics"] else None
            print(f"fold {k}: best {c} checkpoint step {b['step']} {shown} ({r.seconds:.0f} s)")
    elif mode == "evaluate":
        result = evaluate.evaluate(cfg, workdir)
        t = result["test"]
        print("test: " + "  ".join(f"{k} {t[k]:.3f}" for k in evaluate.REPORT_KEYS))
        print(f"report: {workdir / 'report.md'}")
    elif mode == "predict":
        print(f"predictions: {predict.predict_folder(cfg, workdir)}")
    elif mode == "import_torch":
        from famf_jax import import_torch

        print(f"imported into {import_torch.import_checkpoint(cfg, workdir)}")
    else:
        raise ValueError(
            f"FAMF-Net has no --mode={mode} (it has train, evaluate, predict, import_torch)"
        )


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
    logging.get_absl_handler().addFilter(_QuietLibraries())
    import jax

    if FLAGS.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from common.training import Interrupted

    try:
        _run(FLAGS.config, FLAGS.mode)
    except Interrupted as e:  # SIGINT/SIGTERM during training: a checkpoint was saved
        _fail(f"stopped: {e}", 128 + e.signum)
    except KeyboardInterrupt:  # Ctrl-C outside training: nothing to save
        _fail("stopped: interrupted", 128 + signal.SIGINT)
    except Exception as e:
        if FLAGS.verbosity >= 1:
            raise
        _fail(f"error: {_describe(e)}")


def _run(cfg, mode: str) -> None:
    if "parallel" in cfg:  # several processes: before anything touches a device
        from common import parallel

        p = cfg.parallel
        parallel.initialize(p.coordinator, p.num_processes, p.process_id)
        if not parallel.is_main():
            logging.set_verbosity(logging.WARNING)  # process 0 logs and reports
        if parallel.jax.process_count() > 1 and mode != "train":
            raise ValueError(
                f"--mode={mode} runs as one process (it needs no collective, and each process "
                "would repeat it and write the same files): start it without "
                "JAX_COORDINATOR_ADDRESS and config.parallel.coordinator"
            )
    workdir = _workdir(cfg)
    logging.info("config %s:%s, mode %s, workdir %s", cfg.model_name, cfg.variant, mode, workdir)
    if cfg.model_name == "famf":
        _famf(cfg, mode, workdir)
    elif cfg.model_name == "dmaf":
        _dmaf(cfg, mode, workdir)
    else:
        raise ValueError(f"unknown model {cfg.model_name!r}")


def _describe(e: BaseException) -> str:
    """One line naming the culprit. Errors of the project's own checks (ValueError,
    OSError and their kinds, a training check's Stopped) carry their message; anything else
    also its type."""
    from common.training import Stopped

    text = " ".join(str(e).split())
    if isinstance(e, ValueError | OSError | Stopped) and text:
        return text
    return f"{type(e).__name__}: {text} (--verbosity=1 shows the traceback)"


def _fail(message: str, code: int = 1) -> None:
    """The message as the last line on stderr, after any pending log output."""
    sys.stdout.flush()
    sys.stderr.flush()
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag or config file as one line instead of a usage
    dump (config_flags embeds the config module's traceback in its message)."""
    try:
        rest = FLAGS(argv)
        FLAGS.config.model_name  # noqa: B018  (a config file's errors surface on first use)
    except (AttributeError, KeyError) as e:  # an override of a field the config lacks
        key = str(e).strip("'\"")
        arg = next((a for a in argv if a.startswith("--config.") and key in a), "--config")
        _fail(f"error: {arg.split('=')[0]}: the config has no field {key!r}")
    except Exception as e:  # flags.Error, or the config module's own exception
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = lines[0] if lines else ""
        flag = first.split(": ")[0] + ": " if first.startswith("flag --") else ""
        flag = "" if lines and lines[-1].startswith(flag) else flag  # already in the message
        _fail(f"error: {flag}{lines[-1] if lines else type(e).__name__}")
    if len(rest) > 1:
        _fail(f"error: unexpected arguments: {' '.join(rest[1:])} (flags are --name=value)")
    return rest


if __name__ == "__main__":  # Grain's worker processes re-import this module
    app.run(main, flags_parser=_parse_flags)
