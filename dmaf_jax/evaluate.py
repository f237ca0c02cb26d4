"""DMAF-Net evaluation (`--mode=evaluate`, spec section 7) and the entry of `--mode=predict`.

One checkpoint (`experiment.restore_params`: `eval.checkpoint`, else the best by validation
Dice, else the latest) on the test split (`eval.split`), every case under every combination of
modalities (`eval.combinations`: a subset). Each case goes through `SlidingWindow` once: the
encoders run once per window and the fusion and the fusion decoder once per combination, in
one compiled program for all combinations and all cases.

Metrics (`common.metrics`) are computed on the preprocessed grid (the cropped, possibly zoomed
volume the network sees, spec 7.1) with that grid's voxel spacing in mm from the case's
metadata. HD95's value for exactly one empty mask is `eval.hd95_empty` (default: the BraTS
convention, 373.13 mm; PASSION's 1.0 when `faithful`). Aggregation as spec 7.3: the mean over
the cases per combination, and the average of the combination means.

MyoPS: 2-D slices, the same metrics per test slice (the paper's protocol) and per subject on
the volume of its test slices stacked (`volumes`), with the 3-D spacing.

Outputs in the workdir: `results.csv` (a row per case and combination), for MyoPS
`results_volumes.csv`, `table.md` and `table.csv` (the paper's layout, Dice x100),
`metrics.json` and `report.md` with figures under `figures/`.
"""

from __future__ import annotations

import csv
import pathlib
import time

import numpy as np
from absl import logging

from common import atomic
from common import metrics as metrics_lib
from common.logging import progress
from dmaf_jax import dataset, experiment, splits
from dmaf_jax.inference import to_model_input
from dmaf_jax.modalities import DatasetSpec
from dmaf_jax.preprocess import read_meta

REGIONS = {"brats2020": metrics_lib.BRATS_REGIONS, "myops2020": metrics_lib.MYOPS_REGIONS}
# The paper tables' modality columns, in their order (not the channel order).
TABLE_MODALITIES = {
    "brats2020": (("FLAIR", "flair"), ("T1", "t1"), ("T1ce", "t1ce"), ("T2", "t2")),
    "myops2020": (("bSSFP", "bssfp"), ("LGE", "lge"), ("T2", "t2")),
}
REGION_TITLES = {
    "wt": "WT",
    "tc": "TC",
    "et": "ET",
    "et_post": "ET (post)",
    "lvb": "LVB",
    "rvb": "RVB",
    "myo": "MYO",
    "scar": "Scar",
    "scar_oedema": "Scar+Oedema",
}
CLASS_NAMES = {
    "brats2020": {1: "necrosis/non-enhancing", 2: "oedema", 3: "enhancing"},
    "myops2020": {1: "myocardium", 2: "LV blood pool", 3: "RV blood pool", 4: "oedema", 5: "scar"},
}
METRICS = metrics_lib.SEGMENTATION_KEYS  # dice, hd95, sensitivity, specificity
HD95_EMPTY = ("brats", "passion")
SPLITS = ("test", "val", "train")


def region_keys(spec: DatasetSpec) -> tuple[str, ...]:
    """The scored regions: BraTS WT, TC, ET and post-processed ET; MyoPS its five."""
    keys = tuple(REGIONS[spec.name])
    return keys + ("et_post",) if spec.name == "brats2020" else keys


def combination_name(spec: DatasetSpec, mask) -> str:
    """The present modalities in channel order joined with '+', e.g. 'flair+t1ce+t1+t2'."""
    return "+".join(m for m, p in zip(spec.modalities, mask) if p)


