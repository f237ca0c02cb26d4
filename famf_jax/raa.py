"""Region Awareness Alignment: lesion centres from CAMs, region masks and integer shifts.

Pure jnp with static shapes, vmapped over the batch, so it runs inside the jitted forward
(the original does this on the host with numpy/scipy, spec section 2.5 and B1).

All sizes derive from the side S of the MAF grid (S = H/2 for H x H inputs):
SWE window S/4, mask half-size S/8. Centres are (row, col) int32 on the S x S grid.

Deviations from the original unless `faithful` (spec section 6):
- B3: shifts use the right axes (rows by the row difference); faithful swaps them.
- B4: the B-mode low-gradient threshold is relative, `gmag < 0.2 * max(gmag)` (a flat map is
  one whole-map component); faithful uses the absolute `gmag < 0.2`, which in practice makes the
  component the whole map and the centre (S/2, S/2).
- B20: a constant CAM (all zero after normalisation) is NaN in the original, which puts the
  B-mode centre at (0, 0); faithful reproduces that, corrected mode treats the map as flat.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

GRADIENT_THRESHOLD = 0.2
PROPAGATION_STEPS_PER_ITERATION = 8


def upsample_cam(cam: jax.Array, size: int, faithful: bool = False) -> jax.Array:
    """Bilinear (align_corners=False) upsampling, (B, h, h) -> (B, size, size); `faithful`:
    bit for bit PyTorch's CPU `F.interpolate` for an integer factor (see `_torch_bilinear`)."""
    if faithful:
        return _torch_bilinear(cam, size)
    return jax.image.resize(cam, (cam.shape[0], size, size), method="bilinear")


def _source_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's (i0, i1, lambda1) per output index, align_corners=False, in float32."""
    f32 = np.float32
    src = (np.arange(n_out, dtype=f32) + f32(0.5)) * f32(n_in / n_out) - f32(0.5)
    src = np.maximum(src, f32(0))
    i0 = np.floor(src).astype(np.int32)
    return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(f32)


