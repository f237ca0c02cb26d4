"""How a trained FAMF demo's chosen checkpoint and operating point do on further patients.

The demo's test split holds 80 patients, 10 of them malignant: one case moves the test F1 by
about 0.05 and ROC-AUC by up to 0.014, too coarse to compare checkpoint criteria or settings.
This draws `--patients` more from the same generator with another seed (`famf_jax.synthetic`,
the demo's class balance), runs `--mode=predict` on them with the workdir's chosen checkpoint
and its validation-fitted calibration, and prints ROC-AUC, F1 at the validation-chosen
operating point (predict's decision), F1 at 0.5, and the best F1 any threshold reaches on
these patients (what a perfect choice of threshold would give this ranking).

    python run.py --config configs/famf.py:demo --workdir runs/demo --mode train   # then
    python run.py --config configs/famf.py:demo --workdir runs/demo --mode evaluate
    python benchmarks/famf_generalisation.py --workdir runs/demo [--patients 800] [--seed 1]

Config overrides the run was trained and evaluated with go after `--`, passed to run.py:
    python benchmarks/famf_generalisation.py --workdir W -- --config.eval.criterion=f1_acc
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from common import metrics  # noqa: E402
from configs import famf as famf_config  # noqa: E402
from famf_jax import synthetic  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--patients", type=int, default=800)
    ap.add_argument("--seed", type=int, default=1, help="the demo's own data uses seed 0")
    ap.add_argument("--variant", default="demo")
    ap.add_argument("overrides", nargs="*", help="--config.a.b=value, as given to run.py")
    args = ap.parse_args()
    work = pathlib.Path(args.workdir).resolve()
    size = famf_config.get_config(args.variant).data.synthetic_image_size
    data = work / f"generalisation_seed{args.seed}_{args.patients}"
    if not (data / "manifest.csv").exists():
        synthetic.generate(data, args.patients, size, seed=args.seed)
    out = data / "predictions.csv"
    predict = [
        *(sys.executable, str(REPO / "run.py"), f"--config=configs/famf.py:{args.variant}"),
        *(f"--workdir={work}", "--mode=predict", f"--config.predict.input={data}/manifest.csv"),
        f"--config.predict.output={out}",
        *args.overrides,
    ]
    subprocess.run(predict, cwd=REPO, check=True)  # exactly what a user's predict runs
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["prob_malignant"]) for r in rows])
    if rows[0]["malignant"] == "":
        raise SystemExit(f"no calibration in {work}: run --mode=evaluate first")
    decision = np.array([int(r["malignant"]) for r in rows])
    c = metrics.confusion(y, decision)
    op_f1 = 2 * c["tp"] / max(2 * c["tp"] + c["fp"] + c["fn"], 1)
    half = metrics.classification_metrics(y, p)
    print(
        f"{work}: {len(y)} further patients ({y.sum()} malignant, seed {args.seed}): "
        f"ROC-AUC {metrics.roc_auc(y, p):.3f}  F1 at the operating point {op_f1:.3f} "
        f"(sensitivity {c['tp'] / max(c['tp'] + c['fn'], 1):.3f}, "
        f"precision {c['tp'] / max(c['tp'] + c['fp'], 1):.3f})  F1 at 0.5 {half['f1']:.3f}  "
        f"best F1 of any threshold {metrics.best_f1(y, p):.3f}"
    )


if __name__ == "__main__":
    main()