def combinations(spec: DatasetSpec, selection: str | None = None) -> tuple[list[str], np.ndarray]:
    """(names, masks (C, M) bool) in the spec's id order (section 7.2): all of them, or those of
    `selection`, comma-separated names ('flair+t2', any modality order) or presence strings
    ('1001')."""
    all_masks = spec.combination_masks()
    if selection:
        wanted = set()
        for item in selection.split(","):
            item = item.strip().lower()
            if not item:
                continue
            if len(item) == len(spec.modalities) and set(item) <= {"0", "1"}:
                mask = tuple(c == "1" for c in item)
            else:
                parts = [p.strip() for p in item.split("+")]
                unknown = [p for p in parts if p not in spec.modalities]
                if unknown:
                    raise ValueError(
                        f"eval.combinations: unknown modality {unknown[0]!r} in {item!r} "
                        f"(modalities: {', '.join(spec.modalities)})"
                    )
                mask = tuple(m in parts for m in spec.modalities)
            if not any(mask):
                raise ValueError(f"eval.combinations: {item!r} has no modality")
            wanted.add(mask)
        if not wanted:
            raise ValueError(f"eval.combinations={selection!r} names no combination")
        all_masks = np.array([m for m in all_masks if tuple(m) in wanted], bool)
    return [combination_name(spec, m) for m in all_masks], all_masks


def hd95_convention(cfg) -> str:
    """`eval.hd95_empty`, or by default PASSION's when `faithful` (section 11.16), else BraTS."""
    empty = cfg.eval.hd95_empty or ("passion" if cfg.faithful else "brats")
    if empty not in HD95_EMPTY:
        raise ValueError(f"eval.hd95_empty must be brats or passion, not {empty!r}")
    return empty


def validate_config(cfg) -> None:
    """One-line errors for the eval block (the model's and data's: their own validators)."""
    experiment.validate_config(cfg)
    e = cfg.eval
    hd95_convention(cfg)
    if e.hd95_variant not in metrics_lib.HD95_VARIANTS:
        raise ValueError(f"eval.hd95_variant must be medpy or monai, not {e.hd95_variant!r}")
    if e.split not in SPLITS:
        raise ValueError(f"eval.split must be one of {', '.join(SPLITS)}, not {e.split!r}")
    if e.checkpoint is not None and e.checkpoint < 0:
        raise ValueError(f"eval.checkpoint must be a saved step (>= 0), not {e.checkpoint}")
    if e.overlays < 0:
        raise ValueError(f"eval.overlays must be at least 0, not {e.overlays}")
    combinations(experiment.spec_of(cfg), e.combinations)


def case_meta(root: pathlib.Path, name: str) -> dict | None:
    """The metadata of a preprocessed name (BraTS: its own; MyoPS slice: its subject's)."""
    for stem in (name, splits.subject_of(name)):
        meta = read_meta(root / "meta" / f"{stem}.json")
        if meta is not None:
            return meta
    return None


def _spacing(meta: dict | None, rank: int, name: str, warned: list) -> tuple[float, ...]:
    if meta is None or "spacing" not in meta:
        if not warned:
            logging.warning("no metadata spacing for %s (and maybe others): 1 mm per voxel", name)
            warned.append(name)
        return (1.0,) * rank
    return tuple(float(s) for s in meta["spacing"][:rank])


def _scores(pred, gt, regions, spacing, cfg, empty) -> dict[str, dict[str, float]]:
    return metrics_lib.region_metrics(
        pred,
        gt,
        regions,
        spacing,
        empty=empty,
        variant=cfg.eval.hd95_variant,
        et_post=True,
        et_min_voxels=metrics_lib.et_min_voxels(cfg.data.zoom),
    )


def _mean(rows: list[dict], names: list[str], keys) -> dict:
    """{combination: {region: {metric: mean over rows}}} from rows with 'combination' and
    'scores'."""
    out = {}
    for name in names:
        mine = [r["scores"] for r in rows if r["combination"] == name]
        out[name] = {k: {m: float(np.mean([s[k][m] for s in mine])) for m in METRICS} for k in keys}
    return out


def _average(per_combination: dict, keys) -> dict:
    """Section 7.3's Avg: the mean of the combination means."""
    vals = list(per_combination.values())
    return {k: {m: float(np.mean([v[k][m] for v in vals])) for m in METRICS} for k in keys}


