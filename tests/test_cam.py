import jax
import jax.numpy as jnp
import numpy as np

from famf_jax.cam import closed_form_cams


def xgradcam_by_autodiff(f9_b, f9_s, kernel, bias):
    """torchcam's XGradCAM of sum_b probs[b, argmax_b] through conv10 + GAP + softmax."""

    def probs_of(a_b, a_s):
        x = jnp.concatenate([a_b, a_s], -1)
        logits = jnp.einsum("bhwk,kc->bhwc", x, kernel[0, 0]).mean((1, 2)) + bias
        return jax.nn.softmax(logits, -1)

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
    keys = jax.random.split(jax.random.key(0), 4)
    b, h, k = 4, 8, 16
    f9_b = jax.nn.relu(jax.random.normal(keys[0], (b, h, h, k)))
    f9_s = jax.nn.relu(jax.random.normal(keys[1], (b, h, h, k)))
    f9_b = f9_b.at[:, :, :, 3].set(0.0)  # a dead channel, dropped by torchcam's nansum
    kernel = 0.3 * jax.random.normal(keys[2], (1, 1, 2 * k, 2))
    bias = jax.random.normal(keys[3], (2,))
    x = jnp.concatenate([f9_b, f9_s], -1)
    probs = jax.nn.softmax(jnp.einsum("bhwk,kc->bhwc", x, kernel[0, 0]).mean((1, 2)) + bias, -1)
    got = closed_form_cams(f9_b, f9_s, kernel, probs)
    want = xgradcam_by_autodiff(f9_b, f9_s, kernel, bias)
    for g, w in zip(got, want):
        assert g.shape == (b, h, h)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)
        assert float(g.min()) == 0.0 and abs(float(g.max()) - 1.0) < 1e-6


def test_constant_cam_is_zero_not_nan():
    f9 = jnp.zeros((1, 4, 4, 8))
    cams = closed_form_cams(f9, f9, jnp.ones((1, 1, 16, 2)), jnp.array([[0.4, 0.6]]))
    assert not np.isnan(np.asarray(cams[0])).any() and float(cams[0].max()) == 0.0
