"""Convolution layer with a CPU-friendly decomposed form and XLA's native form elsewhere.

XLA's native 3-D convolution on CPU is several times slower than the same convolution written as
a sum of 2-D convolutions over depth-shifted views (issue 7 item 6); on GPU/TPU the native form is
the fast one. `conv` picks by backend, and both forms take the same kernel, so parameters and
checkpoints do not depend on where a model runs. Measured here (fwd+bwd, 2 shared cores): 2.4x
for 3x3x3 at 48^3x16 and 80^3x8, over 20x for stride 2 (XLA's native strided 3-D backward is
especially slow on CPU), 1.1-1.7x for 3x3 2-D at 128^2x64 and 256^2x32 batch 4 (noisy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_DIMS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


def _pad_same(x: jax.Array, ksize: Sequence[int], padding: str) -> jax.Array:
    """Pads every spatial axis of `(B, *S, C)` by K//2 on both sides, once for all taps."""
    pads = [(0, 0)] + [(k // 2, k // 2) for k in ksize] + [(0, 0)]
    if all(p == (0, 0) for p in pads):
        return x
    if padding == "reflect":
        # numpy's "reflect" (edge not repeated) is PyTorch's padding_mode='reflect'.
        return jnp.pad(x, pads, mode="reflect")
    if padding == "zero":
        return jnp.pad(x, pads)
    raise ValueError(f"padding must be 'reflect' or 'zero', got {padding!r}")


def _native(xp: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    rank = kernel.ndim - 2
    return lax.conv_general_dilated(
        xp, kernel, (stride,) * rank, "VALID", dimension_numbers=_DIMS[rank]
    )


def _pointwise(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """1x1(x1) kernel: a strided subsample and a matmul over channels."""
    rank = kernel.ndim - 2
    if stride > 1:
        x = x[(slice(None),) + (slice(None, None, stride),) * rank]
    return jnp.einsum("...i,io->...o", x, kernel.reshape(kernel.shape[-2:]))


def auto_impl() -> str:
    """The form `impl="auto"` takes: decomposed on CPU, native elsewhere (benchmarks replace it
    to time the other form in the same run)."""
    return "decomposed" if jax.default_backend() == "cpu" else "native"


def conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    stride: int = 1,
    padding: str = "reflect",
    impl: str = "auto",
) -> jax.Array:
    """'Same' convolution, channels-last, with stride on every spatial axis.

    Args:
      x: `(B, *S, Cin)` with `len(S)` in {2, 3}.
      kernel: `(*K, Cin, Cout)`, odd K.
      stride: stride on every spatial axis; output size `ceil(S / stride)` as PyTorch's Conv
        with padding K//2 gives.
      padding: "reflect" (PyTorch padding_mode='reflect') or "zero", K//2 per axis.
      impl: "native" (lax.conv_general_dilated), "decomposed" (sum of lower-rank convolutions
        over shifted views) or "auto" (decomposed on CPU, native elsewhere).

    Returns:
      `(B, *ceil(S / stride), Cout)`.
    """
    rank = x.ndim - 2
    if rank not in (2, 3) or kernel.ndim != rank + 2:
        raise ValueError(f"x {x.shape} and kernel {kernel.shape}: need rank 2 or 3")
    ksize = kernel.shape[:rank]
    if any(k % 2 == 0 for k in ksize):
        raise ValueError(f"kernel sizes must be odd, got {ksize}")
    if kernel.shape[-2] != x.shape[-1]:
        raise ValueError(f"kernel expects {kernel.shape[-2]} input channels, x has {x.shape[-1]}")
    if impl == "auto":
        impl = auto_impl()
    if impl not in ("native", "decomposed"):
        raise ValueError(f"impl must be 'auto', 'native' or 'decomposed', got {impl!r}")
    if all(k == 1 for k in ksize):
        return _pointwise(x, kernel, stride)
    xp = _pad_same(x, ksize, padding)
    if impl == "native":
        return _native(xp, kernel, stride)
    return _decomposed(xp, kernel, stride)


def _decomposed(xp: jax.Array, kernel: jax.Array, stride: int, stack: bool = True) -> jax.Array:
    """Rank-r convolution of the padded `(B, *Sp, Cin)` as rank-(r-1) ones over first-axis shifts.

    The first spatial axis is the one decomposed: its shifted (and strided) views are contiguous,
    and folding it into the batch axis is a free reshape; decomposing the last axis costs a
    transpose each way and measured no faster. With `stack`, the K views are stacked on the
    channel axis and convolved once with the kernel reshaped to `(*K[1:], K0 * Cin, Cout)`, which
    equals the sum over k0 of per-view convolutions with `kernel[k0]`; fwd+bwd on 2 CPU cores it
    measured 1.1-1.7x native for rank 2 against 0.8-1.5x for the sum, 2.4x for rank 3 against
    2.1-2.3x (benchmarks/conv_cpu.py --sum, same runs). XLA's temporary memory for fwd+bwd is
    about 1.3x native's (the stacked views are kept for the kernel gradient).
    """
    rank = kernel.ndim - 2
    k0 = kernel.shape[0]
    b = xp.shape[0]
    n0 = (xp.shape[1] - k0) // stride + 1
    dims = _DIMS[rank - 1]
    strides = (stride,) * (rank - 1)

    def view(i: int) -> jax.Array:
        # Taps along axis 1 as strided slices of the one padded array: no gather per tap.
        start = [0] * xp.ndim
        limit = list(xp.shape)
        step = [1] * xp.ndim
        start[1], limit[1], step[1] = i, i + stride * (n0 - 1) + 1, stride
        v = lax.slice(xp, start, limit, step)
        return v.reshape((b * n0,) + v.shape[2:])

    if stack:
        v = jnp.concatenate([view(i) for i in range(k0)], axis=-1)
        # Channel order of v is (k0, Cin): move k0 next to Cin in the kernel.
        k = jnp.moveaxis(kernel, 0, -3).reshape(kernel.shape[1:-2] + (-1, kernel.shape[-1]))
        y = lax.conv_general_dilated(v, k, strides, "VALID", dimension_numbers=dims)
    else:
        y = sum(
            lax.conv_general_dilated(view(i), kernel[i], strides, "VALID", dimension_numbers=dims)
            for i in range(k0)
        )
    return y.reshape((b, n0) + y.shape[1:])


def _bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Conv(nn.Module):
    """'Same' convolution layer over `(B, *S, Cin)`, spatial rank from `x.ndim - 2`.

    Params: "kernel" `(*K, Cin, Cout)` with PyTorch's kaiming_normal_ init (std
    sqrt(2 / fan_in)) and "bias" `(Cout,)` with PyTorch's default U(+-1/sqrt(fan_in)),
    fan_in = Cin * prod(K). `dtype` is the compute dtype; params stay `param_dtype`.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: str = "reflect"
    use_bias: bool = True
    impl: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`(B, *S, Cin)` -> `(B, *ceil(S / stride), features)`."""
        rank = x.ndim - 2
        cin = x.shape[-1]
        kshape = (self.kernel_size,) * rank + (cin, self.features)
        fan_in = cin * self.kernel_size**rank
        kernel = self.param(
            "kernel",
            nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
            kshape,
            self.param_dtype,
        )
        bias = (
            self.param("bias", _bias_init(fan_in), (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv(x, kernel, stride=self.stride, padding=self.padding, impl=self.impl)
        if bias is not None:
            y = y + bias
        return y
