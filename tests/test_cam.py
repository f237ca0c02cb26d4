import jax
import jax.numpy as jnp
import numpy as np

from famf_jax.cam import closed_form_cams


def features(seed: int, b: int, h: int = 8, k: int = 16):
    """Random fire9 activations of both streams (B, h, h, k) and a conv10 kernel (1, 1, 2k, 2)."""
    keys = jax.random.split(jax.random.key(seed), 3)
    f9_b = jax.nn.relu(jax.random.normal(keys[0], (b, h, h, k)))
    f9_s = jax.nn.relu(jax.random.normal(keys[1], (b, h, h, k)))
    return f9_b, f9_s, 0.3 * jax.random.normal(keys[2], (1, 1, 2 * k, 2))


def logits_of(f9_b, f9_s, kernel, bias=0.0):
    """conv10 after global average pooling (both linear), plus the bias."""
    x = jnp.concatenate([f9_b, f9_s], -1)
    return jnp.einsum("bhwk,kc->bhwc", x, kernel[0, 0]).mean((1, 2)) + bias


def xgradcam_by_autodiff(f9_b, f9_s, kernel, bias):
    """torchcam's XGradCAM of sum_b probs[b, argmax_b] through conv10 + GAP + softmax."""

    def probs_of(a_b, a_s):
        return jax.nn.softmax(logits_of(a_b, a_s, kernel, bias), -1)

    c = jnp.argmax(probs_of(f9_b, f9_s), -1)
    score = lambda a_b, a_s: jnp.take_along_axis(probs_of(a_b, a_s), c[:, None], 1).sum()
    grads = jax.grad(score, argnums=(0, 1))(f9_b, f9_s)
    cams = []
    for a, g in zip((f9_b, f9_s), grads):
        w = (g * a).sum((1, 2)) / a.sum((1, 2))  # (B, K), NaN for dead channels
        cam = jax.nn.relu(jnp.nansum(w[:, None, None, :] * a, -1))
        cam = cam - cam.min((1, 2), keepdims=True)
        cams.append(cam / cam.max((1, 2), keepdims=True))
    return cams


def test_closed_form_equals_xgradcam():
    b, h = 4, 8
    f9_b, f9_s, kernel = features(0, b, h)
    f9_b = f9_b.at[:, :, :, 3].set(0.0)  # a dead channel, dropped by torchcam's nansum
    bias = jax.random.normal(jax.random.key(10), (2,))
    logits = logits_of(f9_b, f9_s, kernel, bias)
    got = closed_form_cams(f9_b, f9_s, kernel, logits)
    want = xgradcam_by_autodiff(f9_b, f9_s, kernel, bias)
    for g, w in zip(got, want):
        assert g.shape == (b, h, h)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)
        assert float(g.min()) == 0.0 and abs(float(g.max()) - 1.0) < 1e-6


def test_constant_cam_is_zero_not_nan():
    f9 = jnp.zeros((1, 4, 4, 8))
    cams = closed_form_cams(f9, f9, jnp.ones((1, 1, 16, 2)), jnp.array([[0.0, 0.4]]))
    assert not np.isnan(np.asarray(cams[0])).any() and float(cams[0].max()) == 0.0


def test_faithful_cams_of_a_confident_model_follow_autograd():
    # p_c rounds to 1 in float32: autograd's coefficient p_c (1 - p_c) of W_c is 0 and the CAM
    # becomes relu(-sum W_o A); the exact closed form keeps W_c - W_o.
    k = 16
    f9_b, f9_s, kernel = features(1, 2, k=k)
    bias = jnp.array([40.0, 0.0])  # a saturated logit pair
    logits = logits_of(f9_b, f9_s, kernel, bias)
    probs = jax.nn.softmax(logits, -1)
    assert (probs[:, 0] == 1.0).all() and (probs[:, 1] > 0).all()
    want = xgradcam_by_autodiff(f9_b, f9_s, kernel, bias)
    faithful = closed_form_cams(f9_b, f9_s, kernel, logits, faithful=True)
    exact = closed_form_cams(f9_b, f9_s, kernel, logits)
    w_o = kernel[0, 0, :, 1]
    for g, w, e, a, wo in zip(faithful, want, exact, (f9_b, f9_s), (w_o[:k], w_o[k:])):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)
        by_hand = jax.nn.relu(-jnp.einsum("k,bhwk->bhw", wo, a))
        by_hand = by_hand - by_hand.min((1, 2), keepdims=True)
        by_hand = by_hand / by_hand.max((1, 2), keepdims=True)
        np.testing.assert_allclose(np.asarray(g), np.asarray(by_hand), atol=1e-5)
        assert np.abs(np.asarray(g) - np.asarray(e)).max() > 0.1


