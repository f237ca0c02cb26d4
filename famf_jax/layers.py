"""Building blocks of FAMF-Net with PyTorch's defaults (spec section 2.1).

Channels-last throughout: images and feature maps are (B, H, W, C). The compute dtype is the
input's (bfloat16 with `model.bfloat16`): convolutions cast their float32 parameters to it.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from common.conv import conv

# PyTorch BatchNorm2d(momentum=0.1) keeps running = 0.9 * running + 0.1 * batch (spec B25).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def torch_uniform_init(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for conv/linear weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class TorchConv(nn.Module):
    """Conv2d with bias, stride 1, 'same' zero padding for odd kernels, PyTorch initialisation.

    kernel is (kh, kw, in, out), the transpose of PyTorch's (out, in, kh, kw). Computed by
    `common.conv.conv`: as 1-D convolutions over row-shifted views on CPU (faster than XLA's
    native 2-D convolution there), natively elsewhere; same parameters either way.
    """

    features: int
    kernel_size: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        fan_in = x.shape[-1] * k * k
        init = torch_uniform_init(fan_in)
        kernel = self.param("kernel", init, (k, k, x.shape[-1], self.features))
        bias = self.param("bias", init, (self.features,))
        y = conv(x, kernel.astype(x.dtype), padding="zero")
        return y + bias.astype(x.dtype)


def batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        name=name,
    )


class ConvBN(nn.Module):
    """Conv -> BatchNorm -> ReLU; PyTorch's Sequential(conv, bn, relu) as `conv`/`bn`."""

    features: int
    kernel_size: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = TorchConv(self.features, self.kernel_size, name="conv")(x)
        # Statistics and normalisation in float32 whatever the compute dtype (flax promotes a
        # bfloat16 input against its float32 statistics); the next layer gets x's dtype again.
        y = batch_norm(train, name="bn")(y)
        return nn.relu(y).astype(x.dtype)


class Fire(nn.Module):
    """SqueezeNet fire module: squeeze 1x1, then concat(expand 1x1, expand 3x3)."""

    out_features: int
    squeeze_features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        s = ConvBN(self.squeeze_features, 1, name="squeeze")(x, train)
        e1 = ConvBN(self.out_features // 2, 1, name="expand_1x1")(s, train)
        e3 = ConvBN(self.out_features // 2, 3, name="expand_3x3")(s, train)
        return jnp.concatenate([e1, e3], axis=-1)


def max_pool2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (2, 2), strides=(2, 2))


def avg_pool2(x: jax.Array) -> jax.Array:
    """Bilinear 2x down-sampling without antialiasing equals a 2x2 average (spec B24)."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))
