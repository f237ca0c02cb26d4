"""DMAF-Net predictions for new cases (`--mode=predict`, `--config.predict.input=<folder>`).

The folder holds cases in the dataset's raw layout at any depth (BraTS: `<case>_{flair,t1ce,
t1,t2}.nii(.gz)`, named as in the training or the validation download; MyoPS:
`<case>_{C0,DE,T2}.nii(.gz)`), labels not needed (ignored if present). A case may have any
non-empty subset of the modality files: the missing ones are detected from the files, logged,
and treated as missing by the network (their mask entries are off; their channels are zero).

Cases are preprocessed with the settings the checkpoint was trained with (`min_size`, `zoom`,
`brain_box` from its recorded config, else the current config's) into
`<workdir>/predict_cache/` by `preprocess.preprocess(..., for_prediction=True)`, predicted by
sliding windows (MyoPS slice by slice), and written back into the input's geometry:
`<output>/<case>_pred.nii.gz` with the input's shape, affine and header and the raw label
values (BraTS {0, 1, 2, 4}; MyoPS {0, 200, 500, 600, 1220, 2221}), and with
`predict.probabilities` `<case>_prob.nii.gz` (X, Y, Z, K) float32 (outside the brain crop:
background 1). `<output>/predictions.json` lists each case's present and missing modalities.
"""

from __future__ import annotations

import pathlib

import numpy as np
from absl import logging

from common import atomic, nifti
from common.logging import progress
from dmaf_jax import dataset, experiment, preprocess
from dmaf_jax.inference import to_model_input


def training_settings(cfg, ckpt_meta: dict | None) -> preprocess.Settings:
    """The preprocessing settings of the checkpoint's training run (its recorded config), the
    current config's where it recorded none; a difference is logged."""
    now = {k: cfg.data[k] for k in ("min_size", "zoom", "brain_box")}
    trained = ((ckpt_meta or {}).get("config") or {}).get("data") or {}
    used = {k: trained.get(k, v) for k, v in now.items()}
    if used != now:
        logging.warning(
            "predict: preprocessing as the checkpoint was trained, %s (the config says %s)",
            used,
            now,
        )
    return preprocess.Settings(int(used["min_size"]), float(used["zoom"]), used["brain_box"])


def _save_like(path: pathlib.Path, data: np.ndarray, meta: dict) -> None:
    """`data` in the raw geometry written with the raw image's header (as `save_original`)."""
    ref = pathlib.Path(meta["reference"])
    affine = np.asarray(meta["affine"])
    header = ref if ref.exists() else nifti.header_from_fields(meta["header"], affine)
    nifti.save(path, data, affine, reference=header)


def probabilities_to_original(probs: np.ndarray, meta: dict) -> np.ndarray:
    """(*grid, K) -> (*original_shape, K) float32; background 1 outside the preprocessed crop."""
    out = np.stack(
        [preprocess.to_original(probs[..., k], meta) for k in range(probs.shape[-1])], -1
    )
    inside = preprocess.to_original(np.ones(probs.shape[:-1], bool), meta)
    out[~inside, 0] = 1.0
    return out.astype(np.float32)


def predict_case(window, params, meta: dict, cache: pathlib.Path, rank: int) -> np.ndarray:
    """Averaged probabilities (*meta["shape"], K) of one preprocessed case under its mask."""
    mask = np.asarray(meta["present"], bool)[None]
    probs = []
    for name in meta["outputs"]:  # BraTS: the volume; MyoPS: its slices in order
        vol = to_model_input(np.load(cache / "vol" / f"{name}_vol.npy"), rank)
        probs.append(window.predict(params, vol, mask)[0])
    return probs[0] if rank == 3 else np.stack(probs, axis=2)