def test_faithful_and_exact_agree_when_not_saturated():
    f9_b, f9_s, kernel = features(2, 3)
    logits = jnp.log(jnp.array([[0.3, 0.7], [0.9, 0.1], [0.5001, 0.4999]]))
    for f, e in zip(
        closed_form_cams(f9_b, f9_s, kernel, logits, faithful=True),
        closed_form_cams(f9_b, f9_s, kernel, logits),
    ):
        np.testing.assert_allclose(np.asarray(f), np.asarray(e), atol=1e-5)


def torchcam_float32(f9_b, f9_s, kernel, bias):
    """torchcam's XGradCAM as PyTorch's CPU float32 forms it, in NumPy, which keeps subnormals
    (XLA on CPU flushes them): softmax, its VJP p * (e_c - p_c), the 1/HW of the pooling, the
    channel weights sum(g A) / sum(A), the weighted sum, min-max (NaN for a constant map)."""
    a_b, a_s, w = (np.asarray(v, np.float32) for v in (f9_b, f9_s, kernel[0, 0]))
    x = np.concatenate([a_b, a_s], -1)
    hw = np.float32(x.shape[1] * x.shape[2])
    logits = (x @ w).mean((1, 2)) + np.asarray(bias, np.float32)  # bias (2,) or (B, 2)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    p = e * (np.float32(1) / e.sum(-1, keepdims=True))  # PyTorch's CPU softmax
    c = p.argmax(-1)
    onehot = np.eye(2, dtype=np.float32)[c]
    p_c = np.take_along_axis(p, c[:, None], 1)
    d_map = p * (onehot - p_c) / hw  # softmax's VJP, then the pooling's
    g = np.einsum("bc,kc->bk", d_map, w)[:, None, None, :]  # conv10's; the same everywhere
    cams = []
    for i, a in enumerate((a_b, a_s)):
        gk = np.broadcast_to(g[..., i * a.shape[-1] : (i + 1) * a.shape[-1]], a.shape)
        with np.errstate(invalid="ignore"):
            weights = (gk * a).sum((1, 2)) / a.sum((1, 2))
            cam = np.maximum(np.nansum(weights[:, None, None, :] * a, -1), 0)
            cam = cam - cam.min((1, 2), keepdims=True)
            cams.append(cam / cam.max((1, 2), keepdims=True))
    return cams, logits


def test_faithful_cams_follow_pytorch_float32_where_its_gradient_is_subnormal():
    # From a logit margin of about 80 torchcam's gradient is a subnormal float32, which PyTorch
    # keeps (XLA's CPU flushes it): at 88 and 95 the original's map is made of its coarse
    # steps; at 101 the gradient rounds to 0 although p_o = e^-101 does not, and at 110 p_o is
    # 0 too: the original's map is constant there (NaN; zeros here, B20).
    b = 2
    f9_b, f9_s, kernel = features(3, b)
    raw = np.asarray(logits_of(f9_b, f9_s, kernel))
    for margin in (5.0, 20.0, 88.0, 95.0, 101.0, 110.0):
        bias = np.stack([np.zeros(b), raw[:, 0] - raw[:, 1] - margin], -1)  # class 0 wins
        want, logits = torchcam_float32(f9_b, f9_s, kernel, bias)
        p_o = np.exp(np.float32(-margin))
        assert (p_o > 0) == (margin < 103) and (p_o < np.finfo(np.float32).tiny) == (margin > 87)
        got = closed_form_cams(f9_b, f9_s, kernel, jnp.asarray(logits), faithful=True)
        jitted = jax.jit(closed_form_cams, static_argnames="faithful")
        got_jit = jitted(f9_b, f9_s, kernel, jnp.asarray(logits), faithful=True)
        for g, gj, w in zip(got, got_jit, want):
            g, w = np.asarray(g), np.asarray(w)
            np.testing.assert_array_equal(np.asarray(gj), g)  # as the model runs it, in jit
            if margin < 100:
                assert np.isfinite(w).all() and w.max() == 1.0
                np.testing.assert_allclose(g, w, atol=1e-6)
            else:
                assert np.isnan(w).all() and (g == 0).all()
