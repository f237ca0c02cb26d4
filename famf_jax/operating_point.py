"""A fold's operating point: temperature and decision threshold fitted on its validation
split (`common.calibration`, chosen by `eval.operating_point`), kept in
`fold_<k>/calibration.json` with the checkpoint step and threshold rule they belong to, and
the test metrics at that threshold. `evaluate` fits and writes them; `predict` reads them
back only for the same checkpoint and rule."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
from absl import logging

from common import atomic, calibration
from common import metrics as metrics_lib
from famf_jax.experiment import fold_dir

OPERATING_POINT_KEYS = ("threshold", "f1", "sensitivity", "specificity", "precision")
RULE_NOTES = {
    "best kernel-smoothed F1": ", each validation logit read as a Gaussian of its class's "
    "Silverman bandwidth",
    "best F1": ", halfway in logit space between the cases it separates",
}


def _target_sensitivity(cfg) -> float | None:
    return cfg.eval.target_sensitivity if cfg.eval.operating_point == "sensitivity" else None


def threshold_rule(cfg) -> str:
    """How `eval.operating_point` (and `eval.target_sensitivity`) choose the threshold, as
    calibration.json records it."""
    if cfg.eval.operating_point == "sensitivity":
        return f"sensitivity >= {cfg.eval.target_sensitivity}"
    return {"smoothed_f1": "best kernel-smoothed F1", "f1": "best F1"}[cfg.eval.operating_point]


def fit_calibration(cfg, labels: np.ndarray, prob_pos: np.ndarray) -> dict:
    """Temperature and decision threshold of a fold, from its validation split; `warning`
    says why they mean little (None if they do not)."""
    t = calibration.fit_temperature(labels, prob_pos)
    q = calibration.apply_temperature(prob_pos, t)
    smoothed = cfg.eval.operating_point == "smoothed_f1"
    threshold = calibration.choose_threshold(labels, q, _target_sensitivity(cfg), smoothed)
    weak = calibration.weak_validation(labels, prob_pos, t, smoothed)
    if weak:
        logging.warning("calibration: %s", weak)
    return {
        "temperature": t,
        "threshold": threshold,
        "rule": threshold_rule(cfg),
        "valid_cases": len(labels),
        "warning": weak,
    }


def calibration_path(workdir: pathlib.Path, fold: int) -> pathlib.Path:
    return fold_dir(workdir, fold) / "calibration.json"


def read_calibration(
    workdir: pathlib.Path, fold: int, step: int, rule: str | None = None
) -> dict | None:
    """A fold's calibration.json if it was fitted for checkpoint `step` and, if given, by
    threshold rule `rule` (None, with a warning, if it belongs to another checkpoint or rule:
    evaluate ran with another eval.checkpoint, criterion or operating point; None if
    evaluation has not written one); a damaged file is an error naming it."""
    path = calibration_path(workdir, fold)
    if not path.exists():
        return None
    try:
        calib = json.loads(path.read_text())
        t, threshold = float(calib["temperature"]), float(calib["threshold"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path} is damaged ({type(e).__name__}: {e}): run --mode=evaluate again"
        ) from None
    if not (t > 0 and math.isfinite(t) and math.isfinite(threshold)):
        raise ValueError(f"{path}: temperature {t} or threshold {threshold} is not usable")
    if calib.get("step") != step:
        logging.warning(
            "fold %d's calibration was fitted for checkpoint %s, this run restores %s (run "
            "--mode=evaluate with the same eval.checkpoint and eval.criterion)",
            fold,
            calib.get("step", "unknown (a calibration.json from before steps were recorded)"),
            step,
        )
        return None
    if rule is not None and calib.get("rule") != rule:
        logging.warning(
            "fold %d's threshold was chosen by %s, this run asks for %s (run --mode=evaluate "
            "with the same eval.operating_point and eval.target_sensitivity)",
            fold,
            calib.get("rule", "an unrecorded rule"),
            rule,
        )
        return None
    return calib


def write_calibration(workdir: pathlib.Path, fold: int, calib: dict) -> None:
    path = calibration_path(workdir, fold)
    atomic.write_json(path, calib)


def operating_point_metrics(labels: np.ndarray, q: np.ndarray, calib: dict) -> dict:
    """Test metrics of calibrated probabilities `q` at the validation-chosen threshold."""
    m = metrics_lib.classification_metrics(labels, q, threshold=calib["threshold"])
    op = {"threshold": calib["threshold"], **{k: m[k] for k in OPERATING_POINT_KEYS[1:]}}
    return {
        "operating_point": op,
        "ece_calibrated": metrics_lib.expected_calibration_error(labels, q),
    }