def _fma(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """float32 a * b + c rounded once, as the FMA instructions PyTorch's kernels compile to.

    In float64: the product of two float32 values is exact; the sum is rounded to odd (an
    inexact sum moved to its neighbour with an odd last bit, towards the exact value, by
    TwoSum's error term), and a float64 rounded to odd rounds to float32 as the exact value
    would (53 >= 24 + 2 bits); subnormal inputs (below 1.2e-38) are flushed to zero by
    XLA's CPU, which PyTorch keeps. The float32 result passes an optimisation barrier so that
    XLA cannot fold the conversions of a chain of these into one (GPU's excess precision)."""
    with jax.enable_x64(True):
        f64 = jnp.float64
        p, c = a.astype(f64) * b.astype(f64), c.astype(f64)
        s = p + c
        t = s - p
        err = (p - (s - t)) + (c - t)
        even = (jax.lax.bitcast_convert_type(s, jnp.int64) & 1) == 0
        towards = jnp.where(err > 0, jnp.inf, -jnp.inf)
        s = jnp.where((err != 0) & even, jnp.nextafter(s, towards), s)
        return jax.lax.optimization_barrier(s.astype(jnp.float32))


def _torch_bilinear(cam: jax.Array, size: int) -> jax.Array:
    """PyTorch's CPU bilinear upsampling (align_corners=False) of (B, h, h) to (B, size, size),
    bit for bit for an integer factor (weights exact in float32; measured against torch 2.14
    at factor 4 for sizes 16 to 256, batch 1 to 4, 1 and 2 threads, and against torch 2.2.2,
    the spec's, at 16, 32, 64, 68 and 128, batch 2 and 4). Which kernel PyTorch
    runs, and so the rounding, depends on the output: up to height + width = 128 its
    vectorised kernel sums the four corners with products of the two weights, first the
    upper right, then FMAs of the upper left, lower left, lower right; beyond, the generic
    kernel interpolates along the width inside, then along the height, each as
    fma(first, w0, second * w1). jax.image.resize differs from both by an ulp at about a
    third of the pixels, enough to move a near-tied SWE window or a B-mode gradient at 0.2."""
    h = cam.shape[-1]
    if cam.shape[-2] != h or size % h:
        raise ValueError(f"faithful upsampling takes square maps by an integer factor: {h}")
    r0, r1, l1 = _source_weights(h, size)
    l0 = np.float32(1) - l1
    x = cam.astype(jnp.float32)
    top, bottom = x[:, r0], x[:, r1]
    a, b, c, d = top[:, :, r0], top[:, :, r1], bottom[:, :, r0], bottom[:, :, r1]
    h0, h1 = jnp.asarray(l0)[None, :, None], jnp.asarray(l1)[None, :, None]
    w0, w1 = jnp.asarray(l0)[None, None, :], jnp.asarray(l1)[None, None, :]
    if 2 * size <= 128:
        out = _fma(a, h0 * w0, b * (h0 * w1))
        return _fma(d, h1 * w1, _fma(c, h1 * w0, out))
    return _fma(_fma(a, w0, b * w1), h0, _fma(c, w0, d * w1) * h1)


def np_gradient(f: jax.Array, axis: int) -> jax.Array:
    """numpy.gradient along one axis: central inside, one-sided at the two borders."""
    f = jnp.moveaxis(f, axis, 0)
    g = jnp.concatenate([f[1:2] - f[:1], (f[2:] - f[:-2]) / 2, f[-1:] - f[-2:-1]], axis=0)
    return jnp.moveaxis(g, 0, axis)


def gradient_magnitude(f: jax.Array, faithful: bool) -> jax.Array:
    """|grad f| of a float32 map (S, S), as numpy.gradient; `faithful`: `np.hypot` bit for bit
    (C's hypotf: the square root in float64, rounded once; jnp.hypot differs by an ulp at
    about a third of the values, which decides pixels at the 0.2 threshold)."""
    gx, gy = np_gradient(f, 0), np_gradient(f, 1)
    if not faithful:
        return jnp.hypot(gx, gy)
    with jax.enable_x64(True):
        gx, gy = gx.astype(jnp.float64), gy.astype(jnp.float64)
        return jnp.sqrt(gx * gx + gy * gy).astype(jnp.float32)


def _grow(comp: jax.Array, mask: jax.Array) -> jax.Array:
    """One 4-connected dilation step of `comp`, restricted to `mask`. (S, S) bool."""
    grown = comp
    grown = grown.at[1:, :].set(grown[1:, :] | comp[:-1, :])
    grown = grown.at[:-1, :].set(grown[:-1, :] | comp[1:, :])
    grown = grown.at[:, 1:].set(grown[:, 1:] | comp[:, :-1])
    grown = grown.at[:, :-1].set(grown[:, :-1] | comp[:, 1:])
    return grown & mask


def connected_component(mask: jax.Array, seed: jax.Array) -> jax.Array:
    """4-connected component of `mask` (S, S) holding the one-hot `seed`, by propagation."""

    def body(state):
        comp, _ = state
        new = comp
        for _ in range(PROPAGATION_STEPS_PER_ITERATION):
            new = _grow(new, mask)
        return new, jnp.any(new != comp)

    comp, _ = jax.lax.while_loop(lambda s: s[1], body, (seed & mask, jnp.array(True)))
    return comp


def _bbox_centre(comp: jax.Array) -> jax.Array:
    """Centre ((r0 + r1) // 2, (c0 + c1) // 2) of the bounding box, stop indices exclusive."""

    def centre(any_along: jax.Array) -> jax.Array:
        n = any_along.shape[0]
        start = jnp.argmax(any_along)
        stop = n - jnp.argmax(any_along[::-1])
        return (start + stop) // 2

    return jnp.stack([centre(comp.any(axis=1)), centre(comp.any(axis=0))]).astype(jnp.int32)


def bmode_centre(cam: jax.Array, faithful: bool) -> jax.Array:
    """B-mode lesion centre of one upsampled CAM (S, S) in [0, 1] -> (2,) int32 (row, col).

    Argmax, then the bounding-box centre of its low-gradient 4-connected component; the argmax
    itself when the argmax pixel is not low-gradient.
    """
    s = cam.shape[0]
    peak = jnp.argmax(cam.reshape(-1))
    xm, ym = peak // s, peak % s
    gmag = gradient_magnitude(cam, faithful)
    if faithful:
        mask = gmag < GRADIENT_THRESHOLD
    else:
        gmax = gmag.max()
        mask = jnp.where(gmax > 0, gmag < GRADIENT_THRESHOLD * gmax, True)
    seed = jnp.zeros_like(mask).at[xm, ym].set(True)
    comp = connected_component(mask, seed)
    centre = jnp.where(mask[xm, ym], _bbox_centre(comp), jnp.stack([xm, ym]).astype(jnp.int32))
    if faithful:
        # The original's 0/0 CAM is all-NaN: argmax 0, `NaN < 0.2` False, centre (0, 0) (B20).
        centre = jnp.where(cam.max() > 0, centre, jnp.zeros(2, jnp.int32))
    return centre


def _window_sums(x: jax.Array, w: int) -> jax.Array:
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (w, w), (1, 1), "VALID")


