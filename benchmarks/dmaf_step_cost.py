"""What DMAF-Net's fusion, distillation and DTMS cost per training step (issue 7).

In one run, on the same random batch:
- `full`: the training step as `--mode=train` runs it (DMAF at every level, the objective with
  CCA, MAA and prototypes, the DTMS monitor and encoder scaling in the optimiser chain);
- `baseline`: the same encoders and decoders with mean fusion, only the segmentation losses
  (fused, deep supervision, shared decoder) and plain AMSGrad + weight decay + lr.
Median seconds over `--reps` after a warm-up, the ratio full / baseline, XLA's FLOP count of
each, and XLA's memory analysis of the compiled full step at the paper's 80^3 batch 1 and
128^3 batch 2 (compiled, not run).

    python benchmarks/dmaf_step_cost.py                 # 48^3 timing + memory analysis
    python benchmarks/dmaf_step_cost.py --crop 80 --no-memory
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from common import optim  # noqa: E402
from configs.dmaf_brats2020 import get_config  # noqa: E402
from dmaf_jax import experiment, losses, train  # noqa: E402


def config(crop: int, batch: int, fusion: str = "dmaf"):
    cfg = get_config("paper")
    cfg.data.crop = (crop,) * 3
    cfg.data.batch_size = batch
    cfg.model.fusion = fusion
    return cfg


def batch_for(cfg, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    b, crop = cfg.data.batch_size, tuple(cfg.data.crop)
    host = {
        "image": rng.normal(size=(b, *crop, 4)).astype(np.float32),
        "label": rng.integers(0, 4, (b, *crop)).astype(np.uint8),
        "mask": np.array([[1, 0, 1, 1], [1, 1, 0, 1]] * b, bool)[:b],
    }
    return train.device_batch(cfg, host)


def full_step(cfg):
    state, tx = experiment.create_state(cfg, spe=219)
    return train.jit_train_step(cfg, tx, 219, np.ones(4)), state


def baseline_step(cfg):
    """Mean fusion, segmentation losses only, no DTMS."""
    net = experiment.model(cfg)
    state, _ = experiment.create_state(cfg, spe=219)
    tx = optax.chain(
        optim.scale_by_pytorch_amsgrad(),
        optax.add_decayed_weights(cfg.train.weight_decay),
        optax.scale(-cfg.train.learning_rate),
    )
    state = state.replace(opt_state=tx.init(state.params))

    def step(state, batch):
        key = jax.random.fold_in(jax.random.key(0), state.step)
        mask = batch["mask"]
        y = jax.nn.one_hot(batch["label"], 4, dtype=jnp.float32)

        def loss_fn(params):
            out = net.apply(
                {"params": params}, batch["image"], mask, train=True, rngs={"dropout": key}
            )
            fuse = losses.segmentation_loss(jax.nn.softmax(out["logits"], -1), y)
            ds = losses.deep_supervision_loss(out["aux_logits"], y)
            sep_p = jax.nn.softmax(out["sep_logits"], -1)
            sep = jax.vmap(losses.segmentation_loss, in_axes=(1, None), out_axes=1)(sep_p, y)
            return fuse.mean() + ds.mean() + jnp.where(mask, sep, 0).sum() / mask.shape[0]

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {
            "loss": loss
        }

    return jax.jit(step, donate_argnums=0), state


def time_steps(fn, state, batch, reps: int):
    state, out = fn(state, batch)  # warm-up
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        state, out = fn(state, batch)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def flops(fn, state, batch) -> float:
    cost = fn.lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


def memory(crop: int, batch: int) -> dict:
    cfg = config(crop, batch)
    state, tx = experiment.create_state(cfg, spe=219)
    fn = train.jit_train_step(cfg, tx, 219, np.ones(4))
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch_for(cfg))
    m = fn.lower(state, specs).compile().memory_analysis()
    gib = 1 / 2**30
    return {
        "arguments": m.argument_size_in_bytes * gib,
        "outputs": m.output_size_in_bytes * gib,
        "temporary": m.temp_size_in_bytes * gib,
        "total": (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) * gib,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crop", type=int, default=48)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    print(f"backend {jax.default_backend()}, crop {args.crop}^3, batch {args.batch}")
    rows = {}
    for name, make in (("baseline", baseline_step), ("full", full_step)):
        fusion = "mean" if name == "baseline" else "dmaf"
        cfg = config(args.crop, args.batch, fusion)
        fn, state = make(cfg)
        batch = batch_for(cfg)
        f = flops(fn, state, batch)
        s = time_steps(fn, state, batch, args.reps)
        rows[name] = (s, f)
        print(f"{name:9s} median {s:.3f} s   {f / 1e9:.1f} GFLOP")
    ratio = rows["full"][0] / rows["baseline"][0]
    print(f"full / baseline: {ratio:.2f}x time, {rows['full'][1] / rows['baseline'][1]:.2f}x FLOPs")
    if not args.no_memory:
        for crop, batch in ((80, 1), (128, 2)):
            m = memory(crop, batch)
            print(
                f"memory {crop}^3 batch {batch}: "
                + ", ".join(f"{k} {v:.2f} GiB" for k, v in m.items())
            )


if __name__ == "__main__":
    main()
