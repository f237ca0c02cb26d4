"""Which rule should choose the decision threshold on an 80-patient validation split?

`common.calibration.choose_threshold` by the best validation F1 (`eval.operating_point=f1`)
puts it halfway in logit space between the two validation cases it separates. With 10
malignant cases those two are single extreme scores, so this compares it with rules that read
the whole validation split (the default `smoothed_f1` among them), on a
trained model's own scores: from the predictions `famf_generalisation.py` wrote for many
further patients (the population), draw `--draws` validation splits of the demo's size
(10 malignant, 70 benign), choose a threshold on each by each rule, and report the F1 each
threshold gets on the rest of the population (mean, standard deviation and 10th percentile
over the draws), and how often it reaches F1 >= `--target` on a test split of the same size
drawn from the rest (what a run's test F1 at its operating point is judged on; beside it, how
often any threshold would, and how often the one threshold best for the whole population does,
with the population's F1 around that threshold):

- midpoint: `choose_threshold` (`eval.operating_point=f1`)
- kde-in-interval: among the thresholds of best validation F1, the one whose F1 is best
  when each validation logit is smoothed by a Gaussian kernel (Silverman's bandwidth per class)
- kde: the best kernel-smoothed F1 anywhere, `choose_threshold(smoothed=True)`
  (`eval.operating_point=smoothed_f1`, the default)
- binormal: the best F1 of a normal distribution per class (median and MAD of the logits)
- bagged: the median of the midpoint rule over 50 bootstrap resamples of the validation split

    python benchmarks/famf_threshold_rules.py runs/demo/generalisation_seed1_800/predictions.csv
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from scipy.special import expit  # noqa: E402
from scipy.stats import norm  # noqa: E402

from common import calibration, metrics  # noqa: E402


def f1_at(y: np.ndarray, z: np.ndarray, t: float) -> float:
    pred = z >= t
    tp, fp, fn = np.sum(pred & y), np.sum(pred & ~y), np.sum(~pred & y)
    return 2 * tp / max(2 * tp + fp + fn, 1)


def project_rule(y, z, rng=None, smoothed=False):
    """`choose_threshold`'s threshold, as a logit."""
    t = calibration.choose_threshold(y, expit(z), smoothed=smoothed)
    return float(calibration._logit(np.array(t)))


def _grid(z):
    return np.linspace(z.min() - 1, z.max() + 1, 801)


def kde_in_interval(y, z, rng=None):
    grid = _grid(z)
    f = np.array([f1_at(y, z, t) for t in grid])
    grid = grid[f == f.max()]
    f = calibration.smoothed_f1(y, z, grid, *calibration._bandwidths(y, z))
    return float(grid[np.argmax(f)])


def binormal(y, z, rng=None):
    def robust(v):
        m = np.median(v)
        return m, max(1.4826 * np.median(np.abs(v - m)), 1e-3)

    (m1, s1), (m0, s0) = robust(z[y]), robust(z[~y])
    grid = _grid(z)
    tp, fp = y.sum() * norm.sf((grid - m1) / s1), (~y).sum() * norm.sf((grid - m0) / s0)
    return float(grid[np.argmax(2 * tp / (2 * tp + fp + (y.sum() - tp)))])


def bagged(y, z, rng):
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    ts = []
    for _ in range(50):
        i = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        ts.append(project_rule(y[i], z[i]))
    return float(np.median(ts))


def draw(y, among, n_pos, n_neg, rng):
    """Indices of a split of n_pos malignant and n_neg benign cases from `among`."""
    pos, neg = np.flatnonzero(y & among), np.flatnonzero(~y & among)
    return np.concatenate([rng.choice(pos, n_pos, False), rng.choice(neg, n_neg, False)])


RULES = {
    "midpoint": project_rule,
    "kde-in-interval": kde_in_interval,
    "kde": lambda y, z, rng: project_rule(y, z, smoothed=True),
    "binormal": binormal,
    "bagged": bagged,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("predictions", nargs="+", help="predictions.csv with label, prob_calibrated")
    ap.add_argument("--draws", type=int, default=300)
    ap.add_argument("--malignant", type=int, default=10)
    ap.add_argument("--benign", type=int, default=70)
    ap.add_argument("--target", type=float, default=0.9, help="test F1 counted as a hit")
    args = ap.parse_args()
    for path in args.predictions:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        y = np.array([r["label"] == "1" for r in rows])
        # Logits of the calibrated probability, clipped where float32 saturates.
        z = np.clip(
            calibration._logit(np.array([float(r["prob_calibrated"]) for r in rows])), -30, 30
        )
        rng = np.random.default_rng(0)
        got = {name: [] for name in RULES}
        hits = {name: [] for name in RULES}
        reachable, oracle_hits = [], []
        # The one threshold best for the whole population: what no validation draw can beat.
        values = np.unique(z)
        oracle = values[int(np.argmax([f1_at(y, z, t) for t in values]))]
        for _ in range(args.draws):
            i = draw(y, np.ones(len(y), bool), args.malignant, args.benign, rng)
            rest = np.ones(len(y), bool)
            rest[i] = False
            test = draw(y, rest, args.malignant, args.benign, rng)
            reachable.append(metrics.best_f1(y[test], expit(z[test])) >= args.target)
            oracle_hits.append(f1_at(y[test], z[test], oracle) >= args.target)
            for name, rule in RULES.items():
                t = rule(y[i], z[i], rng)
                got[name].append(f1_at(y[rest], z[rest], t))
                hits[name].append(f1_at(y[test], z[test], t) >= args.target)
        print(
            f"{path}: {y.sum()} malignant of {len(y)}, {args.draws} validation draws; "
            f"test F1 >= {args.target} reachable by some threshold in {np.mean(reachable):.0%} "
            "of the test draws"
        )
        around = "  ".join(f"{d:+g}: {f1_at(y, z, oracle + d):.3f}" for d in (-1, -0.5, 0.5, 1))
        print(
            f"  the population's best threshold (logit {oracle:.2f}): F1 {f1_at(y, z, oracle):.3f} "
            f"(logits away from it {around}), test F1 >= {args.target} in "
            f"{np.mean(oracle_hits):.0%}"
        )
        for name, f in got.items():
            print(
                f"  {name:16s} F1 mean {np.mean(f):.3f}  sd {np.std(f):.3f}  "
                f"10th percentile {np.percentile(f, 10):.3f}  "
                f"test F1 >= {args.target} in {np.mean(hits[name]):.0%}"
            )


if __name__ == "__main__":
    main()
