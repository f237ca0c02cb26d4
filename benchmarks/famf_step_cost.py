"""Cost of FAMF-Net's full training step relative to the plain two-stream step (issue: <= 1.6x).

Measured in one run, same shapes (default 256x256, batch 4), forward + backward (value_and_grad
of the focal loss), train-mode BatchNorm:
- plain:    one warm-off pass (the late-fusion two-stream network, no CAM);
- full:     CAM pass (warm off), closed-form CAMs, RAA + MAF warm pass reusing stem + fire2;
- autodiff: like full, but the CAMs come from a backward pass through the whole network, as
            the original does with torchcam (RAA still in-jit here, so this flatters it).
- native:   full, with XLA's native 2-D convolutions instead of `common.conv`'s decomposed
            CPU form (the convolutions' form before issue 11; same parameters).
- pytorch:  where torch is installed, the original's training step (parity/famf_torch_parity.py
            `solver_step`): the same batch's work (CAM pass by autograd, main pass with host
            RAA, loss, backward, SGD step with coupled L2), and the whole solver step (then the
            next batch's CAM pass and forward, for the DQN), timed in the same run; "full" is
            then also given as a ratio to each.
Prints XLA's FLOP count and temporary memory per step (cost and memory analysis of the compiled
step) and the median wall time over repetitions after a warm-up.

    python benchmarks/famf_step_cost.py [--size 256] [--batch 4] [--reps 5]
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

from common import conv as conv_lib  # noqa: E402
from famf_jax.cam import minmax_normalise  # noqa: E402
from famf_jax.inference import two_pass  # noqa: E402
from famf_jax.losses import focal_loss  # noqa: E402
from famf_jax.model import FAMFNet, init_variables  # noqa: E402


def make_steps(model: FAMFNet):
    def apply_train(params, stats, *args, **kw):
        vs = {"params": params, "batch_stats": stats}
        return model.apply(vs, *args, train=True, mutable=["batch_stats"], **kw)

    def plain(params, stats, b, s, y):
        def loss(p):
            out, upd = apply_train(p, stats, b, s, warm=False)
            return focal_loss(out["logits"], y, 0.5, 2.0), upd

        return jax.value_and_grad(loss, has_aux=True)(params)

    def full(params, stats, b, s, y):
        def loss(p):
            vs = {"params": p, "batch_stats": stats}
            out, upd = two_pass(model, vs, b, s, warm=True, train=True)
            upd = upd["batch_stats"]
            return focal_loss(out["logits"], y, 0.5, 2.0), upd

        return jax.value_and_grad(loss, has_aux=True)(params)

    def autodiff(params, stats, b, s, y):
        def score(p):  # CAM-pass probability of the predicted class, as torchcam back-propagates
            out, _ = apply_train(p, stats, b, s, warm=False)
            c = jnp.argmax(jax.lax.stop_gradient(out["probs"]), -1)
            return jnp.take_along_axis(out["probs"], c[:, None], 1).sum(), out

        # The original's score.backward() runs through the whole network; its parameter
        # gradients are returned so that XLA cannot drop that work.
        (_, first), wasted = jax.value_and_grad(score, has_aux=True)(params)
        f9 = [first["f9_bmode"], first["f9_swe"]]
        grads = jax.grad(_head_score, argnums=1)(params, f9, first["probs"])
        cams = []
        for a, ga in zip(f9, grads):
            w = (ga * a).sum((1, 2)) / (a.sum((1, 2)) + 1e-12)
            cams.append(minmax_normalise(jax.nn.relu(jnp.einsum("bk,bhwk->bhw", w, a))))
        cams = [jax.lax.stop_gradient(c) for c in cams]

        def loss(p):  # the original's second forward recomputes the whole network
            out, upd = apply_train(p, stats, b, s, *cams, warm=True)
            return focal_loss(out["logits"], y, 0.5, 2.0), upd

        return jax.value_and_grad(loss, has_aux=True)(params), wasted

    return {"plain": plain, "full": full, "autodiff": autodiff}


def _head_score(params, f9, probs):
    w = params["conv10"]["kernel"][0, 0]
    x = jnp.concatenate(f9, -1).mean((1, 2))
    p = jax.nn.softmax(x @ w + params["conv10"]["bias"], -1)
    c = jnp.argmax(jax.lax.stop_gradient(probs), -1)
    return jnp.take_along_axis(p, c[:, None], 1).sum()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    model = FAMFNet()
    v = init_variables(model, jax.random.key(0), args.size)
    shape = (args.batch, args.size, args.size, 3)
    k = jax.random.split(jax.random.key(1), 2)
    b = jax.random.uniform(k[0], shape, minval=-1, maxval=1)
    s = jax.random.uniform(k[1], shape, minval=-1, maxval=1)
    y = jnp.arange(args.batch) % 2
    inputs = (v["params"], v["batch_stats"], b, s, y)
    results = {}
    steps = make_steps(model)
    steps["native"] = lambda *a, _full=steps["full"]: _full(*a)  # a new function: retraced
    for name, fn in steps.items():
        if name == "native":  # traced after this switch: native convolutions
            conv_lib.auto_impl = lambda: "native"
        compiled = jax.jit(fn).lower(*inputs).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        flops = float(cost.get("flops", float("nan")))
        mem = compiled.memory_analysis()
        temp_gb = getattr(mem, "temp_size_in_bytes", float("nan")) / 2**30
        run = lambda c=compiled: jax.block_until_ready(c(*inputs))  # noqa: E731
        seconds = median_seconds(run, args.reps)
        results[name] = (flops, seconds, temp_gb)
        print(
            f"{name:9s} {flops / 1e9:8.1f} GFLOP/step  {temp_gb:5.2f} GiB temporaries  "
            f"median {results[name][1]:.3f} s over {args.reps}",
            flush=True,
        )
    pf, pt, pm = results["plain"]
    print(f"\n{args.size}x{args.size}, batch {args.batch}, {jax.devices()[0].platform}:")
    for name in ("full", "autodiff"):
        f, t, m = results[name]
        print(f"{name:9s} / plain: time {t / pt:.2f}x   FLOPs {f / pf:.2f}x   memory {m / pm:.2f}x")
    nt = results["native"][1]
    print(f"full (decomposed convolutions) / full (native): time {results['full'][1] / nt:.2f}x")
    torch_times = pytorch_step_times(args)
    if torch_times is not None:
        for what, t in torch_times.items():
            print(f"pytorch   median {t:.3f} s over {args.reps} ({what})")
            print(f"full / pytorch ({what}): time {results['full'][1] / t:.2f}x")


def median_seconds(run, reps: int) -> float:
    """Median wall time of `run()` (which must block until done) over `reps`, after a warm-up."""
    run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pytorch_step_times(args) -> dict[str, float] | None:
    """Median seconds of the original's training step (parity model) with and without the
    next batch's passes, or None without torch."""
    try:
        import torch
    except ImportError:
        print("pytorch: not installed (pip install torch), the original's step is not timed")
        return None
    from parity import famf_torch_parity as tp

    torch.manual_seed(0)
    model = tp.OursNet(args.size)
    optimizer = torch.optim.SGD(model.parameters(), lr=5e-4, momentum=0.9, weight_decay=0.05)
    g = torch.Generator().manual_seed(1)

    def batch():
        shape = (args.batch, 3, args.size, args.size)
        x = [torch.rand(shape, generator=g) * 2 - 1 for _ in range(2)]
        return (*x, torch.arange(args.batch) % 2)

    cur, nxt = batch(), batch()
    out = {}
    for what, following in (
        ("solver step: this batch, then the next batch's CAM pass and forward", nxt),
        ("this batch only: CAM pass, main pass, backward, SGD step", None),
    ):
        step = lambda n=following: tp.solver_step(model, optimizer, cur, n)  # noqa: E731
        out[what] = median_seconds(step, args.reps)
    return out


if __name__ == "__main__":
    main()
