import jax
import jax.numpy as jnp
import numpy as np

from famf_jax.losses import cross_entropy, focal_loss


def direct_focal(logits, labels, alpha0, gamma):
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pt = p[np.arange(len(labels)), labels]
    alpha = np.where(labels == 0, alpha0, 1 - alpha0)
    return np.mean(-alpha * (1 - pt) ** gamma * np.log(pt))


def test_focal_matches_formula(rng):
    logits = rng.normal(0, 2, (16, 2))
    labels = rng.integers(0, 2, 16)
    for alpha0, gamma in [(0.5, 2.0), (0.2, 0.5), (0.9, 3.9), (0.5, 0.0)]:
        got = focal_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), alpha0, gamma)
        np.testing.assert_allclose(
            float(got), direct_focal(logits, labels, alpha0, gamma), rtol=1e-5
        )


def test_focal_alpha_gamma_dependence(rng):
    logits = jnp.asarray(rng.normal(0, 2, (32, 2)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 2, 32))
    ce = cross_entropy(logits, labels)
    np.testing.assert_allclose(float(focal_loss(logits, labels, 0.5, 0.0)), 0.5 * float(ce), 1e-6)
    losses = [float(focal_loss(logits, labels, 0.5, g)) for g in (0.0, 1.0, 2.0, 3.0)]
    assert all(a > b for a, b in zip(losses, losses[1:]))  # focusing shrinks every term
    only_malignant = jnp.ones(32, jnp.int32)
    lo = float(focal_loss(logits, only_malignant, 0.8, 2.0))  # alpha1 = 0.2
    hi = float(focal_loss(logits, only_malignant, 0.2, 2.0))  # alpha1 = 0.8
    np.testing.assert_allclose(hi / lo, 4.0, rtol=1e-6)
    g = jax.grad(lambda x: focal_loss(x, labels, 0.3, 0.1))(logits)
    assert np.isfinite(np.asarray(g)).all()


def test_double_softmax_variant_is_bounded(rng):
    logits = jnp.asarray(rng.normal(0, 10, (64, 2)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 2, 64))
    per = [
        float(focal_loss(logits[i : i + 1], labels[i : i + 1], 0.5, 2.0, double_softmax=True))
        for i in range(64)
    ]
    assert min(per) >= 0.0113 - 1e-4 and max(per) <= 0.351 + 1e-4  # spec 3.1 (a)