def predict_folder(cfg, workdir: str | pathlib.Path) -> list[dict]:
    """Predict every case under `predict.input`; returns per case its name, `present` mask,
    `missing` modalities and the written paths (also in `<output>/predictions.json`).

    The inputs are checked before anything is written or compiled: the config, the folder,
    its cases' files and headers (`preprocess.scan`), the output folder and the checkpoint. A
    case that cannot be read is left out with a warning; when none is left, the error names
    them all, and the folders this call created are removed again."""
    experiment.validate_config(cfg)
    workdir = pathlib.Path(workdir)
    if not cfg.predict.input:
        raise ValueError("--mode=predict needs --config.predict.input=<folder of cases>")
    src = pathlib.Path(cfg.predict.input)
    spec = experiment.spec_of(cfg)
    rank = experiment.spatial_rank(cfg)
    found, problems = preprocess.scan(spec, src, for_prediction=True, what="predict.input")
    if len(problems) == len(found):
        raise preprocess.CaseError(
            f"no case under predict.input {src} can be predicted: {preprocess.left_out(problems)}"
        )
    out_dir = pathlib.Path(cfg.predict.output or workdir / "predictions")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"predict.output {out_dir} is a file, not a folder")
    dataset.check_writable(out_dir, "predict.output" if cfg.predict.output else "--workdir")
    dataset.check_writable(workdir, "--workdir")  # predict_cache/
    _, ckpt_meta = experiment.checkpoint_meta(cfg, workdir)
    settings = training_settings(cfg, ckpt_meta)
    for case in found:
        missing = [m for m, s in zip(spec.modalities, spec.file_suffixes) if s not in case.images]
        if missing and case.name not in problems:
            logging.warning(
                "predict: %s has no %s file: predicted with %s treated as missing",
                case.name,
                ", ".join(missing),
                "it" if len(missing) == 1 else "them",
            )
    cache = workdir / "predict_cache"
    with preprocess.removed_on_error(cache, out_dir):
        summary = preprocess.preprocess(
            spec,
            src,
            cache,
            settings.min_size,
            cfg.data.preprocess_workers,
            progress=lambda it, **k: progress(it, desc="preprocess", **k),
            zoom=settings.zoom,
            brain_box=settings.brain_box,
            for_prediction=True,
            scanned=(found, problems),
        )
        for name, reason in summary.failed.items():
            logging.warning("predict: case %s failed: %s", name, reason)
        metas = {}
        for p in (cache / "meta").glob("*.json"):
            meta = preprocess.read_meta(p)
            if meta and meta.get("case") in {c.name for c in found} - set(summary.failed):
                metas[meta["case"]] = meta
        if not metas:
            raise preprocess.CaseError(
                f"no case under predict.input {src} could be preprocessed: "
                f"{preprocess.left_out(summary.failed)}"
            )
        params, ckpt_meta = experiment.restore_params(cfg, workdir)
        out_dir.mkdir(parents=True, exist_ok=True)
        window = experiment.inference_window(cfg)
        results = []
        for name in progress(sorted(metas), desc="predict"):
            meta = metas[name]
            probs = predict_case(window, params, meta, cache, rank)
            pred_path = out_dir / f"{name}_pred.nii.gz"
            preprocess.save_original(pred_path, probs.argmax(-1).astype(np.uint8), meta)
            record = {
                "case": name,
                "present": [bool(x) for x in meta["present"]],
                "missing": [m for m, p in zip(spec.modalities, meta["present"]) if not p],
                "prediction": str(pred_path),
            }
            if cfg.predict.probabilities:
                prob_path = out_dir / f"{name}_prob.nii.gz"
                _save_like(prob_path, probabilities_to_original(probs, meta), meta)
                record["probabilities"] = str(prob_path)
            results.append(record)
        summary_out = {
            "checkpoint_step": ckpt_meta.get("step"),
            "modalities": list(spec.modalities),
            "cases": results,
            "failed": summary.failed,
        }
        atomic.write_json(out_dir / "predictions.json", summary_out)
    return results
