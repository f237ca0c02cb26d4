"""XLA's native convolution vs common/conv.py's decomposed form on CPU (issue 7 item 6).

Forward + backward (jit of value_and_grad of a sum, gradients w.r.t. input and kernel), reflect
padding, both forms timed in the same run with their repetitions interleaved, so load from other
processes falls on both alike; median over repetitions after a warm-up, with block_until_ready.
Prints one row per case:

    name native <s> decomposed <s> ratio <native/decomposed>

`--sum` adds a row for the per-tap sum form (one lower-rank convolution per tap of the first
axis, summed) that `conv` does not use, to show why the stacked form was chosen.

    python benchmarks/conv_cpu.py [--quick] [--reps 5] [--sum] [--only 3d_48]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common.conv import _decomposed, _pad_same, conv  # noqa: E402

# name: (input shape (B, *S, Cin), Cout, stride)
CASES = {
    "3d_48^3x16": ((1, 48, 48, 48, 16), 16, 1),
    "3d_80^3x8": ((1, 80, 80, 80, 8), 8, 1),
    "3d_80^3x8->16_s2": ((1, 80, 80, 80, 8), 16, 2),
    "2d_128^2x64_b4": ((4, 128, 128, 64), 64, 1),
    "2d_256^2x32_b4": ((4, 256, 256, 32), 32, 1),
}
QUICK = {
    "3d_32^3x16": ((1, 32, 32, 32, 16), 16, 1),
    "3d_48^3x8": ((1, 48, 48, 48, 8), 8, 1),
    "3d_48^3x8->16_s2": ((1, 48, 48, 48, 8), 16, 2),
    "2d_64^2x64_b4": ((4, 64, 64, 64), 64, 1),
    "2d_128^2x32_b4": ((4, 128, 128, 32), 32, 1),
}


def _step(form: str, stride: int):
    def f(x, k):
        if form == "sum":
            y = _decomposed(_pad_same(x, k.shape[:-2], "reflect"), k, stride, stack=False)
        else:
            y = conv(x, k, stride=stride, padding="reflect", impl=form)
        return jnp.sum(y)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


def run(cases: dict, reps: int, with_sum: bool) -> None:
    forms = ["native", "decomposed"] + (["sum"] if with_sum else [])
    for name, (shape, cout, stride) in cases.items():
        kx, kk = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, shape, jnp.float32)
        k = jax.random.normal(kk, (3,) * (len(shape) - 2) + (shape[-1], cout)) * 0.1
        steps = {f: _step(f, stride) for f in forms}
        outs = {f: jax.block_until_ready(s(x, k)) for f, s in steps.items()}  # warm-up
        for f in forms[1:]:  # same result, or the timing means nothing
            ref, got = outs["native"][0], outs[f][0]
            assert abs(float(got - ref)) <= 1e-4 * abs(float(ref)) + 1e-3, (name, f, got, ref)
        times = {f: [] for f in forms}
        for _ in range(reps):
            for f, s in steps.items():
                t0 = time.perf_counter()
                jax.block_until_ready(s(x, k))
                times[f].append(time.perf_counter() - t0)
        med = {f: statistics.median(t) for f, t in times.items()}
        print(
            f"{name} native {med['native']:.3f} decomposed {med['decomposed']:.3f} "
            f"ratio {med['native'] / med['decomposed']:.2f}",
            flush=True,
        )
        if with_sum:
            print(
                f"{name} native {med['native']:.3f} decomposed-sum {med['sum']:.3f} "
                f"ratio {med['native'] / med['sum']:.2f}",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes, 3 repetitions")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 5, quick 3)")
    ap.add_argument("--sum", action="store_true", help="also time the per-tap sum form")
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    args = ap.parse_args()
    cases = QUICK if args.quick else CASES
    cases = {n: c for n, c in cases.items() if args.only in n}
    reps = args.reps or (3 if args.quick else 5)
    print(
        f"# jax {jax.__version__} {jax.default_backend()}, {os.cpu_count()} cpus, "
        f"load average {os.getloadavg()[0]:.1f}, {reps} reps, fwd+bwd seconds (median)",
        flush=True,
    )
    run(cases, reps, args.sum)


if __name__ == "__main__":
    main()
