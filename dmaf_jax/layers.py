"""DMAF-Net's building blocks, written once for any spatial rank (spec 2.2, 10.10, 11.15, 11.17).

Arrays are channels-last, (B, *S, C) with len(S) = 2 (MyoPS slices) or 3 (BraTS volumes).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common.conv import Conv

LEAKY_SLOPE = 0.2
IN_EPS = 1e-5


def instance_norm(x: jax.Array) -> jax.Array:
    """Non-affine instance norm over the spatial axes of (B, *S, C), statistics in float32
    (`(x - mu) * rsqrt(var + 1e-5)`, section 11.15). An all-zero map stays zero."""
    axes = tuple(range(1, x.ndim - 1))
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axes, keepdims=True)
    var = jnp.square(x32 - mean).mean(axes, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + IN_EPS)).astype(x.dtype)


@functools.cache
def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation with align_corners=True (PyTorch's convention)."""
    m = np.zeros((n_out, n_in), np.float32)
    if n_in == 1 or n_out == 1:
        m[:, 0] = 1.0
        return m
    pos = np.arange(n_out) * (n_in - 1) / (n_out - 1)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = pos - lo
    m[np.arange(n_out), lo] = 1 - frac
    m[np.arange(n_out), lo + 1] += frac
    return m


def resize_align_corners(x: jax.Array, size) -> jax.Array:
    """Linear (bi-/trilinear) resize of (B, *S, C) to spatial `size`, align_corners=True.

    `jax.image.resize` uses half-pixel centres, so this applies one interpolation matrix per
    axis (section 10.10)."""
    for axis, n_out in enumerate(size, start=1):
        n_in = x.shape[axis]
        if n_in == n_out:
            continue
        m = jnp.asarray(_interp_matrix(n_in, n_out), x.dtype)
        x = jnp.moveaxis(jnp.tensordot(m, x, axes=([1], [axis])), 0, axis)
    return x


def upsample(x: jax.Array, factor: int) -> jax.Array:
    """Upsample every spatial axis of (B, *S, C) by `factor` (align_corners=True)."""
    return resize_align_corners(x, tuple(s * factor for s in x.shape[1:-1]))


def avg_pool(x: jax.Array, factor: int) -> jax.Array:
    """Non-overlapping average pooling of (B, *S, C) by `factor` on every spatial axis
    (adaptive pooling to S / factor when S divides, as a reshape-mean)."""
    if factor == 1:
        return x
    b, *s, c = x.shape
    shape = [b]
    for n in s:
        shape += [n // factor, factor]
    x = x.reshape(*shape, c)
    return x.mean(axis=tuple(range(2, 2 * len(s) + 1, 2)))


class PreNormConv(nn.Module):
    """InstanceNorm -> LeakyReLU(0.2) -> Conv (reflect padding, bias): `general_conv3d_prenorm`."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.leaky_relu(instance_norm(x), LEAKY_SLOPE)
        return Conv(self.features, self.kernel_size, self.stride, dtype=self.dtype, name="conv")(x)


def remat_call(module: nn.Module, *args, **static):
    """`module(*args, **static)` whose backward pass recomputes the module's forward from its
    inputs instead of keeping its intermediates: `nn.remat`, but written so that XLA keeps it.

    `nn.remat` (jax.checkpoint) fences the recomputation with an optimisation barrier, which
    XLA:CPU removes before scheduling; its scheduler then ran the recomputation during the
    forward pass and CSE merged it with the original, so the step's memory did not drop
    (50.89 GiB without, 51.71 with, DMAF paper step at 128^3 batch 2). Here the backward
    recomputes from the inputs plus 0 x one element per sample of the output cotangent: a real
    data dependence (XLA does not fold 0 x a float), so the recomputation can only run once the
    cotangent exists, and one per sample keeps it on each device's own rows when the batch is
    split. Same parameters and names; same values, gradients up to rounding.

    For modules whose floating inputs and first output lead with the batch axis and that use
    parameters alone: no other collections, and no `make_rng` (the recomputation applies
    `{"params": ...}`), so randomness comes in as an argument (key data, replayed exactly).
    Integer and boolean inputs get no gradient; `static` are Python values (flags)."""
    proto = module.clone(parent=None)

    def call(mdl, *a):
        return mdl(*a, **static)

    def forward(mdl, *a):
        return mdl(*a, **static), (mdl.variables["params"], a)

    def backward(residuals, cotangent):
        params, inputs = residuals
        cot = jax.tree.leaves(cotangent)[0]
        after = cot.reshape(cot.shape[0], -1)[:, 0] * 0  # (B,) zeros that depend on it

        def depend(x):
            if not jnp.issubdtype(x.dtype, jnp.inexact):
                return x
            return x + after.reshape(-1, *[1] * (x.ndim - 1)).astype(x.dtype)

        inputs = jax.tree.map(depend, inputs)
        _, vjp = jax.vjp(lambda v, *a: proto.apply(v, *a, **static), {"params": params}, *inputs)
        return vjp(cotangent)

    return nn.custom_vjp(call, forward_fn=forward, backward_fn=backward)(module, *args)


def call_with(remat: bool):
    """How the model calls a block: `remat_call`, or directly (same signature)."""
    return remat_call if remat else lambda module, *args, **static: module(*args, **static)


def xavier_dense(features: int, name: str | None = None, **kw) -> nn.Dense:
    """Dense with xavier_uniform weights and zero bias (section 11.17)."""
    return nn.Dense(
        features,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.zeros,
        name=name,
        **kw,
    )


def bottleneck_grid(crop, levels: int) -> tuple[int, ...]:
    """Spatial size of the deepest level for a crop (axes of size 1 stay 1)."""
    f = 2 ** (levels - 1)
    return tuple(1 if c == 1 else c // f for c in crop)


def check_crop(crop, levels: int) -> None:
    """Crops divisible by 2^(levels-1) with a bottleneck of at least 2 (section 11.1)."""
    f = 2 ** (levels - 1)
    for c in crop:
        if c != 1 and (c % f or c // f < 2):
            raise ValueError(
                f"crop {tuple(crop)}: every axis must be a multiple of {f} with a bottleneck of at "
                f"least 2 (at least {2 * f})"
            )