def _figure_slice(seg: np.ndarray, rank: int) -> int | None:
    """The axial slice (last axis) with the most labelled voxels; None for 2-D."""
    if rank == 2:
        return None
    per_slice = (seg > 0).reshape(-1, seg.shape[-1]).sum(0)
    return int(per_slice.argmax()) if per_slice.any() else seg.shape[-1] // 2


def _at(x: np.ndarray, z: int | None, spatial_axes_end: int) -> np.ndarray:
    """x[..., z] on the last spatial axis (position `spatial_axes_end - 1`), or x for 2-D."""
    if z is None:
        return x
    return np.take(x, z, axis=spatial_axes_end - 1)


def evaluate(cfg, workdir: str | pathlib.Path) -> dict:
    """Evaluate the chosen checkpoint; writes the outputs listed in the module docstring and
    returns the content of `metrics.json`."""
    validate_config(cfg)
    workdir = pathlib.Path(workdir)
    start = time.time()
    spec = experiment.spec_of(cfg)
    names, masks = combinations(spec, cfg.eval.combinations)
    empty = hd95_convention(cfg)
    experiment.checkpoint_meta(cfg, workdir)  # no checkpoint: stop before any data work
    prep = dataset.prepare(cfg, workdir, need={cfg.eval.split: 1})  # names left-out cases
    params, ckpt_meta = experiment.restore_params(cfg, workdir)
    cases = prep.cases(cfg.eval.split)
    rank = experiment.spatial_rank(cfg)
    regions = REGIONS[spec.name]
    keys = region_keys(spec)
    window = experiment.inference_window(cfg)
    drawn = {c.name for c in cases[: max(0, cfg.eval.overlays)]}
    logging.info(
        "evaluating step %s on %d %s cases x %d combinations (HD95 one-empty: %s)",
        ckpt_meta.get("step"),
        len(cases),
        cfg.eval.split,
        len(names),
        empty,
    )
    rows, figures, slices, warned = [], [], {}, []
    bar = progress(total=len(cases) * len(names), desc="evaluate", unit="case x comb")
    infer_seconds = 0.0
    for case in cases:
        vol = to_model_input(np.load(case.vol), rank)
        seg = np.load(case.seg)
        seg = seg[:, :, 0] if rank == 2 else seg
        meta = case_meta(prep.root, case.name)
        spacing = _spacing(meta, rank, case.name, warned)

        def windows(batches, case=case):
            for i, b in enumerate(batches):
                bar.set_postfix_str(f"{case.name}: windows {i + 1}/{len(batches)}")
                yield b

        t0 = time.time()
        if case.name in drawn:
            probs, att = window.predict(params, vol, masks, windows, weights=True)
        else:
            probs, att = window.predict(params, vol, masks, windows), None
        infer_seconds += time.time() - t0
        labels = probs.argmax(-1).astype(np.uint8)  # (C, *S)
        del probs
        for c, name in enumerate(names):
            scores = _scores(labels[c], seg, regions, spacing, cfg, empty)
            rows.append({"case": case.name, "combination": name, "scores": scores})
            bar.update(1)
        if spec.name == "myops2020":
            slices[case.name] = labels
        if att is not None:
            z = _figure_slice(seg, rank)
            figures.append(
                {
                    "case": case.name,
                    "image": _at(vol[..., 0], z, rank),
                    "gt": _at(seg, z, rank),
                    "pred": _at(labels, z, rank + 1),  # (C, H, W)
                    "att": np.moveaxis(_at(att, z, rank + 1), -1, 1),  # (C, M, H, W)
                    "slice": z,
                }
            )
    bar.close()
    per_comb = _mean(rows, names, keys)
    result = {
        "dataset": spec.name,
        "split": cfg.eval.split,
        "checkpoint": {k: ckpt_meta.get(k) for k in ("step", "epoch", "metrics")},
        "cases": len(cases),
        "conventions": conventions(cfg, spec, empty),
        "combinations": per_comb,
        "average": _average(per_comb, keys),
    }
    vol_rows = []
    if spec.name == "myops2020":
        vol_rows, notes = _volume_rows(cfg, prep.root, slices, names, masks, empty, warned)
        result["subjects"] = len({r["case"] for r in vol_rows})
        result["volumes"] = _mean(vol_rows, names, keys)
        result["volumes_average"] = _average(result["volumes"], keys)
        result["volume_notes"] = notes
    result["compilations"] = window.compilations()
    result["seconds"] = {"total": time.time() - start, "inference": infer_seconds}
    _write_outputs(cfg, spec, workdir, result, rows, vol_rows, names, masks, figures)
    return result


