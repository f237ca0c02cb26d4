"""Run with 4 forced CPU devices (tests/test_data_parallel.py): two training steps of each model's
smoke configuration on the same global batch of 4, on one device, data-parallel over 4 and
FSDP over 4, and each model's evaluation (FAMF `predict_records` of 5 images at an evaluation
batch of 3, DMAF sliding windows at 3 windows per call: both padded to a multiple of the
devices) on one device and split over 4; prints the largest differences as JSON."""

import json
import os
import sys

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(TESTS), TESTS]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import parallel  # noqa: E402


def max_abs(tree) -> float:
    return max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(tree))


def one_ulp(x):
    """Float arrays moved up or down by one ulp per element (fixed pattern); others as given."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x
    signs = np.random.default_rng(7).choice([-np.inf, np.inf], x.shape).astype(np.float32)
    return jnp.nextafter(x, jax.device_put(signs, x.sharding))


def run(make, steps: int = 2) -> dict:
    """make(shard) -> (state, step, batch). The parameter updates of `steps` steps on one
    device, data-parallel and FSDP, and on one device with every float input moved by one
    float32 ulp ("perturbed"): the float32 tolerance of this step (FAMF's max pooling, ReLUs
    and lesion centres route gradients by comparisons, which rounding can flip). Gaps are
    relative to the largest single-device update."""
    out = {}
    for name, devices, fsdp in (("single", 1, False), ("dp", 4, False), ("fsdp", 4, True)):
        shard = parallel.Sharding(parallel.mesh(jax.devices()[:devices]), fsdp)
        initial, step, batch = make(shard)
        runs = {name: batch}
        if name == "single":  # the same compiled step (the step donates its state: copies)
            runs["perturbed"] = jax.tree.map(one_ulp, batch)
        for run_name, run_batch in runs.items():
            state = jax.tree.map(jnp.copy, initial)
            before = jax.device_get(state.params)
            for _ in range(steps):
                state, o = step(state, run_batch)
            after = jax.device_get(state.params)
            shardings = [x.sharding for x in jax.tree.leaves(state.params)]  # as they are
            out[run_name] = (jax.tree.map(np.subtract, after, before), shardings)
    single = out["single"][0]
    scale = max_abs(single)

    def gap(name):
        return max_abs(jax.tree.map(np.subtract, out[name][0], single)) / scale

    sharded = [str(s.spec) for s in out["fsdp"][1] if any(a is not None for a in s.spec)]
    return {
        "dp": gap("dp"),
        "fsdp": gap("fsdp"),
        "perturbed": gap("perturbed"),
        "update": scale,
        "fsdp_sharded": len(sharded),
    }


def dmaf_config():
    from configs import dmaf_brats2020
    from conftest import dmaf_shallow

    cfg = dmaf_shallow(dmaf_brats2020.get_config("smoke"))
    cfg.model.token_dim = 32
    cfg.model.mlp = 512  # a (32, 512) kernel: large enough for FSDP to split
    cfg.data.batch_size = 4
    return cfg


def famf_eval(tmp: str) -> dict:
    """predict_records on 4 devices (batch 3 -> 4) against one device (batch 3)."""
    from common import parallel as par
    from configs import famf as famf_config
    from famf_jax import dataset, experiment, synthetic

    cfg = famf_config.get_config("smoke")
    cfg.eval.batch_size = 3
    manifest = synthetic.generate(tmp, 5, cfg.data.image_size, seed=3)
    by_patient, _ = dataset.read_manifest(manifest, [])
    records = list(by_patient.values())
    state, _ = experiment.create_state(cfg, 5)
    four = experiment.predict_records(cfg, state.variables, records, warm=True)
    par.local = lambda: par.Sharding(par.mesh(jax.local_devices()[:1]))
    one = experiment.predict_records(cfg, state.variables, records, warm=True)
    return {"n": len(four), "diff": float(np.abs(four - one).max())}


def dmaf_eval() -> dict:
    """Sliding windows of a 24 x 20 x 16 volume (8 windows) at 3 per call: split over 4
    devices (3 -> 4 per call) against one device."""
    from dmaf_jax import experiment
    from dmaf_jax.inference import SlidingWindow

    cfg = dmaf_config()
    state, _ = experiment.create_state(cfg, 5)
    vol = np.random.default_rng(1).normal(size=(24, 20, 16, 4)).astype(np.float32)
    masks = np.array([[1, 1, 1, 1], [0, 1, 0, 1]], bool)
    net, crop = experiment.model(cfg), experiment.model_crop(cfg)
    four = SlidingWindow(net, crop, 3)
    one = SlidingWindow(net, crop, 3, shard=parallel.Sharding(parallel.mesh(jax.devices()[:1])))
    a, b = four.predict(state.params, vol, masks), one.predict(state.params, vol, masks)
    return {
        "windows_per_call": [four.windows_per_call, one.windows_per_call],
        "diff": float(np.abs(a - b).max()),
        "compilations": four.compilations(),
    }


def famf(shard, warm: bool = True):
    from configs import famf as famf_config
    from famf_jax import experiment, synthetic, train

    cfg = famf_config.get_config("smoke")
    # Plain SGD (the paper's optimiser): the update is linear in the gradient. Adam's first
    # steps follow the gradient's sign, so an element whose gradient is rounding noise moves
    # by the full learning rate either way, and a wrongly scaled gradient would not show.
    cfg.train.optimizer = "sgd"
    state, tx = experiment.create_state(cfg, 5)
    state = jax.device_put(state, shard.state(state))
    jitted = train.jit_train_step(cfg, tx, shard, state)
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 0, 1], np.int32)
    bmode, swe = synthetic.make_batch(rng, labels, cfg.data.image_size)
    host = {"bmode": bmode, "swe": swe, "label": labels}
    batch = train.device_batch(host, shard)
    t, f = (jax.device_put(jnp.asarray(b), shard.replicated) for b in (True, False))
    return state, lambda s, b: jitted(s, b, t, f, warm=warm), batch


def dmaf(shard):
    from dmaf_jax import dtms, experiment, train

    cfg = dmaf_config()
    # AMSGrad with eps = 1: its first steps scale the gradient (g / (|g| + 1)) instead of
    # taking its sign (see famf); DTMS, the encoder factors and weight decay unchanged.
    make = dtms.make_optimizer
    dtms.make_optimizer = lambda **kw: make(**dict(kw, eps=1.0, learning_rate=0.05))
    state, tx = experiment.create_state(cfg, 5)
    state = jax.device_put(state, shard.state(state))
    weights = np.ones(4, np.float32)
    dtms.make_optimizer = make
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
    tmp = sys.argv[1]
    out = {"famf": run(famf), "dmaf": run(dmaf), "dmaf_eval": dmaf_eval()}
    out["famf_eval"] = famf_eval(tmp)  # last: it replaces parallel.local
    print(json.dumps(out))
