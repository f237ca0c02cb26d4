"""Evaluation and reports for trained FAMF-Net folds.

`evaluate` restores each fold's checkpoint (the best by `eval.criterion`, F1 + accuracy by
default, or `eval.checkpoint`), runs the eval-mode two-pass network on the fold's validation
and the fixed test set, and writes `metrics.json`, `report.md` and the figures to the workdir.
Per fold it also fits a temperature and a decision threshold on the validation split
(`common.calibration`, `eval.operating_point`), reports the test set at that operating point
beside the fixed 0.5, and keeps them in `fold_<k>/calibration.json` (`operating_point`) for
`famf_jax.predict`.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

from common import atomic, calibration
from common import metrics as metrics_lib
from common.loader import iterate
from common.logging import read_jsonl
from famf_jax import dataset, inference, pipeline
from famf_jax.experiment import (
    check_workdir,
    choose_checkpoint,
    fold_dir,
    image_config,
    resolve_data,
    restore_for_eval,
    split_metrics,
    uses_fusion,
    validate_config,
)
from famf_jax.operating_point import (
    OPERATING_POINT_KEYS,
    RULE_NOTES,
    fit_calibration,
    operating_point_metrics,
    write_calibration,
)

REPORT_KEYS = metrics_lib.CLASSIFICATION_KEYS
CONVENTIONS = (
    "Class 1 (malignant) is positive; prediction = P(malignant) >= 0.5; ratios with a zero "
    "denominator are 0; ROC-AUC and PR-AUC (average precision) as scikit-learn; 95% CIs are "
    "percentile bootstraps over test patients; ECE uses 10 equal-width bins of P(malignant)."
)


def summarise_test(folds: list[dict], calibrated: list[np.ndarray]) -> dict:
    """metrics.json's `test`: one fold's test metrics; over several, each metric's mean over
    folds (`std` beside it), the threshold as the folds' mean in logit space (the ensemble's,
    `calibration.mean_threshold`) and, when every fold has the same test patients, `ensemble`:
    the metrics of what predict outputs, the folds' calibrated probabilities and thresholds
    combined (`calibration.combine_folds`)."""
    if len(folds) == 1:
        return dict(folds[0]["test"])
    keys = [*REPORT_KEYS, "specificity_at_90_sensitivity", "specificity_at_95_sensitivity"]
    summary = metrics_lib.summarise_folds(
        [f["test"] for f in folds], keys + ["ece", "ece_calibrated"]
    )
    out = {k: v["mean"] for k, v in summary.items()}
    out["std"] = {k: v["std"] for k, v in summary.items()}
    ops = metrics_lib.summarise_folds(
        [f["test"]["operating_point"] for f in folds], OPERATING_POINT_KEYS[1:]
    )
    thresholds = [f["calibration"]["threshold"] for f in folds]
    out["operating_point"] = {
        "threshold": calibration.mean_threshold(thresholds),
        **{k: v["mean"] for k, v in ops.items()},
        "std": {k: v["std"] for k, v in ops.items()},
    }
    ids = [[r["patient_id"] for r in f["predictions"]] for f in folds]
    if all(i == ids[0] for i in ids):
        y = np.array([r["label"] for r in folds[0]["predictions"]])
        q, t = calibration.combine_folds(calibrated, thresholds)
        out["ensemble"] = {
            "roc_auc": metrics_lib.roc_auc(y, q),
            **operating_point_metrics(y, q, {"threshold": t}),
        }
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def _overlay_rows(cfg, variables, records, n: int, warm: bool) -> list[dict]:
    # A checkpoint taken before the warm-up ended is evaluated without MAF: its CAMs are not
    # part of its prediction, and a warm pass would show an untrained MAF's.
    if n <= 0 or not records or not warm:
        return []
    picks = sorted(records, key=lambda r: -r.label)[:n]  # malignant first: the rarer class
    batch = next(iter(iterate(pipeline.eval_dataset(picks, image_config(cfg)), 0, len(picks))))
    out = inference.predict(
        variables,
        batch["bmode"],
        batch["swe"],
        faithful=cfg.faithful,
        scaled_attention=cfg.model.scaled_attention,
        bfloat16=cfg.model.bfloat16,
    )
    if "cam_bmode" not in out:
        return []
    rows = []
    for i, r in enumerate(picks):
        title = f"{r.patient_id} y={r.label} p={out['probs'][i, 1]:.2f}"
        rows.append(
            {
                "bmode": batch["bmode"][i],
                "swe": batch["swe"][i],
                "title": title,
                **{k: out[k][i] for k in ("cam_bmode", "cam_swe", "centre_bmode", "centre_swe")},
            }
        )
    return rows


def _rdo_plot(workdir: pathlib.Path, fold: int, path: pathlib.Path) -> pathlib.Path | None:
    from common import viz  # matplotlib: start-up time a failing run does not need

    rows = [r for r in read_jsonl(fold_dir(workdir, fold) / "metrics.jsonl") if "alpha0" in r]
    if not rows:
        return None
    steps = np.array([r["step"] for r in rows])
    series = {
        k: np.array([np.nan if r[k] is None else r[k] for r in rows], float)
        for k in ("alpha0", "gamma", "reward", "loss")
    }
    return viz.series_plot(steps, series, path, f"RDO trajectory, fold {fold}", "step")


def evaluate(cfg, workdir: str | pathlib.Path) -> dict:
    validate_config(cfg)
    # Checkpoints before data: a workdir without one gets no data or split plan written.
    workdir = check_workdir(workdir, must_exist=True)
    choose_checkpoint(cfg, workdir, 0)
    data = resolve_data(cfg, workdir, save=False)
    for k in range(1, len(data.folds)):
        choose_checkpoint(cfg, workdir, k, n_folds=len(data.folds))
    dataset.save_plan(data)
    fused = uses_fusion(cfg)
    folds, curves = [], []
    first_vars = None
    for k in range(len(data.folds)):
        variables, meta = restore_for_eval(cfg, workdir, k)
        warm = fused and bool(meta.get("warm", True))
        valid_records = data.split(k, "valid")
        valid, p_valid = split_metrics(cfg, variables, valid_records, warm, f"fold {k} valid")
        calib = fit_calibration(cfg, np.array([r.label for r in valid_records]), p_valid)
        calib["step"] = meta["step"]  # predict uses it only with this checkpoint
        write_calibration(workdir, k, calib)
        test_records = data.split(k, "test")
        test, p = split_metrics(cfg, variables, test_records, warm, f"fold {k} test")
        y = np.array([r.label for r in test_records])
        test.update(metrics_lib.clinical_extras(y, p, cfg.eval.bootstrap, seed=cfg.seed))
        q = calibration.apply_temperature(p, calib["temperature"])
        test.update(operating_point_metrics(y, q, calib))
        folds.append(
            {
                "fold": k,
                "step": meta["step"],
                "epoch": meta["epoch"],
                "warm": warm,
                "valid": valid,
                "calibration": calib,
                "test": test,
                "predictions": [
                    {"patient_id": r.patient_id, "label": r.label, "prob_malignant": float(q)}
                    for r, q in zip(test_records, p)
                ],
            }
        )
        curves.append((f"fold {k}", y, p, q))
        if first_vars is None:
            first_vars = (variables, test_records, warm)
    test_summary = summarise_test(folds, [c[3] for c in curves])
    result = {
        "criterion": cfg.eval.criterion,
        "conventions": CONVENTIONS,
        "test": test_summary,
        "folds": folds,
        "data_problems": data.problems,
    }
    atomic.write_json(workdir / "metrics.json", result, default=_json_default)
    write_report(cfg, workdir, result, curves, first_vars)
    return result


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o))


def write_report(cfg, workdir: pathlib.Path, result: dict, curves, first) -> pathlib.Path:
    from common import viz  # matplotlib: start-up time a failing run does not need

    figs = workdir / "figures"
    figs.mkdir(exist_ok=True)
    viz.roc_plot([c[:3] for c in curves], figs / "roc.png")
    f0 = result["folds"][0]
    viz.confusion_plot(f0["test"], figs / "confusion.png")
    _, y, p, q = curves[0]
    viz.reliability_plot(y, {"as trained": p, "temperature-scaled": q}, figs / "reliability.png")
    rdo_png = _rdo_plot(workdir, 0, figs / "rdo_trajectory.png")
    overlay_png = None
    if first is not None:
        rows = _overlay_rows(cfg, *first[:2], cfg.eval.overlays, warm=first[2])
        if rows:
            overlay_png = viz.cam_overlays(rows, figs / "cam_overlays.png")

    t = result["test"]
    lines = [
        "# FAMF-Net evaluation report",
        "",
        f"Config variant `{cfg.variant}`, faithful={cfg.faithful}, modalities "
        f"`{cfg.model.modalities}`, fusion={cfg.model.fusion}, RDO={cfg.rdo.enabled}. "
        f"Checkpoint per fold: best by `{result['criterion']}` on validation.",
        "",
        "## Test set" + (" (mean over folds)" if len(result["folds"]) > 1 else ""),
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k in REPORT_KEYS + (
        "specificity_at_90_sensitivity",
        "specificity_at_95_sensitivity",
        "ece",
    ):
        std = t.get("std", {}).get(k)
        lines.append(
            f"| {k} | {_fmt(t[k])}" + (f" ± {_fmt(std)}" if std is not None else "") + " |"
        )
    if len(result["folds"]) == 1:
        lines.append(
            f"| roc_auc 95% CI | {_fmt(t['roc_auc_ci'][0])} – {_fmt(t['roc_auc_ci'][1])} |"
        )
        lines.append(f"| f1 95% CI | {_fmt(t['f1_ci'][0])} – {_fmt(t['f1_ci'][1])} |")
    op, ensemble = t["operating_point"], t.get("ensemble")
    rule = result["folds"][0]["calibration"]["rule"]
    lines += [
        "",
        "## At the validation-chosen operating point",
        "",
        f"Per fold, a temperature fitted on the validation split (maximum likelihood against "
        f"Platt's targets) calibrates P(malignant), and the decision threshold is chosen on the "
        f"calibrated validation probabilities ({rule}{RULE_NOTES.get(rule, '')}); the rows "
        "above use the fixed 0.5 on the raw probabilities.",
        "",
    ]
    if len(result["folds"]) > 1:
        lines += [
            "Mean over folds, each at its own threshold (the threshold: their mean in logit "
            "space, the ensemble's)"
            + (
                "; ensemble: the folds' calibrated probabilities and thresholds combined, as "
                "`--mode=predict` outputs them, on the same test patients."
                if ensemble
                else "."
            ),
            "",
        ]
    lines += [
        "| metric | value |" + (" ensemble |" if ensemble else ""),
        "|---|---|" + ("---|" if ensemble else ""),
    ]

    def row(name: str, value, std, ensemble_value) -> str:
        return (
            f"| {name} | {_fmt(value)}"
            + (f" ± {_fmt(std)}" if std is not None else "")
            + (f" | {_fmt(ensemble_value)}" if ensemble else "")
            + " |"
        )

    for k in OPERATING_POINT_KEYS:
        e = ensemble["operating_point"][k] if ensemble else None
        lines.append(row(k, op[k], op.get("std", {}).get(k), e))
    stds = t.get("std", {})
    e = ensemble["ece_calibrated"] if ensemble else None
    lines.append(row("ece (calibrated)", t["ece_calibrated"], stds.get("ece_calibrated"), e))
    if ensemble:
        lines.append(row("roc_auc", t["roc_auc"], stds.get("roc_auc"), ensemble["roc_auc"]))
    warnings = [
        f"fold {f['fold']}: {f['calibration']['warning']}"
        for f in result["folds"]
        if f["calibration"].get("warning")
    ]
    if warnings:
        lines += ["", *[f"**Warning**, {w}." for w in warnings]]
    lines += [
        "",
        "## Per fold",
        "",
        f"| fold | step | epoch | valid {result['criterion']} | test AUC | test F1 | test sens "
        "| test spec |"
        " test n (pos) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in result["folds"]:
        te, criterion = f["test"], f["valid"].get(result["criterion"])
        lines.append(
            f"| {f['fold']} | {f['step']} | {f['epoch']} | {_fmt(criterion)} "
            f"| {_fmt(te['roc_auc'])} | {_fmt(te['f1'])} | {_fmt(te['sensitivity'])} "
            f"| {_fmt(te['specificity'])} | {te['n']} ({te['n_positive']}) |"
        )
    lines += [
        "",
        "## Figures",
        "",
        "![ROC](figures/roc.png)",
        "![Confusion matrix, fold 0](figures/confusion.png)",
        "![Reliability, fold 0](figures/reliability.png)",
    ]
    if rdo_png:
        lines.append("![RDO trajectory, fold 0](figures/rdo_trajectory.png)")
    if overlay_png:
        lines += [
            "",
            "CAM overlays (fold 0 test patients): `+` B-mode lesion centre, `x` SWE "
            "centre, arrow = the shift RAA applies to the SWE region.",
            "",
            "![CAM overlays](figures/cam_overlays.png)",
        ]
    if result["data_problems"]:
        lines += ["", "## Data problems", ""] + [f"- {p}" for p in result["data_problems"]]
    lines += ["", "## Conventions", "", CONVENTIONS, ""]
    path = atomic.write_text(workdir / "report.md", "\n".join(lines))
    return path
