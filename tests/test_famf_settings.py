"""The paper's optimiser and each ablation switch of FAMF-Net train (issue 11 item 12): a few
steps of each through the real jitted step on generated lesions, with what each switch
promises checked on the way. MAF is on from the first step (warm-up 0) where a setting has it,
so each setting compiles one program."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import optim
from configs import famf as famf_config
from famf_jax import experiment, synthetic, train

SPE = 2  # steps per epoch: the paper's StepLR and RDO's epoch counters turn over
STEPS = 4
SETTINGS = {
    # SGD with coupled L2 and a step schedule (decays each epoch here, to be seen in 4 steps).
    "paper optimiser": {
        "train.optimizer": "sgd",
        "train.learning_rate": 0.01,
        "train.weight_decay": 0.05,
        "train.lr_decay_epochs": 1,
        "train.lr_decay_rate": 0.5,
    },
    "faithful": {"faithful": True},
    "fusion off": {"model.fusion": False},
    "B-mode only": {"model.modalities": "bmode"},
    "SWE only": {"model.modalities": "swe"},
    "RDO off": {"rdo.enabled": False},
}


def config(setting: dict):
    cfg = famf_config.get_config("smoke")
    cfg.train.warmup_epochs = 0
    for key, value in setting.items():
        node = cfg
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return cfg


def batch(cfg, i: int) -> dict:
    rng = np.random.default_rng(i)
    labels = np.array([0, 1, 1, 0] if i % 2 else [1, 0, 0, 1], np.int32)
    pairs = [synthetic.make_patient(rng, bool(y), cfg.data.image_size, 0.2) for y in labels]

    def images(k):
        return np.stack([p[k] for p in pairs]).astype(np.float32) / 127.5 - 1.0

    return jax.device_put({"bmode": images(0), "swe": images(1), "label": labels})


def moved(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name", list(SETTINGS))
def test_setting_trains(name):
    cfg = config(SETTINGS[name])
    state, tx = experiment.create_state(cfg, SPE)
    step = train.jit_train_step(cfg, tx)
    first = jax.device_get(state.params)
    params, outs, lr_ratios = first, [], []
    for i in range(STEPS):
        warm, active, new_epoch = train.step_flags(cfg, i, SPE)
        flags = jnp.asarray(active), jnp.asarray(new_epoch)
        state, out = step(state, batch(cfg, i), *flags, warm=warm)
        out = jax.device_get(out)
        after = jax.device_get(state.params)
        assert np.isfinite(out["loss"]) and int(out["skipped"]) == 0, (name, i, out)
        assert moved(params, after), (name, i)
        if cfg.train.optimizer == "sgd":
            velocity = optim.find_state(state.opt_state, optax.TraceState).trace["conv10"]
            v = np.asarray(jax.device_get(velocity["kernel"]), np.float64)
            u = np.asarray(after["conv10"]["kernel"], np.float64) - params["conv10"]["kernel"]
            big = np.abs(v) > 0.1 * np.abs(v).max()
            lr_ratios.append(-u[big] / v[big])
        params = after
        outs.append(out)

    fused = cfg.model.fusion and cfg.model.modalities == "both"
    assert train.step_flags(cfg, 0, SPE)[0] == fused
    if "muatt_1" in first:  # MAF trains when it is on, and never moves when it is not
        assert moved(first["muatt_1"], params["muatt_1"]) == fused
    if cfg.model.modalities != "both":  # one stream: the other's parameters do not exist
        gone = "_2" if cfg.model.modalities == "bmode" else "_1"
        assert not [k for k in params if k.endswith(gone)] and "muatt_1" not in params
    if cfg.rdo.enabled:  # RDO acts in every setting (epoch-driven, not fusion-driven)
        chosen = {(float(o["alpha0"]), float(o["gamma"])) for o in outs}
        assert len(chosen) > 1, (name, chosen)
    else:
        assert "alpha0" not in outs[-1]
    if cfg.train.optimizer == "sgd":
        # SGD's update is -lr_t x its velocity (the momentum trace, which holds the coupled L2
        # term): the rate read off conv10's kernel is the StepLR schedule, halved each epoch.
        rates = [np.median(r) for r in lr_ratios]
        np.testing.assert_allclose(rates, [0.01, 0.01, 0.005, 0.005], rtol=1e-3)
