"""Handcrafted modality features used by Mutual Attention Fusion (spec section 2.3).

Both are computed from the normalised network inputs (B, H, W, 3), at full resolution.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

EDGE_SIGMA = 1.0
EDGE_KERNEL_SIZE = 5
COLOUR_WINDOW = 5


def gaussian_derivative_kernels(
    size: int = EDGE_KERNEL_SIZE, sigma: float = EDGE_SIGMA
) -> tuple[np.ndarray, np.ndarray]:
    """Unnormalised derivative-of-Gaussian kernels (Gx, Gy), each (size, size); Gy = Gx.T."""
    a = np.arange(size, dtype=np.float64) - size // 2
    x, y = np.meshgrid(a, a)  # x[i, j] = a[j], y[i, j] = a[i]
    g = np.exp(-(x**2 + y**2) / (2 * sigma**2)) / (2 * math.pi * sigma**4)
    return (-x * g).astype(np.float32), (-y * g).astype(np.float32)


def edge_map(x: jax.Array) -> jax.Array:
    """tanh(|grad|) of the frozen derivative-of-Gaussian filter, (B, H, W, 3) -> (B, H, W, 3).

    The original's (3, 3, 5, 5) weight repeats one kernel for every (out, in) pair, so every
    output channel is the same sum over input channels (cross-correlation, zero padding 2).
    The kernels are constants, never parameters, so no optimiser or weight decay sees them.
    """
    gx, gy = gaussian_derivative_kernels()
    c = x.shape[-1]
    # (5, 5, C_in, 2): one output for Gx, one for Gy, each summing over input channels.
    kernel = np.stack([gx, gy], axis=-1)[:, :, None, :].repeat(c, axis=2)
    pad = EDGE_KERNEL_SIZE // 2
    h = jax.lax.conv_general_dilated(
        x,
        jnp.asarray(kernel, x.dtype),
        window_strides=(1, 1),
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    hx, hy = h[..., 0], h[..., 1]
    edge = jnp.tanh(jnp.sqrt(hx**2 + hy**2 + 1e-8))
    return jnp.broadcast_to(edge[..., None], x.shape)


def _windows(x: jax.Array, window: int) -> jax.Array:
    """All window x window neighbours with zero padding: (B, H, W, C) -> (B, H, W, C, window**2)."""
    pad = window // 2
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = x.shape[1], x.shape[2]
    return jnp.stack(
        [xp[:, i : i + h, j : j + w, :] for i in range(window) for j in range(window)], axis=-1
    )


def local_colour_moments(x: jax.Array, window: int = COLOUR_WINDOW) -> jax.Array:
    """Local mean, unbiased variance and biased third moment / std^3 (spec B22, B23).

    (B, H, W, C) -> (B, H, W, 3C), channels [mean_c..., var_c..., skew_c...]. Computed from
    centred window values, not from power sums, so flat regions give skew 0 and not noise.
    """
    v = _windows(x, window)
    n = window * window
    mean = v.mean(-1)
    d = v - mean[..., None]
    var = (d**2).sum(-1) / (n - 1)
    third = (d**3).sum(-1) / n
    skew = third / (jnp.sqrt(var) ** 3 + 1e-6)
    return jnp.concatenate([mean, var, skew], axis=-1)