def _volume_rows(cfg, root, slices: dict, names, masks, empty, warned):
    """MyoPS: per subject, its evaluated slices stacked in slice order into a volume
    (C, H, W, D), scored with the 3-D spacing."""
    regions = REGIONS["myops2020"]
    by_subject: dict[str, list[str]] = {}
    for name in slices:
        by_subject.setdefault(splits.subject_of(name), []).append(name)
    rows, notes = [], []
    for subject, members in sorted(by_subject.items()):
        members.sort(key=lambda n: int(n.rsplit("_slice_", 1)[1]))
        meta = read_meta(root / "meta" / f"{subject}.json")
        outputs = (meta or {}).get("outputs")
        if outputs is not None and sorted(outputs) != sorted(members):
            notes.append(
                f"{subject}: {len(members)} of its {len(outputs)} slices evaluated; the volume "
                "stacks those"
            )
        pred = np.stack([slices[n] for n in members], axis=-1)  # (C, H, W, D)
        gt = np.stack([np.load(root / "seg" / f"{n}_seg.npy")[:, :, 0] for n in members], -1)
        spacing = _spacing(meta, 3, subject, warned)
        for c, name in enumerate(names):
            scores = _scores(pred[c], gt, regions, spacing, cfg, empty)
            rows.append({"case": subject, "combination": name, "scores": scores})
    for n in notes:
        logging.warning("volumes: %s", n)
    return rows, notes


def conventions(cfg, spec: DatasetSpec, empty: str) -> dict:
    one_empty = {"brats": metrics_lib.BRATS_EMPTY_HD95, "passion": metrics_lib.PASSION_EMPTY_HD95}[
        empty
    ]
    regions = ", ".join(f"{REGION_TITLES[k]} = {set(v)}" for k, v in REGIONS[spec.name].items())
    text = (
        "Metrics on the preprocessed grid (the cropped"
        + (f", zoomed x{cfg.data.zoom}" if cfg.data.zoom != 1 else "")
        + " volume the network sees) with its voxel spacing in mm from each case's metadata. "
        f"Regions (stored labels): {regions}"
        + (
            "; ET (post): the ET prediction emptied when it has fewer than "
            f"{metrics_lib.et_min_voxels(cfg.data.zoom)} voxels (500 at 1 mm), the ground truth "
            "unchanged"
            if spec.name == "brats2020"
            else ""
        )
        + ". Dice: both masks empty 1, exactly one empty 0. HD95: "
        + (
            "medpy's (the 95th percentile of both directions' surface distances pooled, "
            "surfaces by 6-connected erosion, 4-connected in 2-D)"
            if cfg.eval.hd95_variant == "medpy"
            else "MONAI's (the larger of the two directed 95th percentiles)"
        )
        + f"; both empty 0, exactly one empty {one_empty:.5f} ("
        + (
            "the BraTS convention, sqrt(240^2 + 240^2 + 155^2)"
            if empty == "brats"
            else "PASSION's convention, which rewards a missed or spurious region"
        )
        + "). Means over the "
        + ("test slices (and, under volumes, the subjects)" if spec.name == "myops2020" else "")
        + ("cases" if spec.name == "brats2020" else "")
        + " per combination; Avg = the mean of the combination means."
    )
    return {
        "text": text,
        "hd95_empty": empty,
        "hd95_one_empty_value": one_empty,
        "hd95_variant": cfg.eval.hd95_variant,
        "grid": "preprocessed",
        "et_post_min_voxels": (
            metrics_lib.et_min_voxels(cfg.data.zoom) if spec.name == "brats2020" else None
        ),
    }


