"""RAA against plain numpy/scipy implementations written from the spec (section 2.5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal

from conftest import REPO
from famf_jax import raa
from parity.raa_reference import bmode_centre as reference_bmode_centre
from parity.raa_reference import swe_centre as reference_swe_centre


def blob_cams(rng, n, size):
    yy, xx = np.mgrid[:size, :size]
    cams = []
    for _ in range(n):
        f = np.zeros((size, size))
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, size, 2)
            sigma = rng.uniform(0.5, 6)
            f += rng.uniform(0.3, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        f += 0.02 * rng.random((size, size))
        cams.append((f - f.min()) / (f.max() - f.min()))
    return np.stack(cams).astype(np.float32)


@pytest.mark.parametrize("kind", ["random", "blob"])
@pytest.mark.parametrize("faithful", [True, False])
def test_bmode_centre_matches_scipy(rng, kind, faithful):
    size = 32
    if kind == "random":
        # Coarse random maps upsampled x4, as the real CAMs are, so components are non-trivial.
        cams = np.asarray(raa.upsample_cam(jnp.asarray(rng.random((12, 8, 8)), jnp.float32), size))
    else:
        cams = blob_cams(rng, 12, size)
    if faithful:
        rule = lambda g: g < 0.2
    else:
        rule = lambda g: g < 0.2 * g.max()
    got = np.asarray(jax.jit(jax.vmap(lambda c: raa.bmode_centre(c, faithful)))(cams))
    # float32 maps, as the original hands its torch CAMs to numpy
    want = np.array([reference_bmode_centre(c, rule) for c in cams])
    np.testing.assert_array_equal(got, want)


def test_faithful_gradient_magnitude_is_numpys_bit_for_bit(rng):
    """np.hypot(np.gradient(f, axis=0), np.gradient(f, axis=1)) of a float32 map, exactly:
    the original thresholds it at 0.2, and jnp.hypot rounds a third of the values the other
    way (checked below, so the comparison can fail)."""
    cams = np.asarray(raa.upsample_cam(jnp.asarray(rng.random((6, 8, 8)), jnp.float32), 32))
    want = np.stack([np.hypot(np.gradient(c, axis=0), np.gradient(c, axis=1)) for c in cams])
    assert want.dtype == np.float32
    magnitude = jax.jit(jax.vmap(raa.gradient_magnitude, in_axes=(0, None)), static_argnums=1)
    np.testing.assert_array_equal(np.asarray(magnitude(cams, True)), want)
    assert (np.asarray(magnitude(cams, False)) != want).mean() > 0.05


def test_faithful_upsampling_is_pytorchs_bit_for_bit():
    """PyTorch's CPU F.interpolate(bilinear, align_corners=False) by 4, recorded with torch
    (parity/record_bilinear.py): outputs of side 16 and 64 (its vectorised kernel) and 68 and
    128 (its generic one, the original's 32 -> 128), every pixel equal. jax.image.resize,
    the corrected mode's, differs by an ulp at many pixels of each (the test can fail)."""
    from parity.record_bilinear import inputs

    recorded = np.load(REPO / "tests/data/torch_bilinear_x4.npz")
    for h, x in inputs().items():
        want = recorded[f"out{h}"]
        up = jax.jit(raa.upsample_cam, static_argnums=(1, 2))
        np.testing.assert_array_equal(np.asarray(up(x, 4 * h, True)), want, err_msg=f"side {h}")
        assert (np.asarray(up(x, 4 * h, False)) != want).mean() > 0.05, h


def test_bmode_centre_local_component_and_fallback():
    f = np.zeros((16, 16), np.float32)
    f[3:6, 9:13] = 1.0  # plateau: low-gradient component inside, steep border
    got = raa.bmode_centre(jnp.asarray(f), faithful=False)
    want = reference_bmode_centre(f, lambda g: g < 0.2 * g.max())
    np.testing.assert_array_equal(np.asarray(got), want)
    # A single spike: its own pixel is not low-gradient for the absolute threshold -> argmax.
    g = np.zeros((16, 16), np.float32)
    g[7, 2] = 1.0
    np.testing.assert_array_equal(np.asarray(raa.bmode_centre(jnp.asarray(g), True)), [7, 2])


def test_all_zero_cam_b20():
    z = jnp.zeros((128, 128))
    np.testing.assert_array_equal(np.asarray(raa.bmode_centre(z, faithful=True)), [0, 0])
    np.testing.assert_array_equal(np.asarray(raa.bmode_centre(z, faithful=False)), [64, 64])
    np.testing.assert_array_equal(np.asarray(raa.swe_centre(z)), [16, 16])


def test_swe_centre_matches_scipy(rng):
    cams = np.concatenate([blob_cams(rng, 8, 32), rng.random((8, 32, 32)).astype(np.float32)])
    got = np.asarray(jax.vmap(raa.swe_centre)(jnp.asarray(cams)))
    want = np.array([reference_swe_centre(c) for c in cams])  # float64 sums, as scipy's
    np.testing.assert_array_equal(got, want)


def test_region_mask_loop():
    size = 32
    for centre in [(0, 0), (5, 30), (16, 16), (31, 2)]:
        m = np.asarray(raa.region_mask(jnp.asarray(centre), size))
        want = np.zeros((size, size))
        h = size // 8
        want[
            max(0, centre[0] - h) : min(size, centre[0] + h),
            max(0, centre[1] - h) : min(size, centre[1] + h),
        ] = 1
        np.testing.assert_array_equal(m, want)


def test_shift_against_loop(rng):
    x = rng.normal(size=(10, 12, 3)).astype(np.float32)
    for d in [(0, 0), (3, -2), (-9, 11), (10, 0), (-4, -12)]:
        got = np.asarray(raa.shift(jnp.asarray(x), jnp.asarray(d)))
        want = np.zeros_like(x)
        for r in range(10):
            for c in range(12):
                if 0 <= r + d[0] < 10 and 0 <= c + d[1] < 12:
                    want[r, c] = x[r + d[0], c + d[1]]
        np.testing.assert_array_equal(got, want)


def test_alignment_moves_swe_region_onto_bmode_centre():
    size = 32
    cam_b = np.zeros((1, 4, 4), np.float32)
    cam_s = np.zeros((1, 4, 4), np.float32)
    cam_b[0, 0, 3] = 1.0
    cam_s[0, 3, 0] = 1.0
    out = raa.alignment(jnp.asarray(cam_b), jnp.asarray(cam_s), size, faithful=False)
    cb, cs = np.asarray(out["centre_bmode"][0]), np.asarray(out["centre_swe"][0])
    feat = np.asarray(out["mask_swe"][0])[..., None]
    moved = np.asarray(raa.shift(jnp.asarray(feat), out["shift_to_bmode"][0]))[..., 0]
    np.testing.assert_array_equal(moved, np.asarray(raa.region_mask(jnp.asarray(cb), size)))
    assert moved[tuple(cb)] == 1 and tuple(cb) != tuple(cs)
    swapped = raa.alignment(jnp.asarray(cam_b), jnp.asarray(cam_s), size, faithful=True)
    d = np.asarray(swapped["centre_swe"][0] - swapped["centre_bmode"][0])
    np.testing.assert_array_equal(np.asarray(swapped["shift_to_bmode"][0]), d[::-1])
    np.testing.assert_array_equal(np.asarray(swapped["shift_to_swe"][0]), -d[::-1])


def _near_tie(rng, size=128, gap=None):
    """A smooth CAM (as the paper's lesions) whose two best windows (float64) differ by `gap`
    (default: below float32's resolution at their magnitude)."""
    w = size // 4
    f = blob_cams(rng, 1, size)[0].astype(np.float64)
    f = np.clip(f + 0.3, 0, 1).astype(np.float32)  # large window sums (hundreds)
    sums = signal.convolve2d(f.astype(np.float64), np.ones((w, w)), "valid")
    order = np.argsort(sums, axis=None)[::-1]
    first = np.unravel_index(order[0], sums.shape)
    # a second window whose sum is near and that does not overlap the first
    for idx in order[1:]:
        second = np.unravel_index(idx, sums.shape)
        if max(abs(second[0] - first[0]), abs(second[1] - first[1])) >= w:
            break
    target = sums[first] - (gap if gap is not None else rng.uniform(1e-6, 6e-5))
    r, c = second[0] + w // 2, second[1] + w // 2  # one pixel of the second window only
    f[r, c] = np.float32(f[r, c] + (target - sums[second]))
    return f


def test_swe_centre_decides_near_ties_as_float64(rng):
    cams = np.stack([_near_tie(rng) for _ in range(40)])
    got = np.asarray(jax.jit(jax.vmap(raa.swe_centre))(jnp.asarray(cams)))
    want = np.array([reference_swe_centre(c.astype(np.float64)) for c in cams])
    np.testing.assert_array_equal(got, want)
    # Plain float32 window sums get some of these wrong: the test can fail.
    w = 32
    plain = [
        np.unravel_index(int(jnp.argmax(raa._window_sums(jnp.asarray(c), w))), (128 - w + 1,) * 2)
        for c in cams
    ]
    plain = np.array(plain) + w // 2
    assert (plain != want).any(axis=1).sum() >= 1


def test_faithful_fma_rounds_once():
    """raa._fma against exact rational arithmetic, ties to even: products on a float32
    midpoint with a tiny addend (where a float64 sum rounded again to float32 goes the wrong
    way) and random weights k/8, as the upsampling uses them (normal float32 inputs)."""
    from fractions import Fraction

    rng = np.random.default_rng(3)
    n = 400
    a = np.concatenate([1 + rng.integers(0, 2**22, n) * 2.0**-22, rng.random(n)]).astype(np.float32)
    b = np.concatenate([np.full(n, 3 / 64), rng.integers(0, 9, n) / 8]).astype(np.float32)
    c = np.concatenate([10.0 ** rng.integers(-30, -8, n) * rng.choice([-1, 1], n), rng.random(n)])
    c = c.astype(np.float32)
    got = np.asarray(jax.jit(raa._fma)(a, b, c))

    def nearest(x, y, z):
        exact = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))
        mid = np.float32(float(exact))
        near = [np.nextafter(mid, np.float32(-np.inf)), mid, np.nextafter(mid, np.float32(np.inf))]
        gap = [abs(Fraction(float(q)) - exact) for q in near]
        best = [q for q, g in zip(near, gap) if g == min(gap)]
        return min(best, key=lambda q: int(q.view(np.int32)) & 1)  # a tie: the even one

    want = np.array([nearest(x, y, z) for x, y, z in zip(a, b, c)])
    np.testing.assert_array_equal(got, want)
    twice = (a.astype(np.float64) * b + c.astype(np.float64)).astype(np.float32)
    assert (twice != want).sum() > 10  # rounding twice is wrong here: the test can fail
