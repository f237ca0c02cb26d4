"""Batch prediction with trained FAMF-Net folds: per-patient P(malignant) of each fold's
chosen checkpoint and their mean, and, where `evaluate` has fitted them for that checkpoint
and threshold rule, the calibrated probability and the decision (folds combined in logit
space, `common.calibration.combine_folds`), for a folder in the original layout or a CSV
manifest."""

from __future__ import annotations

import csv
import pathlib

import numpy as np
from absl import logging

from common import atomic, calibration
from famf_jax import dataset
from famf_jax.experiment import (
    check_workdir,
    check_writable,
    choose_checkpoint,
    predict_records,
    restore_for_eval,
    trained_folds,
    uses_fusion,
    validate_config,
)
from famf_jax.operating_point import read_calibration, threshold_rule


def _output_path(cfg, workdir: pathlib.Path) -> pathlib.Path:
    """`predict.output` (default <workdir>/predictions.csv), checked before any work."""
    out = pathlib.Path(cfg.predict.output or workdir / "predictions.csv")
    if out.is_dir():
        raise IsADirectoryError(f"predict.output {out} is a folder, expected a CSV file name")
    check_writable(out.parent, f"predict.output {out}")
    return out


def read_predict_input(src: str | None) -> tuple[list[dataset.Record], list[str]]:
    """The patients of `predict.input` (a layout root or a CSV manifest, labels optional)
    whose images decode, and the warnings; none usable is an error naming the left-out ones."""
    if not src:
        raise dataset.DataError("--mode=predict needs --config.predict.input (folder or CSV)")
    path = pathlib.Path(src)
    if not path.exists():
        raise FileNotFoundError(f"predict.input {src} does not exist (expected a folder or CSV)")
    problems: list[str] = []
    excluded: dict[str, str] = {}
    if path.is_file():
        records, _ = dataset.read_manifest(
            path, problems, require_label=False, excluded=excluded, field="predict.input"
        )
    else:
        records = dataset.scan_layout(
            path, problems, require_label=False, excluded=excluded, field="predict.input"
        )
    recs = dataset.check_images(list(records.values()), problems, excluded)
    for p in problems:
        logging.warning("predict: %s", p)
    if not recs:
        lost = list(excluded.items())
        raise dataset.DataError(
            f"predict.input {src}: no usable patient; {len(lost)} left out: "
            + dataset.left_out_text(lost)
        )
    return recs, problems


def predict_folder(cfg, workdir: str | pathlib.Path) -> pathlib.Path:
    """Per-patient P(malignant) for `predict.input` (a layout root or a manifest), per fold
    and averaged, as CSV."""
    validate_config(cfg)
    if not cfg.predict.input:
        raise dataset.DataError("--mode=predict needs --config.predict.input (folder or CSV)")
    workdir = check_workdir(workdir, must_exist=True)
    out = _output_path(cfg, workdir)
    folds = trained_folds(workdir)
    if not folds:
        raise FileNotFoundError(
            f"no trained folds in {workdir} (no fold_<k>/checkpoints): train first "
            "(--mode=train) or import weights (--mode=import_torch)"
        )
    chosen = {k: choose_checkpoint(cfg, workdir, k) for k in folds}
    rule = threshold_rule(cfg)
    calibs = {k: read_calibration(workdir, k, chosen[k][0], rule) for k in folds}
    recs, _ = read_predict_input(cfg.predict.input)
    fused = uses_fusion(cfg)
    per_fold, calibrated, thresholds = [], [], []
    for k in folds:
        variables, meta = restore_for_eval(cfg, workdir, k, chosen[k])
        p = predict_records(
            cfg, variables, recs, warm=fused and meta.get("warm", True), desc=f"predict fold {k}"
        )
        per_fold.append(p)
        calib = calibs[k]
        if calib is not None:
            calibrated.append(calibration.apply_temperature(p, calib["temperature"]))
            thresholds.append(calib["threshold"])
    if len(calibrated) < len(folds):
        logging.warning(
            "predict: no usable calibration for some folds (run --mode=evaluate first): the "
            "calibrated probability and the decision are left empty"
        )
        calibrated = []
    out.parent.mkdir(parents=True, exist_ok=True)
    mean = np.mean(per_fold, axis=0)
    cal, threshold = (
        calibration.combine_folds(calibrated, thresholds) if calibrated else (None, None)
    )
    with atomic.open_text(out, newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "patient_id",
                "prob_malignant",
                "prob_calibrated",
                "malignant",
                *[f"fold_{k}" for k in folds],
                "label",
            ]
        )
        for i, r in enumerate(recs):
            w.writerow(
                [
                    r.patient_id,
                    f"{mean[i]:.6f}",
                    # in full (shortest round trip): a score 5e-9 above a threshold of 1e-9
                    # must not read 0.000000 beside its decision 1
                    "" if cal is None else repr(float(cal[i])),
                    "" if cal is None else int(cal[i] >= threshold),
                    *[f"{p[i]:.6f}" for p in per_fold],
                    "" if r.label < 0 else r.label,
                ]
            )
    return out