def _csv_rows(path: pathlib.Path, rows: list[dict], keys, first: tuple[str, ...]) -> None:
    with atomic.open_text(path, newline="") as f:
        w = csv.writer(f)
        w.writerow([*first, "combination", *(f"{k}_{m}" for k in keys for m in METRICS)])
        for r in rows:
            lead = [r["case"]] + ([splits.subject_of(r["case"])] if len(first) == 2 else [])
            w.writerow(
                [*lead, r["combination"]]
                + [f"{r['scores'][k][m]:.6f}" for k in keys for m in METRICS]
            )


def paper_table(spec: DatasetSpec, result: dict, metric: str = "dice", key="combinations"):
    """(header, rows) in the paper's layout: filled/empty circles per modality in the paper's
    column order, then the metric per region (Dice x100), an Avg row last."""
    cols = TABLE_MODALITIES[spec.name]
    keys = region_keys(spec)
    scale = 100.0 if metric == "dice" else 1.0
    header = [t for t, _ in cols] + [REGION_TITLES[k] for k in keys]
    rows = []
    for name, regions in result[key].items():
        present = set(name.split("+"))
        rows.append(
            ["●" if m in present else "○" for _, m in cols]
            + [f"{scale * regions[k][metric]:.2f}" for k in keys]
        )
    avg = result["average" if key == "combinations" else f"{key}_average"]
    rows.append(["Avg"] + [""] * (len(cols) - 1) + [f"{scale * avg[k][metric]:.2f}" for k in keys])
    return header, rows


def _markdown(header, rows) -> str:
    n_mod = sum(1 for h in header if h not in REGION_TITLES.values())
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + ":-:|" * n_mod + "--:|" * (len(header) - n_mod))
    for r in rows:
        cells = [f"**{c}**" if r[0] == "Avg" and c else c for c in r]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_outputs(cfg, spec, workdir, result, rows, vol_rows, names, masks, figures) -> None:
    keys = region_keys(spec)
    myops = spec.name == "myops2020"
    _csv_rows(workdir / "results.csv", rows, keys, ("case", "subject") if myops else ("case",))
    if myops:
        _csv_rows(workdir / "results_volumes.csv", vol_rows, keys, ("subject",))
    header, table = paper_table(spec, result)
    atomic.write_text(workdir / "table.md", _markdown(header, table) + "\n")
    with atomic.open_text(workdir / "table.csv", newline="") as f:
        csv.writer(f).writerows([header, *table])
    atomic.write_json(workdir / "metrics.json", result)
    write_report(cfg, spec, workdir, result, names, masks, figures)


