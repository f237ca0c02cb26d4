"""Class activation maps in closed form (spec section 2.4).

After fire9 the network is a 1x1 conv, global average pooling and softmax, so torchcam's
XGradCAM of the predicted class's probability reduces exactly to the classical CAM of the
logit difference: for stream s and predicted class c,

    cam_s = minmax(relu(sum_k (W10[k, c] - W10[k, 1 - c]) * A^s[..., k]))

No backward pass is needed. `faithful=True` computes torchcam's XGradCAM itself, op by op in
PyTorch's float32 arithmetic (emulated in float64, subnormals kept where XLA's CPU would flush
them): the softmax derivative's coefficients p_c (1 - p_c) and -p_c p_o as autograd forms
them, so once p_c rounds to 1 the W_c term vanishes and the map becomes relu(-sum W_o A), as
the original's does for a confident model; for logit margins above about 80 the gradient is a
subnormal float32 whose coarse steps the original's map keeps, and once it rounds to 0 (from
margins of 93 to 97 at 32x32, as |W_o| is larger or smaller) that map is constant.
Deviation (B20): a constant map becomes all zeros instead of the original's all-NaN;
`raa.bmode_centre` reproduces the original's centre for that case when faithful.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def minmax_normalise(cam: jax.Array, rounded=lambda x: x) -> jax.Array:
    """Per-sample (cam - min) / max_after_shift, (B, h, w) -> (B, h, w) in [0, 1]; a constant
    map gives zeros. No epsilon: the exact CAM's scale is that of the kernel's columns.
    `rounded` is applied to each op's result (the faithful path's float32 rounding)."""
    cam = rounded(cam - cam.min(axis=(1, 2), keepdims=True))
    top = cam.max(axis=(1, 2), keepdims=True)
    return rounded(cam / jnp.where(top > 0, top, 1.0))


def _as_float32(x: jax.Array) -> jax.Array:
    """A float64 rounded to the float32 PyTorch's CPU would hold, subnormals kept (down to
    2^-149; XLA's CPU flushes them to zero), returned as float64. The barrier keeps XLA from
    folding the rounding away."""
    subnormal = jnp.round(x * 2.0**149) * 2.0**-149  # half to even, as IEEE rounding
    normal = jax.lax.optimization_barrier(x.astype(jnp.float32)).astype(jnp.float64)
    return jnp.where(jnp.abs(x) < 2.0**-126, subnormal, normal)


def _torchcam_xgradcam(f9_bmode, f9_swe, w, logits):
    """torchcam 0.3.2's XGradCAM of the predicted class's probability in PyTorch's CPU float32
    arithmetic, op by op, in float64 rounded to float32 after each (subnormals kept): softmax,
    its VJP p (e_c - p_c), the global pooling's 1/HW, conv10's transpose, the channel weights
    sum(g A) / sum(A), relu(nansum_k w_k A_k), min-max. A confident model's gradient is a
    subnormal float32 (logit margins above about 80), which PyTorch keeps and XLA's CPU
    flushes; its map keeps that coarse rounding, and is constant once the gradient is 0."""
    f32 = _as_float32
    with jax.enable_x64(True):
        f64 = jnp.float64
        x = logits.astype(jnp.float32)
        e = f32(jnp.exp((x - x.max(-1, keepdims=True)).astype(f64)))
        p = f32(e * f32(1.0 / f32(e.sum(-1, keepdims=True))))  # its softmax: e * (1 / sum)
        c = (p[:, 1] > p[:, 0]).astype(jnp.int32)  # argmax (an x64 argmax fails under jit)
        p_c = jnp.take_along_axis(p, c[:, None], 1)
        d_logits = f32(p * f32(jax.nn.one_hot(c, 2, dtype=f64) - p_c))  # (B, 2)
        d_map = f32(d_logits / (f9_bmode.shape[1] * f9_bmode.shape[2]))
        grad = f32(d_map @ w.astype(f64).T)  # (B, 2K): conv10's input gradient, per position

        def one(a, g):
            a = a.astype(jnp.float32).astype(f64)
            num = f32(f32(g[:, None, None, :] * a).sum((1, 2)))
            weights = f32(num / f32(a.sum((1, 2))))  # 0 / 0 for dead channels: nansum drops
            cam = jax.nn.relu(f32(jnp.nansum(f32(weights[:, None, None, :] * a), -1)))
            return minmax_normalise(cam, f32).astype(jnp.float32)

        k = f9_bmode.shape[-1]
        return one(f9_bmode, grad[:, :k]), one(f9_swe, grad[:, k:])


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
    if faithful:
        cams = _torchcam_xgradcam(f9_bmode, f9_swe, w, logits)
        return jax.lax.stop_gradient(cams[0]), jax.lax.stop_gradient(cams[1])
    c = jnp.argmax(jax.nn.softmax(logits, axis=-1), axis=-1)  # the original's argmax(probs)
    diff = (w[:, c] - w[:, 1 - c]).T  # (B, 2K)
    k = f9_bmode.shape[-1]
    hp = jax.lax.Precision.HIGHEST

    def one(a, d):
        a = a.astype(jnp.float32)
        return minmax_normalise(jax.nn.relu(jnp.einsum("bk,bhwk->bhw", d, a, precision=hp)))

    cams = one(f9_bmode, diff[:, :k]), one(f9_swe, diff[:, k:])
    return jax.lax.stop_gradient(cams[0]), jax.lax.stop_gradient(cams[1])