def exact_window_argmax(cam: jax.Array, w: int) -> jax.Array:
    """Flat index of the w x w window with the largest sum of a float32 map in [0, 1] (a
    normalised CAM), as a float64 sum would choose it (the original's
    `scipy.signal.convolve2d`), in float32.

    Near-tied sums (875.91896558 vs 875.91885728, closer than float32's resolution there)
    decide the SWE centre. Each value splits exactly into three parts on fixed grids: `hi`
    (multiples of 2^-b), `mid` (multiples of 2^-2b) and `lo` (< 2^-2b), b chosen so that a
    window's sums of `hi` and of `mid` are exact in float32 whatever the order; only the tiny
    `lo` sums round (below 1e-7 in the worst case, ~1e-12 typically). After carrying each
    part's excess into the next coarser one the triples compare lexicographically; ties go to
    the first window, as numpy's argmax."""
    b = 24 - math.ceil(math.log2(w * w))  # w^2 values of < 2^b units each: sums < 2^24 units
    u1, u2 = jnp.float32(2.0**b), jnp.float32(2.0 ** (2 * b))
    x = cam.astype(jnp.float32)
    hi = jnp.floor(x * u1) / u1
    mid = jnp.floor((x - hi) * u2) / u2
    lo = x - hi - mid
    h, m, low = (_window_sums(p, w).reshape(-1) for p in (hi, mid, lo))
    carry = jnp.floor(low * u2)  # lo's whole units of 2^-2b into mid, then mid's into hi
    m, low = m + carry / u2, low - carry / u2
    carry = jnp.floor(m * u1)
    h, m = h + carry / u1, m - carry / u1
    best = h == h.max()
    best &= m == jnp.where(best, m, -jnp.inf).max()
    best &= low == jnp.where(best, low, -jnp.inf).max()
    return jnp.argmax(best)


def swe_centre(cam: jax.Array) -> jax.Array:
    """SWE lesion centre: the S/4 x S/4 window with the largest CAM sum -> (2,) int32."""
    s = cam.shape[0]
    w = s // 4
    n = s - w + 1
    best = exact_window_argmax(cam, w)
    return jnp.stack([best // n + w // 2, best % n + w // 2]).astype(jnp.int32)


def region_mask(centre: jax.Array, size: int) -> jax.Array:
    """(size, size) float mask of the S/4-wide square around `centre`, clipped at the border."""
    half = size // 8
    idx = jnp.arange(size)
    rows = (idx >= jnp.maximum(0, centre[0] - half)) & (idx < jnp.minimum(size, centre[0] + half))
    cols = (idx >= jnp.maximum(0, centre[1] - half)) & (idx < jnp.minimum(size, centre[1] + half))
    return (rows[:, None] & cols[None, :]).astype(jnp.float32)


def shift(x: jax.Array, d: jax.Array) -> jax.Array:
    """out[r, c] = x[r + d[0], c + d[1]], zero outside. x: (S, S, C), d: (2,) int."""
    s0, s1 = x.shape[0], x.shape[1]
    rows = jnp.arange(s0) + d[0]
    cols = jnp.arange(s1) + d[1]
    out = jnp.take(x, jnp.clip(rows, 0, s0 - 1), axis=0)
    out = jnp.take(out, jnp.clip(cols, 0, s1 - 1), axis=1)
    valid = ((rows >= 0) & (rows < s0))[:, None] & ((cols >= 0) & (cols < s1))[None, :]
    return out * valid[:, :, None].astype(x.dtype)


def alignment(cam_bmode: jax.Array, cam_swe: jax.Array, size: int, faithful: bool) -> dict:
    """RAA for a batch of CAMs (B, h, w): centres, region masks and the two shifts.

    Returns centre_bmode, centre_swe (B, 2) int32; mask_bmode, mask_swe (B, S, S) float32;
    shift_to_bmode (moves the SWE region onto the B-mode centre) and shift_to_swe, (B, 2) int32.
    """
    cam_b = upsample_cam(cam_bmode, size, faithful)
    cam_s = upsample_cam(cam_swe, size, faithful)
    c_b = jax.vmap(lambda c: bmode_centre(c, faithful))(cam_b)
    c_s = jax.vmap(swe_centre)(cam_s)
    to_bmode = c_s - c_b  # out[c_b] = in[c_b + (c_s - c_b)] = in[c_s]
    if faithful:
        to_bmode = to_bmode[:, ::-1]  # B3: row difference applied to columns and vice versa
    mask = jax.vmap(lambda c: region_mask(c, size))
    return dict(
        centre_bmode=c_b,
        centre_swe=c_s,
        mask_bmode=mask(c_b),
        mask_swe=mask(c_s),
        shift_to_bmode=to_bmode,
        shift_to_swe=-to_bmode,
    )