def write_report(cfg, spec, workdir, result, names, masks, figures) -> pathlib.Path:
    from common import viz  # matplotlib: 0.6 s of start-up a failing run does not need

    figs = workdir / "figures"
    figs.mkdir(exist_ok=True)
    rank = experiment.spatial_rank(cfg)
    ck = result["checkpoint"]
    subset = len(names) < len(spec.combinations)
    unit = "slices" if spec.name == "myops2020" else "cases"
    lines = [
        "# DMAF-Net evaluation report",
        "",
        f"Dataset {spec.name}, config variant `{cfg.variant}`, faithful={cfg.faithful}. "
        f"Checkpoint step {ck['step']} (epoch {ck['epoch']}; "
        + (
            f"`eval.checkpoint={cfg.eval.checkpoint}`"
            if cfg.eval.checkpoint is not None
            else "the best by validation Dice, else the latest"
        )
        + f"), {result['cases']} {cfg.eval.split} {unit}, {len(names)} combinations"
        + (" (a subset: Avg is over these)" if subset else "")
        + f". Sliding windows {tuple(experiment.model_crop(cfg))}, overlap {cfg.eval.overlap}, "
        f"{cfg.eval.windows_per_call} per call; inference {result['seconds']['inference']:.0f} s "
        f"of {result['seconds']['total']:.0f} s.",
        "",
        f"## Dice x100 (mean over the {unit})",
        "",
        _markdown(*paper_table(spec, result)),
        "",
        f"## HD95 in mm (mean over the {unit})",
        "",
        _markdown(*paper_table(spec, result, "hd95")),
    ]
    if "volumes" in result:
        lines += [
            "",
            f"## Per subject volume ({result['subjects']} subjects, 3-D metrics): Dice x100",
            "",
            _markdown(*paper_table(spec, result, "dice", "volumes")),
            "",
            "## Per subject volume: HD95 in mm",
            "",
            _markdown(*paper_table(spec, result, "hd95", "volumes")),
        ]
        lines += [f"\n- {n}" for n in result["volume_notes"]]
    transpose = rank == 3
    for fig in figures:
        where = f"axial slice {fig['slice']}" if fig["slice"] is not None else "the slice"
        pred_png = viz.label_overlays(
            fig["image"],
            [("ground truth", fig["gt"])] + list(zip(names, fig["pred"])),
            figs / f"{fig['case']}_predictions.png",
            CLASS_NAMES[spec.name],
            ncols=4,
            transpose=transpose,
            title=f"{fig['case']}, {where}: prediction per combination",
        )
        att_png = viz.attention_grid(
            fig["att"],
            names,
            spec.modalities,
            masks,
            figs / f"{fig['case']}_attention.png",
            transpose=transpose,
            title=f"{fig['case']}: DMAF attention per modality, level 1",
        )
        lines += [
            "",
            f"## {fig['case']}",
            "",
            f"Predictions per combination ({where}, image: {spec.modalities[0]}):",
            "",
            f"![predictions](figures/{pred_png.name})",
            "",
            "DMAF attention maps at level 1 (full resolution): the weight of each modality per "
            "voxel, averaged over the windows; rows are combinations, 0 where a modality is "
            "missing.",
            "",
            f"![attention](figures/{att_png.name})",
        ]
    lines += [
        "",
        "## Conventions",
        "",
        result["conventions"]["text"],
        "",
        "Files: `results.csv` (a row per case and combination: Dice, HD95, sensitivity and "
        "specificity per region)"
        + (", `results_volumes.csv` (per subject volume)" if "volumes" in result else "")
        + ", `table.md` / `table.csv` (the table above), `metrics.json`.",
        "",
    ]
    path = atomic.write_text(workdir / "report.md", "\n".join(lines))
    return path


def evaluate_command(cfg, workdir: str | pathlib.Path) -> dict:
    """`run.py --mode=evaluate`: evaluate and print the table and where the outputs are."""
    workdir = pathlib.Path(workdir)
    result = evaluate(cfg, workdir)
    print((workdir / "table.md").read_text())
    avg = result["average"]
    print(
        "average over combinations: "
        + "  ".join(f"{k} Dice {v['dice']:.4f} HD95 {v['hd95']:.2f}" for k, v in avg.items())
    )
    print(f"report: {workdir / 'report.md'}  metrics: {workdir / 'metrics.json'}")
    return result


def predict_command(cfg, workdir: str | pathlib.Path) -> list[dict]:
    """`run.py --mode=predict`: NIfTI predictions for `predict.input` (see `predict.py`)."""
    from dmaf_jax import predict

    results = predict.predict_folder(cfg, workdir)
    for r in results:
        missing = f" (missing: {', '.join(r['missing'])})" if r["missing"] else ""
        print(f"{r['case']}: {r['prediction']}{missing}")
    return results
