"""Classification losses (spec sections 3.1, B6, B7).

The network returns logits and probabilities; the focal loss works on `log_softmax(logits)`
(the spec's variant (b), numerically stable). `double_softmax=True` reproduces variant (a), the
common focal-loss file that softmaxes the already-softmaxed output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def focal_loss(
    logits: jax.Array,
    labels: jax.Array,
    alpha0: jax.Array | float,
    gamma: jax.Array | float,
    double_softmax: bool = False,
) -> jax.Array:
    """mean_b( -alpha[y_b] (1 - p_b)^gamma log p_b ), alpha = (alpha0, 1 - alpha0).

    logits: (B, 2); labels: (B,) int. alpha0 weights class 0 (benign), 1 - alpha0 class 1.
    """
    if double_softmax:
        logits = jax.nn.softmax(logits, axis=-1)
    logp = jax.nn.log_softmax(logits, axis=-1)
    logp_t = jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    p_t = jnp.exp(logp_t)
    alpha0 = jnp.asarray(alpha0, logits.dtype)
    alpha_t = jnp.where(labels == 0, alpha0, 1.0 - alpha0)
    # (1 - p)^gamma via exp(gamma * log1p(-p)); p is kept below 1 so the gradient stays finite.
    modulator = jnp.exp(gamma * jnp.log1p(-jnp.minimum(p_t, 1.0 - 1e-7)))
    return jnp.mean(-alpha_t * modulator * logp_t)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))
