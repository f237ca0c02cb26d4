import jax
import jax.numpy as jnp
import numpy as np
import pytest

from famf_jax import inference, raa
from famf_jax.layers import BN_EPSILON
from famf_jax.maf import MutualAttentionFusion, channel_attention
from famf_jax.model import FAMFNet, count_params, init_variables
from parity.raa_reference import bmode_centre, swe_centre

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


def test_stream_logits_are_each_streams_half_of_conv10(variables, images):
    # By hand: stream m's logits = mean_hw(f9_m) @ its rows of conv10's kernel + the bias
    # (B-mode rows first), and the two add up to the logits with the bias once.
    out = jax.device_get(FAMFNet().apply(variables, *images, warm=False))
    kernel = np.asarray(variables["params"]["conv10"]["kernel"], np.float64)[0, 0]
    bias = np.asarray(variables["params"]["conv10"]["bias"], np.float64)
    rows = {"bmode": kernel[:512], "swe": kernel[512:]}
    for m in ("bmode", "swe"):
        want = np.asarray(out[f"f9_{m}"], np.float64).mean(axis=(1, 2)) @ rows[m] + bias
        np.testing.assert_allclose(out[f"stream_logits_{m}"], want, rtol=1e-5, atol=1e-6)
    total = out["stream_logits_bmode"] + out["stream_logits_swe"] - bias
    np.testing.assert_allclose(total, out["logits"], rtol=1e-5, atol=1e-6)
    alone = FAMFNet(modalities=("swe",))  # one stream: nothing to add (shapes only, no compile)
    one = jax.eval_shape(lambda k: init_variables(alone, k, SIZE), jax.random.key(0))
    assert not [k for k in jax.eval_shape(alone.apply, one, *images) if "stream" in k]


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
    once, twice = once["batch_stats"], twice["batch_stats"]
    for path in (("stem_1", "bn"), ("fire2_2", "squeeze", "bn"), ("fire2_1", "expand_3x3", "bn")):
        m1, m2 = once, twice
        for p in path:
            m1, m2 = m1[p], m2[p]
        m1, m2 = np.asarray(m1["mean"]), np.asarray(m2["mean"])
        np.testing.assert_allclose(m2, 1.9 * m1, rtol=1e-4, atol=1e-6)  # 0.1 b, then 0.19 b


def test_cam_pass_keeps_its_own_statistics(variables, images):
    # Corrected mode: after the warm-up the main pass normalises MAF-fused inputs and the CAM
    # pass raw ones; each writes, and at evaluation reads, its own running statistics.
    model = FAMFNet()
    zero = jax.tree_util.tree_map(jnp.zeros_like, variables["batch_stats"])
    vs = {"params": variables["params"], "batch_stats": zero, "cam_stats": zero}
    _, stats = inference.two_pass(model, vs, *images, warm=True, train=True)
    main, cam = stats["batch_stats"], stats["cam_stats"]
    same = lambda a, b: all(  # noqa: E731
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )
    assert same(main["stem_1"], cam["stem_1"]) and same(main["fire2_2"], cam["fire2_2"])
    assert not same(main["fire5_1"], cam["fire5_1"]) and not same(main["fire9_2"], cam["fire9_2"])
    # Evaluation: the CAMs come from a cold pass with the CAM statistics, not the main ones.
    ev = {"params": variables["params"], "batch_stats": main, "cam_stats": cam}
    out, _ = inference.two_pass(model, ev, *images, warm=True)
    for stats_used, expect_equal in ((cam, True), (main, False)):
        cold = model.apply({"params": variables["params"], "batch_stats": stats_used}, *images)
        cams = inference.closed_form_cams(
            cold["f9_bmode"],
            cold["f9_swe"],
            variables["params"]["conv10"]["kernel"],
            cold["logits"],
        )
        close = np.allclose(np.asarray(out["cam_bmode"]), np.asarray(cams[0]), atol=1e-6)
        assert close == expect_equal
    # Before the warm-up the one pass is both: both sets follow it.
    _, cold_stats = inference.two_pass(model, vs, *images, warm=False, train=True)
    assert same(cold_stats["batch_stats"], cold_stats["cam_stats"])


def _peak_cams(b_at, s_at, n=2, h=8):
    """(n, h, h) CAMs in [0, 1] with one Gaussian peak each, at cell positions b_at / s_at."""
    yy, xx = np.mgrid[:h, :h]

    def one(at):
        f = np.exp(-((yy - at[0]) ** 2 + (xx - at[1]) ** 2) / 2.0)
        return (f - f.min()) / (f.max() - f.min())

    return (
        jnp.asarray(np.stack([one(b_at)] * n), jnp.float32),
        jnp.asarray(np.stack([one(s_at)] * n), jnp.float32),
    )


