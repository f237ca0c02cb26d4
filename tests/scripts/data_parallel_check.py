"""Run with 4 forced CPU devices (tests/test_parallel.py): one training step of each model's
smoke configuration on the same global batch of 4, on one device, data-parallel over 4 and
FSDP over 4; prints the largest parameter differences as JSON."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import parallel  # noqa: E402


def max_diff(a, b) -> float:
    leaves = zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)))
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in leaves)


def scale(a) -> float:
    return max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(jax.device_get(a)))


def run(make, steps: int = 2) -> dict:
    """make(shard) -> (state, step, batch) ; the state after `steps` steps per setting."""
    out = {}
    for name, devices, fsdp in (("single", 1, False), ("dp", 4, False), ("fsdp", 4, True)):
        shard = parallel.Sharding(parallel.mesh(jax.devices()[:devices]), fsdp)
        state, step, batch = make(shard)
        for _ in range(steps):
            state, o = step(state, batch)
        out[name] = (jax.device_get(state.params), shard.state(state.params))
    single = out["single"][0]
    sharded = [
        str(s.spec) for s in jax.tree.leaves(out["fsdp"][1]) if any(a is not None for a in s.spec)
    ]
    return {
        "dp": max_diff(single, out["dp"][0]),
        "fsdp": max_diff(single, out["fsdp"][0]),
        "scale": scale(single),
        "fsdp_sharded_leaves": len(sharded),
    }


def famf(shard):
    from configs import famf as famf_config
    from famf_jax import experiment, train

    cfg = famf_config.get_config("smoke")
    state, tx = experiment.create_state(cfg, 5)
    state = jax.device_put(state, shard.state(state))
    jitted = train.jit_train_step(cfg, tx, shard, state)
    r = np.random.default_rng(0)
    shape = (4, cfg.data.image_size, cfg.data.image_size, 3)
    host = {
        "bmode": r.uniform(-1, 1, shape).astype(np.float32),
        "swe": r.uniform(-1, 1, shape).astype(np.float32),
        "label": np.array([0, 1, 0, 1], np.int32),
    }
    batch = train.device_batch(host, shard)
    t, f = (jax.device_put(jnp.asarray(b), shard.replicated) for b in (True, False))
    return state, lambda s, b: jitted(s, b, t, f, warm=True), batch


def dmaf(shard):
    from configs import dmaf_brats2020
    from dmaf_jax import experiment, train

    cfg = dmaf_brats2020.get_config("smoke")
    # Three levels instead of five: every part of the step (encoders, DMAF fusion, decoders,
    # distillation, DTMS) at a third of the compile time.
    cfg.model.channels = (4, 8, 8)
    cfg.model.token_dim = 16
    cfg.model.heads = 2
    cfg.model.depth = 1
    cfg.data.crop = (16, 16, 16)
    cfg.data.batch_size = 4
    state, tx = experiment.create_state(cfg, 5)
    state = jax.device_put(state, shard.state(state))
    weights = np.ones(4, np.float32)
    jitted = train.jit_train_step(cfg, tx, 5, weights, shard, state)
    r = np.random.default_rng(0)
    label = r.integers(0, 4, (4, 16, 16, 16, 1)).astype(np.uint8)
    host = {
        "image": (r.normal(size=(4, 16, 16, 16, 4)) + label).astype(np.float32),
        "label": label[..., 0],
        "mask": np.array([[1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 0, 1]], bool),
    }
    return state, jitted, train.device_batch(cfg, host, shard)


if __name__ == "__main__":
    assert jax.device_count() == 4, jax.devices()
    which = sys.argv[1:] or ["famf", "dmaf"]
    print(json.dumps({m: run({"famf": famf, "dmaf": dmaf}[m]) for m in which}))
