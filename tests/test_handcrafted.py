import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from famf_jax import handcrafted


def test_edge_kernel_values():
    gx, gy = handcrafted.gaussian_derivative_kernels()
    np.testing.assert_allclose(gx[2], [0.04308, 0.09653, 0, -0.09653, -0.04308], atol=5e-6)
    np.testing.assert_array_equal(gy, gx.T)


def test_edge_map_matches_scipy_correlation(rng):
    x = rng.uniform(-1, 1, (2, 16, 20, 3)).astype(np.float32)
    gx, gy = handcrafted.gaussian_derivative_kernels()
    summed = x.sum(-1).astype(np.float64)
    want = []
    for img in summed:
        hx = ndimage.correlate(img, gx.astype(np.float64), mode="constant")
        hy = ndimage.correlate(img, gy.astype(np.float64), mode="constant")
        want.append(np.tanh(np.sqrt(hx**2 + hy**2 + 1e-8)))
    want = np.repeat(np.stack(want)[..., None], 3, axis=-1)
    got = np.asarray(handcrafted.edge_map(jnp.asarray(x)))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_colour_moments_direct(rng):
    x = rng.uniform(-1, 1, (1, 9, 11, 3)).astype(np.float32)
    x[0, :, :6] = 0.3  # a flat patch: skew must be exactly 0 there, not cancellation noise
    got = np.asarray(handcrafted.local_colour_moments(jnp.asarray(x)))
    assert got.shape == (1, 9, 11, 9)
    xp = np.pad(x[0].astype(np.float64), ((2, 2), (2, 2), (0, 0)))
    for r in range(9):
        for c in range(11):
            for ch in range(3):
                v = xp[r : r + 5, c : c + 5, ch].ravel()
                m = v.mean()
                var = v.var(ddof=1)
                skew = ((v - m) ** 3).mean() / (np.sqrt(var) ** 3 + 1e-6)
                np.testing.assert_allclose(
                    got[0, r, c, [ch, 3 + ch, 6 + ch]], [m, var, skew], atol=2e-5, rtol=1e-4
                )
    assert np.abs(got[0, 2:7, 2:4, 3:]).max() < 1e-9  # windows inside the flat band
