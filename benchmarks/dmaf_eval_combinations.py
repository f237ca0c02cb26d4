"""Evaluation of the 15 modality combinations of one volume: encoder features shared vs the
original's 15 separate passes.

Ours (`dmaf_jax.inference.SlidingWindow`): per batch of windows (`--windows_per_call`), the
four encoders once, then fusion + fusion decoder for the 15 masks in one compiled `lax.map`.
Original (`PerCombinationWindow`, PASSION's `utils/predict.py`): for each combination a
sliding-window pass of the whole network, one window per call. Both run on the same fixed
subset of the volume's windows (`--windows`, spread over the volume) so a run takes minutes;
each is compiled by a warm-up call first and timed over `--repeats` passes (median). Prints the
time ratio and whether the predictions (argmax over the covered voxels) are identical.

    python benchmarks/dmaf_eval_combinations.py            # 160x192x144, 80^3 windows, paper model
    python benchmarks/dmaf_eval_combinations.py --quick    # 64x64x56, 48^3 windows: a check
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import dmaf_brats2020  # noqa: E402
from dmaf_jax import experiment  # noqa: E402
from dmaf_jax.inference import PerCombinationWindow, SlidingWindow, pad_to_window  # noqa: E402
from dmaf_jax.modalities import BRATS  # noqa: E402
from dmaf_jax.model import init_variables  # noqa: E402


def spread(starts: list, n: int) -> list:
    """n windows spread evenly over the list (all of them when n >= len)."""
    if n >= len(starts):
        return starts
    return (
        [starts[round(i * (len(starts) - 1) / (n - 1))] for i in range(n)]
        if n > 1
        else [starts[len(starts) // 2]]
    )


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64x64x56 volume, 48^3 windows")
    ap.add_argument("--windows", type=int, default=4, help="windows timed (a fixed subset)")
    ap.add_argument("--windows_per_call", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="timed passes of each (median)")
    args = ap.parse_args()

    cfg = dmaf_brats2020.get_config("paper")  # the paper's network: channels 8..128, DMAF
    shape, window = ((64, 64, 56), (48, 48, 48)) if args.quick else ((160, 192, 144), (80,) * 3)
    net = experiment.model(cfg)
    params = jax.jit(lambda k: init_variables(net, k, window))(jax.random.key(0))["params"]
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(*shape, 4)).astype(np.float32)
    masks = BRATS.combination_masks()

    ours = SlidingWindow(net, window, args.windows_per_call, cfg.eval.overlap)
    original = PerCombinationWindow(net, window, cfg.eval.overlap)
    all_starts = ours.windows(pad_to_window(vol, window).shape[:-1])
    starts = spread(all_starts, args.windows)
    print(
        f"volume {shape}, windows {window}: {len(all_starts)} windows, timing {len(starts)} "
        f"x 15 combinations; {args.windows_per_call} windows per call (ours), 1 (original); "
        f"{jax.device_count()} {jax.default_backend()} device(s)",
        flush=True,
    )

    t = time.perf_counter()
    ours.predict(params, vol, masks, starts=starts[: args.windows_per_call])
    compile_ours = time.perf_counter() - t
    t = time.perf_counter()
    x = jnp.asarray(vol[tuple(slice(0, w) for w in window)][None])
    jax.block_until_ready(original.forward(params, x, jnp.asarray(masks[-1:])))
    compile_original = time.perf_counter() - t
    print(
        f"warm-up (compile + first call): ours {compile_ours:.1f} s, original "
        f"{compile_original:.1f} s",
        flush=True,
    )

    t_ours, p_ours = timed(lambda: ours.predict(params, vol, masks, starts=starts), args.repeats)
    print(
        f"ours: {t_ours:.1f} s per pass ({t_ours / len(starts):.2f} s per window, 15 combinations)",
        flush=True,
    )
    t_orig, p_orig = timed(
        lambda: original.predict(params, vol, masks, starts=starts), args.repeats
    )
    print(
        f"original: {t_orig:.1f} s per pass ({t_orig / len(starts) / 15:.2f} s per window "
        "and combination)",
        flush=True,
    )

    covered = np.zeros(shape, bool)
    for s in starts:
        covered[tuple(slice(o, o + w) for o, w in zip(s, window))] = True
    a, b = p_ours[:, covered], p_orig[:, covered]
    differ = a.argmax(-1) != b.argmax(-1)
    top2 = np.sort(b[differ], -1)[:, -2:]
    ties = f", all at near-ties (top-2 margin <= {np.diff(top2).max():.1e})" if differ.any() else ""
    print(
        f"predictions over {covered.sum()} voxels x 15 combinations: "
        f"{'identical' if not differ.any() else f'{int(differ.sum())} argmax differ'}{ties}; "
        f"max |probability difference| {np.abs(a - b).max():.2e} (float32: XLA's CPU "
        "convolutions sum differently at another batch size; 1 window per call: bitwise equal)"
    )
    print(f"compilations (ours): {ours.compilations()}")
    print(
        f"time ratio ours / original: {t_ours / t_orig:.3f} (target <= 0.5); "
        f"speed-up {t_orig / t_ours:.2f}x"
    )


if __name__ == "__main__":
    main()
