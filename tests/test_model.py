import jax
import jax.numpy as jnp
import numpy as np
import pytest

from famf_jax import inference
from famf_jax.maf import channel_attention
from famf_jax.model import FAMFNet, count_params, init_variables

SIZE = 64


@pytest.fixture(scope="module")
def variables():
    return init_variables(FAMFNet(), jax.random.key(0), SIZE)


@pytest.fixture(scope="module")
def images():
    k1, k2 = jax.random.split(jax.random.key(1))
    shape = (2, SIZE, SIZE, 3)
    return jax.random.uniform(k1, shape, minval=-1, maxval=1), jax.random.uniform(
        k2, shape, minval=-1, maxval=1
    )


def test_parameter_count():
    v = jax.eval_shape(lambda k: init_variables(FAMFNet(), k, 256), jax.random.key(0))
    assert count_params(v["params"]) == 1_476_098  # + 450 frozen edge-kernel constants
    # The spec's per-module counts; muatt_1 is 14,786 there including the 450 frozen values.
    per_module = {
        "stem_1": 2_880,
        "fire2_1": 12_208,
        "fire9_2": 198_336,
        "muatt_1": 14_336,
        "conv10": 2_050,
    }
    for name, n in per_module.items():
        assert count_params(v["params"][name]) == n, name


def test_channel_attention_formula(rng):
    q = rng.normal(size=(1, 4, 4, 6)).astype(np.float32)
    v = rng.normal(size=(1, 4, 4, 6)).astype(np.float32)
    got = np.asarray(channel_attention(jnp.asarray(q), jnp.asarray(v), scaled=False))
    qf, vf = q.reshape(16, 6).astype(np.float64), v.reshape(16, 6).astype(np.float64)
    logits = qf.T @ vf
    attn = np.exp(logits - logits.max(1, keepdims=True))
    attn /= attn.sum(1, keepdims=True)
    np.testing.assert_allclose(got.reshape(16, 6), vf @ attn.T, rtol=1e-5, atol=1e-5)
    uniform = np.asarray(channel_attention(jnp.zeros_like(q), jnp.asarray(v), scaled=True))
    np.testing.assert_allclose(
        uniform, np.broadcast_to(v.mean(-1, keepdims=True), v.shape), atol=1e-6
    )


def test_maf_shapes_and_warm_off_identity(variables, images):
    model = FAMFNet()
    cam = jnp.linspace(0, 1, 2 * 8 * 8).reshape(2, 8, 8)
    on = model.apply(variables, *images, cam, cam[::-1], warm=True)
    for k in ("fused_bmode", "fused_swe", "edge_bmode", "colour_swe"):
        assert on[k].shape == (2, SIZE // 2, SIZE // 2, 128)
    assert float(on["fused_bmode"].min()) >= 0 and float(on["fused_bmode"].max()) <= 6
    off = model.apply(variables, *images, warm=False)
    assert "fused_bmode" not in off
    # Warm off is the plain two-stream network: independent of the fusion module's weights.
    params = dict(variables["params"])
    params["muatt_1"] = jax.tree_util.tree_map(lambda x: x + 1.0, params["muatt_1"])
    changed = {"params": params, "batch_stats": variables["batch_stats"]}
    off2 = model.apply(changed, *images, warm=False)
    np.testing.assert_array_equal(np.asarray(off["probs"]), np.asarray(off2["probs"]))
    on2 = model.apply(changed, *images, cam, cam[::-1], warm=True)
    assert not np.allclose(np.asarray(on["probs"]), np.asarray(on2["probs"]))


def test_predict_outputs(variables, images):
    for faithful in (False, True):
        out = inference.predict(variables, *images, faithful=faithful)
        assert out["probs"].shape == (2, 2)
        np.testing.assert_allclose(out["probs"].sum(-1), 1, rtol=1e-6)
        for k in ("cam_bmode", "cam_swe"):
            assert out[k].shape == (2, SIZE // 8, SIZE // 8)
            assert out[k].min() >= 0 and out[k].max() <= 1
        for k in ("centre_bmode", "centre_swe"):
            assert out[k].shape == (2, 2) and out[k].dtype.kind == "i"
            assert (out[k] >= 0).all() and (out[k] < SIZE // 2).all()
        assert out["fused_swe"].shape == (2, SIZE // 2, SIZE // 2, 128)
    with pytest.raises(ValueError, match="divisible by 8"):
        inference.predict(variables, np.zeros((1, 60, 60, 3)), np.zeros((1, 60, 60, 3)))


def test_predict_core_has_no_host_transfer(variables, images):
    v, b, s = jax.device_put((variables, *images))
    kw = dict(faithful=False, warm=True, modalities=("bmode", "swe"))
    jax.block_until_ready(inference.predict_core(v, b, s, **kw))  # compile outside the guard
    with jax.transfer_guard("disallow"):
        out = inference.predict_core(v, b, s, **kw)
        jax.block_until_ready(out)


def test_batch_statistics_written_once_or_per_pass(variables, images):
    model = FAMFNet()
    zero = jax.tree_util.tree_map(jnp.zeros_like, variables["batch_stats"])
    vs = {"params": variables["params"], "batch_stats": zero}
    _, once = inference.two_pass(model, vs, *images, warm=True, train=True)
    _, twice = inference.two_pass(
        model, vs, *images, warm=True, train=True, every_pass_statistics=True
    )
    for path in (("stem_1", "bn"), ("fire2_2", "squeeze", "bn"), ("fire2_1", "expand_3x3", "bn")):
        m1, m2 = once, twice
        for p in path:
            m1, m2 = m1[p], m2[p]
        m1, m2 = np.asarray(m1["mean"]), np.asarray(m2["mean"])
        np.testing.assert_allclose(m2, 1.9 * m1, rtol=1e-4, atol=1e-6)  # 0.1 b, then 0.19 b
