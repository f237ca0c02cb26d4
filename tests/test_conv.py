"""common/conv.py: decomposed == native (values and gradients), 'same' reflect/zero padding and
stride as PyTorch's Conv computes them, PyTorch's init, bfloat16 compute."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from common.conv import Conv, conv

SHAPES = {
    "3d_even": (2, 12, 10, 8, 3),
    "3d_odd": (2, 11, 9, 7, 3),
    "2d_even": (2, 16, 12, 3),
    "2d_odd": (2, 15, 13, 3),
}
COUT = 4


def _inputs(shape, ksize, seed=0):
    rank = len(shape) - 2
    kx, kk = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, shape, jnp.float32)
    kernel = jax.random.normal(kk, (ksize,) * rank + (shape[-1], COUT), jnp.float32)
    return x, kernel


def _ref_conv(x, kernel, stride, padding):
    """Direct float64 numpy 'same' convolution: PyTorch's Conv with padding K//2."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    rank = x.ndim - 2
    ksize = kernel.shape[:rank]
    pads = [(0, 0)] + [(k // 2, k // 2) for k in ksize] + [(0, 0)]
    xp = np.pad(x, pads, mode="reflect" if padding == "reflect" else "constant")
    out_sizes = [-(-n // stride) for n in x.shape[1:-1]]
    out = 0.0
    for tap in np.ndindex(*ksize):
        idx = tuple(slice(t, t + stride * (n - 1) + 1, stride) for t, n in zip(tap, out_sizes))
        out = out + xp[(slice(None),) + idx] @ kernel[tap]
    return out


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("padding", ["reflect", "zero"])
@pytest.mark.parametrize("ksize", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", list(SHAPES))
def test_decomposed_equals_native_values_and_grads(name, stride, ksize, padding):
    x, kernel = _inputs(SHAPES[name], ksize)
    f = {
        impl: (lambda x, k, impl=impl: conv(x, k, stride=stride, padding=padding, impl=impl))
        for impl in ("native", "decomposed")
    }
    y_nat, y_dec = f["native"](x, kernel), f["decomposed"](x, kernel)
    assert y_dec.shape == y_nat.shape
    assert _rel_err(y_dec, y_nat) < 1e-5

    # Gradients of a random projection, so every output element carries its own weight.
    proj = jax.random.normal(jax.random.key(7), y_nat.shape)
    grads = {
        impl: jax.grad(lambda x, k, g=g: jnp.sum(g(x, k) * proj), argnums=(0, 1))(x, kernel)
        for impl, g in f.items()
    }
    for g_dec, g_nat in zip(grads["decomposed"], grads["native"]):
        assert _rel_err(g_dec, g_nat) < 1e-5


@pytest.mark.parametrize("impl", ["native", "decomposed"])
@pytest.mark.parametrize("padding", ["reflect", "zero"])
@pytest.mark.parametrize("ksize", [1, 3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", ["3d_odd", "2d_even", "2d_odd"])
def test_matches_direct_numpy_convolution(name, stride, ksize, padding, impl):
    x, kernel = _inputs(SHAPES[name], ksize, seed=1)
    y = conv(x, kernel, stride=stride, padding=padding, impl=impl)
    ref = _ref_conv(x, kernel, stride, padding)
    assert y.shape == ref.shape  # ceil(S / stride) per spatial axis
    assert _rel_err(y, ref) < 1e-5


def test_numpy_reflect_is_pytorch_reflect():
    # PyTorch's padding_mode='reflect' mirrors without repeating the edge: [1, 0, 1, 2, 3, 2].
    assert np.pad(np.arange(4), 1, mode="reflect").tolist() == [1, 0, 1, 2, 3, 2]


@pytest.mark.parametrize("impl", ["native", "decomposed"])
@pytest.mark.parametrize("rank", [2, 3])
def test_reflect_padding_seen_through_corner_tap(rank, impl):
    # A kernel that only reads the (-1, -1[, -1]) neighbour returns the padded input shifted by
    # one: at the borders those are the reflected values np.pad(mode="reflect") gives.
    shape = (1,) + (5, 4, 3)[:rank] + (1,)
    x = jnp.arange(math.prod(shape), dtype=jnp.float32).reshape(shape)
    kernel = jnp.zeros((3,) * rank + (1, 1)).at[(0,) * rank].set(1.0)
    y = conv(x, kernel, padding="reflect", impl=impl)
    xp = np.pad(np.asarray(x)[0, ..., 0], 1, mode="reflect")
    np.testing.assert_array_equal(np.asarray(y)[0, ..., 0], xp[(slice(None, -2),) * rank])


def test_auto_is_decomposed_on_cpu():
    assert jax.default_backend() == "cpu"
    x, kernel = _inputs(SHAPES["3d_even"], 3)
    jaxpr = jax.make_jaxpr(lambda x, k: conv(x, k, impl="auto"))(x, kernel)
    convs = [e for e in jaxpr.jaxpr.eqns if e.primitive is lax.conv_general_dilated_p]
    assert convs and all(e.invars[0].aval.ndim == 4 for e in convs)  # 2-D convolutions


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"padding": "circular"}, "padding"),
        ({"impl": "cudnn"}, "impl"),
    ],
)
def test_rejects_bad_arguments(kwargs, msg):
    x, kernel = _inputs(SHAPES["2d_even"], 3)
    with pytest.raises(ValueError, match=msg):
        conv(x, kernel, **kwargs)


def test_rejects_even_kernel():
    x, _ = _inputs(SHAPES["2d_even"], 3)
    with pytest.raises(ValueError, match="odd"):
        conv(x, jnp.zeros((2, 2, 3, COUT)))


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("ksize, stride", [(3, 1), (1, 1), (3, 2)])
@pytest.mark.parametrize("name", ["3d_odd", "2d_even"])
def test_module_params_and_output(name, ksize, stride, use_bias):
    shape = SHAPES[name]
    rank = len(shape) - 2
    x, _ = _inputs(shape, ksize)
    layer = Conv(features=5, kernel_size=ksize, stride=stride, use_bias=use_bias)
    variables = layer.init(jax.random.key(0), x)
    params = variables["params"]
    assert params["kernel"].shape == (ksize,) * rank + (shape[-1], 5)
    assert params["kernel"].dtype == jnp.float32
    assert ("bias" in params) == use_bias
    y = layer.apply(variables, x)
    expected = _ref_conv(x, params["kernel"], stride, "reflect")
    if use_bias:
        assert params["bias"].shape == (5,)
        expected = expected + np.asarray(params["bias"])
    assert y.shape == tuple([2] + [-(-n // stride) for n in shape[1:-1]] + [5])
    assert _rel_err(y, expected) < 1e-5


def test_kernel_init_is_kaiming_normal_fan_in():
    # PyTorch's kaiming_normal_(a=0, mode='fan_in'): N(0, 2 / fan_in), not truncated.
    cin, cout = 16, 512
    layer = Conv(features=cout, kernel_size=3)
    params = layer.init(jax.random.key(1), jnp.zeros((1, 4, 4, 4, cin)))["params"]
    w = np.asarray(params["kernel"]).ravel()  # 3*3*3*16*512 = 221k samples
    std = math.sqrt(2.0 / (cin * 27))
    n = w.size
    assert abs(w.mean()) < 4 * std / math.sqrt(n)
    assert abs(w.std() / std - 1) < 4 / math.sqrt(2 * n)
    # A normal puts 4.55% of its mass beyond 2 std; a truncated normal puts none.
    tail = np.mean(np.abs(w) > 2 * std)
    assert abs(tail - 0.0455) < 4 * math.sqrt(0.0455 * 0.9545 / n)


@pytest.mark.parametrize("rank, cin", [(2, 6), (3, 8)])
def test_bias_init_is_pytorch_uniform(rank, cin):
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = Cin * prod(K).
    cout = 4096
    layer = Conv(features=cout, kernel_size=3)
    x = jnp.zeros((1,) + (4,) * rank + (cin,))
    b = np.asarray(layer.init(jax.random.key(2), x)["params"]["bias"])
    bound = 1.0 / math.sqrt(cin * 3**rank)
    assert b.min() >= -bound and b.max() <= bound
    # Spans the whole interval (a bound from fan_in = Cin alone would overshoot both ends).
    assert b.min() < -0.99 * bound and b.max() > 0.99 * bound
    assert abs(b.std() / (bound / math.sqrt(3)) - 1) < 4 / math.sqrt(2 * cout)


@pytest.mark.parametrize("impl", ["native", "decomposed"])
@pytest.mark.parametrize("name", ["3d_even", "2d_odd"])
def test_bfloat16_compute_close_to_float32(name, impl):
    x, _ = _inputs(SHAPES[name], 3)
    f32 = Conv(features=8, impl=impl)
    bf16 = Conv(features=8, impl=impl, dtype=jnp.bfloat16)
    variables = f32.init(jax.random.key(3), x)
    assert jax.tree.map(lambda a: a.dtype, bf16.init(jax.random.key(3), x)) == jax.tree.map(
        lambda a: a.dtype, variables
    )  # params stay float32
    y32 = f32.apply(variables, x)
    y16 = bf16.apply(variables, x)
    assert y16.dtype == jnp.bfloat16
    err = _rel_err(y16.astype(jnp.float32), y32)
    assert 0 < err < 3e-2  # bfloat16 keeps 8 bits of mantissa: visibly rounded, still close