@pytest.mark.parametrize("faithful", [False, True])
def test_maf_fuses_the_right_regions_by_hand(images, faithful, rng):
    # Hand-built CAMs with known, distant peaks (unequal row and column offsets), and the fused
    # outputs recomputed in numpy from the module's own embeddings: swapping the two shifts,
    # the two masks, the two CAMs or the attention's query and value breaks the equality.
    size = SIZE // 2
    f2_b = jnp.asarray(rng.random((2, size, size, 128)), jnp.float32)
    f2_s = jnp.asarray(rng.random((2, size, size, 128)), jnp.float32)
    cam_b, cam_s = _peak_cams((2, 5), (6, 1))
    maf = MutualAttentionFusion(faithful=faithful)
    args = (f2_b, f2_s, *images, cam_b, cam_s, False)
    v = maf.init(jax.random.key(0), *args)
    out = maf.apply(v, *args)

    up_b = np.asarray(raa.upsample_cam(cam_b, size, faithful))[0]
    up_s = np.asarray(raa.upsample_cam(cam_s, size, faithful))[0]
    if faithful:
        c_b = bmode_centre(up_b)
    else:
        c_b = bmode_centre(up_b, lambda g: g < 0.2 * g.max())
    c_s = swe_centre(up_s)
    np.testing.assert_array_equal(np.asarray(out["centre_bmode"][0]), c_b)
    np.testing.assert_array_equal(np.asarray(out["centre_swe"][0]), c_s)
    assert c_s[0] - c_b[0] != c_s[1] - c_b[1]  # rows and columns move differently

    def window(c):
        m = np.zeros((size, size))
        half = size // 8
        m[max(0, c[0] - half) : c[0] + half, max(0, c[1] - half) : c[1] + half] = 1
        return m

    def moved(x, d):  # out[r, c] = x[r + d0, c + d1], zero outside
        o = np.zeros_like(x)
        for r in range(size):
            for c in range(size):
                if 0 <= r + d[0] < size and 0 <= c + d[1] < size:
                    o[r, c] = x[r + d[0], c + d[1]]
        return o

    d = np.array(c_s) - np.array(c_b)
    if faithful:
        d = d[::-1]  # B3
    colour = np.asarray(out["colour_swe"][0], np.float64) * window(c_s)[..., None]
    edge = np.asarray(out["edge_bmode"][0], np.float64) * window(c_b)[..., None]

    def attend(q, v):
        q, v = q.reshape(-1, 128), v.reshape(-1, 128)
        logits = q.T @ v  # unscaled: the default, and faithful mode always
        a = np.exp(logits - logits.max(1, keepdims=True))
        a /= a.sum(1, keepdims=True)
        return np.clip((v @ a.T) / np.sqrt(1 + BN_EPSILON), 0, 6).reshape(size, size, 128)

    want_b = attend(moved(colour, d), np.asarray(f2_b[0], np.float64))
    want_s = attend(moved(edge, -d), np.asarray(f2_s[0], np.float64))
    np.testing.assert_allclose(np.asarray(out["fused_bmode"][0]), want_b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["fused_swe"][0]), want_s, rtol=1e-4, atol=1e-4)


def test_default_attention_is_not_near_uniform(variables):
    # Issue 11 item 1: dividing the logits by sqrt(N) made MAF's attention uniform (every fused
    # channel the channel mean); the default must attend on a realistic input.
    from famf_jax.maf import attention_weights
    from famf_jax.synthetic import make_patient

    rng = np.random.default_rng(0)
    size = 256  # the paper's input: N = 128^2 positions (the parameters do not depend on it)
    pairs = [make_patient(rng, m, size, 0.0) for m in (True, False)]
    b = jnp.asarray(np.stack([p[0] for p in pairs]), jnp.float32) / 127.5 - 1
    s = jnp.asarray(np.stack([p[1] for p in pairs]), jnp.float32) / 127.5 - 1
    model = FAMFNet()
    assert not model.scaled_attention
    cold = model.apply(variables, b, s)
    cams = inference.closed_form_cams(
        cold["f9_bmode"], cold["f9_swe"], variables["params"]["conv10"]["kernel"], cold["logits"]
    )
    out = model.apply(variables, b, s, *cams, warm=True)
    colour = jax.vmap(raa.shift)(
        out["colour_swe"] * out["mask_swe"][..., None], out["shift_to_bmode"]
    )
    uniform = 1 / 128
    rows = attention_weights(colour, out["f2_bmode"], scaled=False).max(-1)
    scaled_rows = attention_weights(colour, out["f2_bmode"], scaled=True).max(-1)
    # measured here: default median 0.062 (8x uniform); scaled: largest row maximum 0.024
    assert float(jnp.median(rows)) > 4 * uniform
    assert float(jnp.median(scaled_rows)) < 1.5 * uniform  # the scaled form: near-uniform


def test_create_state_is_the_eager_init_bit_for_bit(variables):
    """experiment.create_state compiles the init as one program; every weight and statistic
    is still the eager `model.init`'s, from the same seed, exactly. (Under XLA's default
    settings, not the tests' reduced ones, this also decides the compiler options: its
    faster pipeline moves uniform initialisers by an ulp there, and with them every run.)"""
    from configs import famf as famf_config
    from famf_jax import experiment

    cfg = famf_config.get_config("smoke")
    cfg.seed, cfg.data.image_size = 0, SIZE  # the fixture's key and size
    state, _ = experiment.create_state(cfg, 1)
    for name in ("params", "batch_stats"):
        got, want = jax.tree.leaves(getattr(state, name)), jax.tree.leaves(variables[name])
        assert len(got) == len(want)
        assert all(np.array_equal(g, w) for g, w in zip(got, want)), name
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, state.cam_stats, state.batch_stats)))
