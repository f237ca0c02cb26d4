"""How a trained FAMF demo's chosen checkpoint and operating point do on further patients.

The demo's test split holds 80 patients, 10 of them malignant: one case moves the test F1 by
about 0.05 and ROC-AUC by up to 0.1, too coarse to compare checkpoint criteria or settings.
This draws `--patients` more from the same generator with another seed (`famf_jax.synthetic`,
the run's image size and class balance), runs `--mode=predict` on them through run.py with the
workdir's chosen checkpoint and its validation-fitted calibration, and prints ROC-AUC, F1 at
the validation-chosen operating point (predict's decision), F1 at 0.5, and the best F1 any
threshold reaches on these patients (what a perfect choice of threshold would give this
ranking), then the errors at the operating point by the generator's cues (`cues.csv`): how
many of the four look malignant, and with one against the other three, which. ROC-AUC and
the best F1 are those of the calibrated probability the decision reads
(over several folds it ranks as their logit mean, not as the mean raw probability).

    python run.py --config configs/famf.py:demo --workdir runs/demo --mode train   # then
    python run.py --config configs/famf.py:demo --workdir runs/demo --mode evaluate
    python benchmarks/famf_generalisation.py --workdir runs/demo [--patients 800] [--seed 1]

The further patients are drawn with the cue noise of the run's own data where `generate`
recorded it (`generator.json`), so a run trained on an easier set
(`synthetic.generate(dir, 400, 320, seed=2, cue_noise=0.03)`, then
`--config.data.manifest=dir/manifest.csv`) is measured on an easier further set too
(`--seed 3`); `--cue-noise` overrides it.

Config overrides go after `--` and on to run.py's predict (not to this script's options):
    python benchmarks/famf_generalisation.py --workdir W -- --config.eval.criterion=f1_acc
A calibration belongs to the checkpoint evaluate restored: another criterion or checkpoint
needs `--mode=evaluate` with the same overrides first (which rewrites the workdir's report).
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from common import metrics  # noqa: E402
from famf_jax import experiment, synthetic  # noqa: E402


def _drawn_with(work: pathlib.Path, data: dict) -> dict | None:
    """The generator settings of the run's data, where `synthetic.generate` recorded them."""
    if data["manifest"]:
        folder = pathlib.Path(data["manifest"]).parent
    elif data["root"]:
        folder = pathlib.Path(data["root"]).parent
    else:
        folder = experiment.synthetic_folder(data["synthetic_dir"], work)
    return synthetic.generator_settings(folder)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--patients", type=int, default=800)
    ap.add_argument("--seed", type=int, default=1, help="not the run's own (the demo's is 0)")
    ap.add_argument(
        "--cue-noise",
        type=float,
        help="the generator's cue flip probability; default: the run's data's (recorded in its "
        f"{synthetic.GENERATOR_FILE}), else the demo's {synthetic.CUE_NOISE}",
    )
    ap.add_argument("overrides", nargs="*", help="--config.a.b=value, after --, for run.py")
    args = ap.parse_args()
    work = pathlib.Path(args.workdir).resolve()
    run = json.loads((work / "config.json").read_text())  # the run's variant and image size
    size = run["data"]["synthetic_image_size"]
    own = _drawn_with(work, run["data"])
    if args.cue_noise is None:
        args.cue_noise = own["cue_noise"] if own else synthetic.CUE_NOISE
    if own is not None:  # the same seed, count and size draw the same patients
        if (own["seed"], own["patients"], own["image_size"]) == (args.seed, args.patients, size):
            sys.exit(
                f"--seed {args.seed} --patients {args.patients} would draw the run's own "
                "patients again: use another seed"
            )
    elif args.seed == run["seed"] and not any(run["data"][k] for k in ("manifest", "root")):
        sys.exit(f"--seed {args.seed} is the run's own: its training patients would come again")
    noise = "" if args.cue_noise == synthetic.CUE_NOISE else f"_noise{args.cue_noise:g}"
    data = work / f"generalisation_seed{args.seed}_{args.patients}{noise}"
    if not (data / "manifest.csv").exists():
        synthetic.generate(data, args.patients, size, seed=args.seed, cue_noise=args.cue_noise)
    out = data / "predictions.csv"
    predict = [
        *(sys.executable, str(REPO / "run.py"), f"--config=configs/famf.py:{run['variant']}"),
        *(f"--workdir={work}", "--mode=predict", f"--config.predict.input={data}/manifest.csv"),
        f"--config.predict.output={out}",
        *args.overrides,
    ]
    subprocess.run(predict, cwd=REPO, check=True)  # exactly what a user's predict runs
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows[0]["malignant"] == "":
        sys.exit(
            f"no usable calibration in {work} (absent, or fitted for another checkpoint): run "
            "--mode=evaluate with the same overrides first"
        )
    y = np.array([int(r["label"]) for r in rows])
    raw = np.array([float(r["prob_malignant"]) for r in rows])
    cal = np.array([float(r["prob_calibrated"]) for r in rows])
    op_decision = np.array([int(r["malignant"]) for r in rows])
    op = metrics.classification_metrics(y, op_decision)
    print(
        f"{work}: {len(y)} further patients ({y.sum()} malignant, seed {args.seed}): "
        f"ROC-AUC {metrics.roc_auc(y, cal):.3f}  F1 at the operating point {op['f1']:.3f} "
        f"(sensitivity {op['sensitivity']:.3f}, precision {op['precision']:.3f})  "
        f"F1 at 0.5 {metrics.classification_metrics(y, raw)['f1']:.3f}  "
        f"best F1 of any threshold {metrics.best_f1(y, cal):.3f}"
    )
    cues_file = data / synthetic.CUES_FILE
    if cues_file.exists():
        print_cue_errors([r["patient_id"] for r in rows], y, op_decision, cues_file)
    else:
        print(f"no {cues_file} (drawn before the generator recorded cues): no errors by cue")


def print_cue_errors(
    ids: list[str], y: np.ndarray, decision: np.ndarray, cues_file: pathlib.Path
) -> None:
    """Errors at the operating point by how many cues look malignant and, with one cue
    against the others, by which: a reader weighing the four cues alike is wrong only where
    two or more of them lie."""
    with open(cues_file, newline="") as f:
        shown = {r["patient_id"]: [int(r[c]) for c in synthetic.CUES] for r in csv.DictReader(f)}
    cues = np.array([shown[i] for i in ids])
    wrong = decision != y
    k = cues.sum(1)
    print("errors at the operating point, by the number of malignant-looking cues of 4:")
    for n in range(5):
        sel = k == n
        n_mal, n_wrong = y[sel].sum(), wrong[sel].sum()
        print(f"  {n}: {sel.sum():4d} patients ({n_mal:3d} malignant), {n_wrong:3d} wrong")
    print("  with one cue against the other three, by that cue:")
    for j, name in enumerate(synthetic.CUES):
        for n, odd in ((1, 1), (3, 0)):
            sel = (k == n) & (cues[:, j] == odd)
            if sel.any():
                side = "malignant-looking" if odd else "benign-looking"
                print(
                    f"    {name:9s} {side:17s} {sel.sum():3d} patients, {wrong[sel].sum():3d} wrong"
                )


if __name__ == "__main__":
    main()
