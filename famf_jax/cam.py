"""Class activation maps in closed form (spec section 2.4).

After fire9 the network is a 1x1 conv, global average pooling and softmax, so torchcam's
XGradCAM of the predicted class's probability reduces exactly to the classical CAM of the
logit difference: for stream s and predicted class c,

    cam_s = minmax(relu(sum_k (W10[k, c] - W10[k, 1 - c]) * A^s[..., k]))

No backward pass is needed. `faithful=True` keeps torchcam's float32 arithmetic instead: the
softmax derivative's coefficients p_c (1 - p_c) and -p_c p_o as autograd forms them, so once
p_c rounds to 1 the W_c term vanishes and the map becomes relu(-sum W_o A), as the original's
does for a confident model (the positive factor 1/HW cancels in the normalisation). That map
is formed without its factor p_o: PyTorch keeps p_o as a subnormal float32 down to 2^-149
(logit margins up to 150 ln 2 = 103.97), where XLA on CPU flushes it, and every product
with it, to zero; beyond, PyTorch's p_o is 0 too and the map constant. Equal to PyTorch's to
1e-4 up to margins of about 88; above, PyTorch's gradients are a few subnormal steps (its map
1e-2 off the exact one at 95, and constant once they round to 0, near 99 at 32x32 maps).
Deviation (B20): a constant map becomes all zeros instead of the original's all-NaN;
`raa.bmode_centre` reproduces the original's centre for that case when faithful.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def minmax_normalise(cam: jax.Array) -> jax.Array:
    """Per-sample (cam - min) / max_after_shift, (B, h, w) -> (B, h, w) in [0, 1]; a constant
    map gives zeros. No epsilon: a faithful CAM of a confident model is ~1e-18 in scale."""
    cam = cam - cam.min(axis=(1, 2), keepdims=True)
    top = cam.max(axis=(1, 2), keepdims=True)
    return cam / jnp.where(top > 0, top, 1.0)


# PyTorch's float32 exp(-m) is nonzero (a subnormal at least) while m < 150 ln 2.
_SUBNORMAL_EXP_LIMIT = 150 * math.log(2)


def closed_form_cams(
    f9_bmode: jax.Array,
    f9_swe: jax.Array,
    conv10_kernel: jax.Array,
    logits: jax.Array,
    faithful: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """CAMs of the predicted class for both streams, constants for differentiation.

    f9_*: (B, h, w, K) fire9 activations of the warm-off pass (bfloat16 ones are upcast: the
    maps, and all RAA derives from them, are float32); conv10_kernel: (1, 1, 2K, 2)
    with the B-mode channels first; logits: (B, 2) float32 (the model's, whose softmax is its
    probs). Returns two (B, h, w) maps in [0, 1].
    """
    w = conv10_kernel.reshape(conv10_kernel.shape[-2], conv10_kernel.shape[-1])  # (2K, 2)
    c = jnp.argmax(logits, axis=-1)
    if faithful:
        # Softmax's VJP of the one-hot score, p * (e_c - p_c), in float32 as autograd forms it.
        probs = jax.nn.softmax(logits, axis=-1)
        pick = lambda x, i: jnp.take_along_axis(x, i[:, None], 1)[:, 0]  # noqa: E731
        p_c, p_o = pick(probs, c), pick(probs, 1 - c)
        a, b = p_c * (1.0 - p_c), p_o * (0.0 - p_c)
        diff = (a[:, None] * w[:, c].T) + (b[:, None] * w[:, 1 - c].T)  # (B, 2K)
        # p_c == 1: the map of -p_o W_o is that of -W_o (scale-free) while PyTorch's p_o > 0.
        margin = pick(logits, c) - pick(logits, 1 - c)
        saturated = -w[:, 1 - c].T * (margin < _SUBNORMAL_EXP_LIMIT)[:, None]
        diff = jnp.where((a == 0)[:, None], saturated, diff)
    else:
        diff = (w[:, c] - w[:, 1 - c]).T  # (B, 2K)
    k = f9_bmode.shape[-1]
    hp = jax.lax.Precision.HIGHEST

    def one(a, d):
        a = a.astype(jnp.float32)
        return minmax_normalise(jax.nn.relu(jnp.einsum("bk,bhwk->bhw", d, a, precision=hp)))

    cams = one(f9_bmode, diff[:, :k]), one(f9_swe, diff[:, k:])
    return jax.lax.stop_gradient(cams[0]), jax.lax.stop_gradient(cams[1])
