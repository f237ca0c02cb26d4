"""DMAF-Net losses against float64 numpy formulas written straight from spec 4.4, 10 and 11."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmaf_jax import losses

# ----------------------------------------------------------------------- numpy references


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_wce(p, y):
    k = p.shape[-1]
    out = []
    for pb, yb in zip(p, y):
        pb, yb = pb.reshape(-1, k), yb.reshape(-1, k)
        voxel = np.zeros(len(pb))
        for c in range(k):
            if not yb[:, c].any():
                continue  # y_c = 0 everywhere: no term, whatever w_c is
            w = 1.0 - yb[:, c].sum() / yb.sum()
            voxel += -w * yb[:, c] * np.log(np.clip(pb[:, c], 0.005, 1.0))
        out.append(voxel.mean())
    return np.array(out)


def np_dice(p, y):
    k = p.shape[-1]
    out = []
    for pb, yb in zip(p, y):
        pb, yb = pb.reshape(-1, k), yb.reshape(-1, k)
        d = [
            2 * (pb[:, c] * yb[:, c]).sum() / (pb[:, c].sum() + yb[:, c].sum() + 1e-7)
            for c in range(k)
        ]
        out.append(1.0 - np.mean(d))
    return np.array(out)


def np_seg(p, y):
    return np_wce(p, y) + np_dice(p, y)


def np_seg_pooled(p, y):
    """PASSION's `softmax_weighted_loss` + `dice_loss` (criterions.py): CE with per-sample
    weights averaged over batch and voxels; Dice sums over the whole batch."""
    k = p.shape[-1]
    pf, yf = p.reshape(-1, k), y.reshape(-1, k)
    d = [
        2 * (pf[:, c] * yf[:, c]).sum() / (pf[:, c].sum() + yf[:, c].sum() + 1e-7) for c in range(k)
    ]
    return np_wce(p, y).mean() + 1.0 - np.mean(d)


def np_upsample(x, factor):
    """Align-corners linear interpolation of (B, *S, C), one spatial axis at a time."""
    for axis in range(1, x.ndim - 1):
        n_in = x.shape[axis]
        n_out = n_in * factor
        slices = []
        for i in range(n_out):
            pos = 0.0 if n_in == 1 else i * (n_in - 1) / (n_out - 1)
            lo = int(np.floor(pos))
            hi = min(lo + 1, n_in - 1)
            frac = pos - lo
            slices.append((1 - frac) * np.take(x, lo, axis=axis) + frac * np.take(x, hi, axis=axis))
        x = np.stack(slices, axis=axis)
    return x


def np_ds(aux, y):
    total = np.zeros(len(y))
    for k, z in enumerate(aux, start=1):
        total += 2.0**-k * np_seg(np_upsample(np_softmax(z), 2**k), y)
    return total


def np_corr(x):
    """(N, C) -> (C, C)."""
    n = len(x)
    xc = x - x.mean(0)
    cov = xc.T @ xc / (n - 1)
    d = np.diag(cov) + 1e-5
    return cov / np.sqrt(np.outer(d, d))


def np_cca(student, teacher):
    b, m, _, c = student.shape
    out = np.zeros((b, m))
    for i in range(b):
        rf = np_corr(teacher[i])
        for j in range(m):
            out[i, j] = ((np_corr(student[i, j]) - rf) ** 2).sum() / c**2
    return out


def np_neighbours(grid):
    coords = list(itertools.product(*[range(g) for g in grid]))  # row-major order
    return [
        [j for j, q in enumerate(coords) if max(abs(a - b) for a, b in zip(p, q)) == 1]
        for p in coords
    ]


def np_ln(x):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)


def np_maa(student, teacher, grid, heads=8):
    b, m, n, c = student.shape
    d = c // heads
    nb = np_neighbours(grid)
    out = np.zeros((b, m))
    for i in range(b):
        f = np_ln(teacher[i])
        for j in range(m):
            x = np_ln(student[i, j])
            kl = 0.0
            for h in range(heads):
                fh, xh = f[:, h * d : (h + 1) * d], x[:, h * d : (h + 1) * d]
                for t in range(n):
                    js = nb[t]
                    pt = np_softmax(np.array([fh[t] @ fh[u] for u in js]) / np.sqrt(d))
                    ps = np_softmax(np.array([xh[t] @ fh[u] for u in js]) / np.sqrt(d))
                    kl += (pt * (np.log(pt) - np.log(ps))).sum()
            out[i, j] = kl / (heads * n)
    return out


def np_class_mass(y, factor):
    b, *s, k = y.shape
    grid = [n // factor for n in s]
    out = np.zeros((b, math.prod(grid), k))
    for t, cell in enumerate(itertools.product(*[range(g) for g in grid])):
        sl = tuple(slice(g * factor, (g + 1) * factor) for g in cell)
        for i in range(b):
            out[i, t] = y[(i, *sl)].reshape(-1, k).mean(0)
    return out


def np_proto(student, teacher, mass):
    b, m = student.shape[:2]
    k = mass.shape[-1]
    out = np.zeros((b, m))
    anyq = np.zeros(b, bool)
    for i in range(b):
        q = [mass[i, :, c].sum() >= 0.25 for c in range(k)]
        anyq[i] = any(q)
        for j in range(m):
            acc = 0.0
            for c in range(k):
                if not q[c]:
                    continue
                w = mass[i, :, c]
                ps = (w[:, None] * student[i, j]).sum(0) / (w.sum() + 1e-5)
                pt = (w[:, None] * teacher[i]).sum(0) / (w.sum() + 1e-5)
                cos = ps @ pt / (np.sqrt(ps @ ps + 1e-12) * np.sqrt(pt @ pt + 1e-12))
                acc += 1 - cos
            out[i, j] = acc / max(sum(q), 1)
    return out, anyq


def mean_or_zero(x):
    return x.mean() if x.size else 0.0


def np_objective(out, y, mask, betas, weights, ramp, grid, pooled=False, lc=0.1, la=0.1, lp=0.1):
    b, m = mask.shape
    p = np_softmax(out["logits"])
    fuse = np.full(b, np_seg_pooled(p, y)) if pooled else np_seg(p, y)
    ds = np_ds(out["aux_logits"], y)
    sep = np.stack([np_seg(np_softmax(out["sep_logits"][:, j]), y) for j in range(m)], 1)
    cov = np_cca(out["student_cca"], out["teacher"])
    att = np_maa(out["student"], out["teacher"], grid)
    factor = y.shape[1] // grid[0]
    proto, anyq = np_proto(out["student"], out["teacher"], np_class_mass(y, factor))
    lam = np.minimum(betas * weights, 3.0)
    total = fuse.mean() + ds.mean()
    valid = np.zeros((b, m), bool)
    for i in range(b):
        for j in range(m):
            if not mask[i, j]:
                continue
            total += lam[j] * sep[i, j] / b
            if mask[i].sum() >= 2:
                valid[i, j] = True
                total += ramp * lam[j] * (lc * cov[i, j] + la * att[i, j] + lp * proto[i, j]) / b
    gap_valid = valid & anyq[:, None]
    gaps = np.stack([cov, att, proto], -1) * gap_valid[..., None]
    terms = {
        "fuse": fuse.mean(),
        "ds": ds.mean(),
        "sep": mean_or_zero(sep[mask]),
        "cov": mean_or_zero(cov[valid]),
        "att": mean_or_zero(att[valid]),
        "proto": mean_or_zero(proto[gap_valid]),
        "total": total,
    }
    return total, terms, gaps, gap_valid


# ----------------------------------------------------------------------- inputs


def onehot_of(labels, k):
    return np.eye(k)[labels]


def make_out(rng, b, m, spatial, k, grid, c=16):
    n = math.prod(grid)
    return {
        "logits": rng.normal(0, 3, (b, *spatial, k)),
        "aux_logits": [
            rng.normal(0, 3, (b, *(s // 2**j for s in spatial), k)) for j in range(1, 5)
        ],
        "sep_logits": rng.normal(0, 3, (b, m, *spatial, k)),
        "student": rng.normal(0, 1, (b, m, n, c)),
        "student_cca": rng.normal(0, 1, (b, m, n, c)),
        "teacher": rng.normal(0, 1, (b, n, c)),
    }


def blob_labels(rng, b, spatial, k):
    """Labels with class regions large enough that several classes qualify per sample."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in spatial], indexing="ij")
    r = np.sqrt(sum(g**2 for g in grids))
    labels = np.zeros((b, *spatial), int)
    for i in range(b):
        shift = rng.uniform(0.1, 0.3)
        labels[i] = np.clip(((1.2 + shift - r) * k / 1.3).astype(int), 0, k - 1)
    noise = rng.random(labels.shape) < 0.05
    labels[noise] = rng.integers(0, k, noise.sum())
    return labels


def to_jax(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


MR2468 = np.array([90, 135, 184, 43]), 219
BRATS = dict(m=4, spatial=(16, 16, 16), k=4, grid=(2, 2, 2))  # N = 8 tokens on a 2x2x2 grid
MYOPS = dict(m=3, spatial=(32, 32), k=6, grid=(2, 2))
RANKS = pytest.mark.parametrize("cfg", [BRATS, MYOPS], ids=["brats3d", "myops2d"])


# ----------------------------------------------------------------------- segmentation


@RANKS
def test_segmentation_losses_match_formula(rng, cfg):
    b, k, spatial = 2, cfg["k"], cfg["spatial"]
    p = np_softmax(rng.normal(0, 4, (b, *spatial, k)))
    y = onehot_of(blob_labels(rng, b, spatial, k), k)
    assert (p < 0.005).any()  # the clamp is exercised
    pj, yj = jnp.asarray(p, jnp.float32), jnp.asarray(y, jnp.float32)
    wce = losses.weighted_cross_entropy(pj, yj)
    dice = losses.soft_dice_loss(pj, yj)
    assert wce.shape == dice.shape == (b,)
    np.testing.assert_allclose(wce, np_wce(p, y), rtol=2e-5)
    np.testing.assert_allclose(dice, np_dice(p, y), rtol=2e-5)
    np.testing.assert_allclose(losses.segmentation_loss(pj, yj), np_seg(p, y), rtol=2e-5)
    # The weights are per sample: a sample's loss does not depend on the other one.
    alone = losses.segmentation_loss(pj[:1], yj[:1])
    np.testing.assert_allclose(alone, losses.segmentation_loss(pj, yj)[:1], rtol=1e-6)


def test_dice_counts_background_and_perfect_prediction(rng):
    y = onehot_of(blob_labels(rng, 2, (8, 8, 8), 4), 4)
    perfect = jnp.asarray(y, jnp.float32)
    np.testing.assert_allclose(losses.soft_dice_loss(perfect, perfect), 0.0, atol=1e-6)
    # Perfect foreground, background predicted as class 1: only the background term is lost.
    wrong_bg = y.copy()
    wrong_bg[..., 1] += wrong_bg[..., 0]
    wrong_bg[..., 0] = 0
    got = losses.soft_dice_loss(jnp.asarray(wrong_bg, jnp.float32), perfect)
    np.testing.assert_allclose(got, np_dice(wrong_bg, y), rtol=1e-5)
    assert (np.asarray(got) > 0.25).all()  # the background's zero Dice alone costs 1/K


@RANKS
def test_pooled_variant(rng, cfg):
    b, k, spatial = 3, cfg["k"], cfg["spatial"]
    p = np_softmax(rng.normal(0, 3, (b, *spatial, k)))
    labels = blob_labels(rng, b, spatial, k)
    labels[0] = 0  # one all-background sample makes pooling matter for Dice
    y = onehot_of(labels, k)
    got = losses.segmentation_loss(
        jnp.asarray(p, jnp.float32), jnp.asarray(y, jnp.float32), pooled=True
    )
    assert got.shape == (b,)
    np.testing.assert_allclose(got, np.full(b, np_seg_pooled(p, y)), rtol=2e-5)
    assert abs(np_seg_pooled(p, y) - np_seg(p, y).mean()) > 1e-2  # a real difference


@RANKS
def test_deep_supervision_matches_formula(rng, cfg):
    b, k, spatial = 2, cfg["k"], cfg["spatial"]
    aux = [rng.normal(0, 3, (b, *(s // 2**j for s in spatial), k)) for j in range(1, 5)]
    y = onehot_of(blob_labels(rng, b, spatial, k), k)
    got = losses.deep_supervision_loss(to_jax(aux), jnp.asarray(y, jnp.float32))
    assert got.shape == (b,)
    np.testing.assert_allclose(got, np_ds(aux, y), rtol=2e-5)


def test_reference_upsampler_is_align_corners():
    x = np.array([0.0, 1.0, 3.0]).reshape(1, 3, 1)
    # align_corners: the ends map onto the ends, 6 outputs at positions i * 2 / 5.
    want = np.interp(np.arange(6) * 2 / 5, [0, 1, 2], [0, 1, 3])
    np.testing.assert_allclose(np_upsample(x, 2)[0, :, 0], want)


# ----------------------------------------------------------------------- CCA


def test_correlation_matrix_matches_formula(rng):
    x = rng.normal(0, 1, (2, 8, 16)) * rng.uniform(0.5, 5, 16) + rng.normal(0, 3, 16)
    x[1, :, 3] = 2.5  # a constant channel: zero row and column, not NaN
    x[0, :, 5] *= 0.01 / x[0, :, 5].std()  # variance ~1e-4: the 1e-5 and the N - 1 both show
    got = np.asarray(losses.correlation_matrix(jnp.asarray(x, jnp.float32)))
    assert got.shape == (2, 16, 16)
    want = np.stack([np_corr(xb) for xb in x])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.isfinite(got).all() and not got[1, 3].any()
    keep = np.arange(16) != 5
    np.testing.assert_allclose(  # the eps only matters for the tiny channel
        want[0][keep][:, keep], np.corrcoef(x[0].T)[keep][:, keep], atol=1e-4
    )
    assert abs(want[0, 5, 5] - 1) > 0.05


def test_cca_loss_matches_formula_and_stops_teacher_gradient(rng):
    s = rng.normal(0, 1, (2, 4, 8, 16))
    t = rng.normal(0, 1, (2, 8, 16))
    sj, tj = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    got = losses.cca_loss(sj, tj)
    assert got.shape == (2, 4)
    np.testing.assert_allclose(got, np_cca(s, t), rtol=2e-5)
    same = losses.cca_loss(jnp.broadcast_to(tj[:, None], sj.shape), tj)
    np.testing.assert_allclose(same, 0.0, atol=1e-10)
    g_t = jax.grad(lambda t_: losses.cca_loss(sj, t_).sum())(tj)
    assert not np.asarray(g_t).any()
    g_s = jax.grad(lambda s_: losses.cca_loss(s_, tj).sum())(sj)
    assert np.asarray(g_s).any()


# ----------------------------------------------------------------------- MAA


def test_neighbourhood():
    g2 = losses.neighbourhood((2, 2, 2))
    assert g2.shape == (8, 8) and g2.dtype == bool
    np.testing.assert_array_equal(g2, ~np.eye(8, dtype=bool))  # every other token
    g3 = losses.neighbourhood((3, 3, 3))
    counts = g3.sum(1)
    assert counts[0] == 7 and counts[26] == 7  # corners
    assert counts[13] == 26  # centre
    assert counts[4] == 17  # centre of a face
    assert counts[1] == 11  # middle of an edge
    assert (g3 == g3.T).all() and not g3.diagonal().any()
    for i, row in enumerate(np_neighbours((3, 3, 3))):
        assert set(np.flatnonzero(g3[i])) == set(row)
    # Row-major flatten in 2-D: (0, 0) of a 2x3 grid touches (0, 1), (1, 0), (1, 1).
    assert set(np.flatnonzero(losses.neighbourhood((2, 3))[0])) == {1, 3, 4}
    assert losses.neighbourhood((3, 3)).sum(1).tolist() == [3, 5, 3, 5, 8, 5, 3, 5, 3]


@pytest.mark.parametrize("grid", [(2, 2, 2), (3, 3, 3), (3, 3)], ids=["2x2x2", "3x3x3", "3x3"])
def test_maa_loss_matches_formula(rng, grid):
    n = math.prod(grid)
    s = rng.normal(0, 1, (2, 3, n, 16)) * rng.uniform(0.5, 2, 16)
    t = rng.normal(0, 1, (2, n, 16)) + 0.5 * s[:, 0]
    sj, tj = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    got = losses.maa_loss(sj, tj, grid)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, np_maa(s, t, grid), rtol=1e-4, atol=1e-6)
    # Affine per-token changes are removed by the LayerNorm: a scaled copy of f aligns exactly.
    same = losses.maa_loss(3.0 * jnp.broadcast_to(tj[:, None], sj.shape) + 1.0, tj, grid)
    np.testing.assert_allclose(same, 0.0, atol=1e-5)
    g_t = jax.grad(lambda t_: losses.maa_loss(sj, t_, grid).sum())(tj)
    assert not np.asarray(g_t).any()


def test_maa_heads_change_the_loss(rng):
    s = jnp.asarray(rng.normal(0, 1, (1, 2, 8, 16)), jnp.float32)
    t = jnp.asarray(rng.normal(0, 1, (1, 8, 16)), jnp.float32)
    one = losses.maa_loss(s, t, (2, 2, 2), heads=1)
    np.testing.assert_allclose(one, np_maa(np.asarray(s), np.asarray(t), (2, 2, 2), 1), 1e-4)
    assert not np.allclose(one, losses.maa_loss(s, t, (2, 2, 2), heads=8))
    with pytest.raises(ValueError):
        losses.maa_loss(s, t, (2, 2, 2), heads=3)
    with pytest.raises(ValueError):
        losses.maa_loss(s, t, (3, 3, 3))


# ----------------------------------------------------------------------- prototypes


@RANKS
def test_class_mass_matches_formula(rng, cfg):
    y = onehot_of(blob_labels(rng, 2, cfg["spatial"], cfg["k"]), cfg["k"])
    factor = cfg["spatial"][0] // cfg["grid"][0]
    got = losses.class_mass(jnp.asarray(y, jnp.float32), factor)
    assert got.shape == (2, math.prod(cfg["grid"]), cfg["k"])
    np.testing.assert_allclose(got, np_class_mass(y, factor), atol=1e-6)
    np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, rtol=1e-6)


def test_class_mass_token_order_is_row_major():
    y = np.zeros((1, 4, 4, 4, 2))
    y[0, 2:, :2, 2:, 1] = 1  # cell (1, 0, 1) -> token 1*4 + 0*2 + 1 = 5
    y[..., 0] = 1 - y[..., 1]
    mass = np.asarray(losses.class_mass(jnp.asarray(y), 2))
    assert mass[0, :, 1].tolist() == [0, 0, 0, 0, 0, 1, 0, 0]


def test_prototype_loss_matches_formula_and_threshold(rng):
    b, m, n, c, k = 3, 4, 8, 16, 4
    s = rng.normal(0, 1, (b, m, n, c))
    t = rng.normal(0, 1, (b, n, c))
    mass = np.zeros((b, n, k))
    mass[0, :, 0] = 1.0  # all background
    mass[1, :, 0] = 1.0
    mass[1, 3, :] = [0.5, 0.24, 0.25, 0.01]  # class 1 just misses, class 2 just qualifies
    mass[2, 2, 3] = 1e-3  # sample 2: nothing qualifies
    got, anyq = losses.prototype_loss(*to_jax((s, t, mass)))
    want, want_any = np_proto(s, t, mass)
    assert got.shape == (b, m) and anyq.shape == (b,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(anyq, [True, True, False])
    assert not np.asarray(got[2]).any()
    # The threshold decides: class 1 at 0.26 would change sample 1's loss.
    mass2 = mass.copy()
    mass2[1, 3, 1] = 0.26
    assert not np.allclose(losses.prototype_loss(*to_jax((s, t, mass2)))[0][1], got[1])
    sj, mj = jnp.asarray(s, jnp.float32), jnp.asarray(mass, jnp.float32)
    g_t = jax.grad(lambda t_: losses.prototype_loss(sj, t_, mj)[0].sum())(jnp.asarray(t))
    assert not np.asarray(g_t).any()


def test_prototype_loss_zero_for_aligned_features(rng):
    t = rng.normal(0, 1, (2, 8, 16))
    s = np.broadcast_to(2.0 * t[:, None], (2, 3, 8, 16))  # cosine ignores scale
    mass = np_class_mass(onehot_of(blob_labels(rng, 2, (8, 8, 8), 4), 4), 4)
    got, _ = losses.prototype_loss(*to_jax((s, t, mass)))
    np.testing.assert_allclose(got, 0.0, atol=1e-6)


# ----------------------------------------------------------------------- weights


def test_inverse_availability_weights_mr2468():
    counts, n = MR2468
    got = np.asarray(losses.inverse_availability_weights(counts, n))
    np.testing.assert_allclose(got, [0.94, 0.63, 0.46, 1.97], atol=5e-3)
    w = n / counts
    np.testing.assert_allclose(got, w / w.mean(), rtol=1e-6)
    np.testing.assert_allclose(got.mean(), 1.0, rtol=1e-6)
    zero = np.asarray(losses.inverse_availability_weights(np.array([10, 0]), 10))
    assert np.isfinite(zero).all() and zero[1] > zero[0]


# ----------------------------------------------------------------------- objective


# One compiled program per shape: eager execution of the objective and its gradient is slow.
_objective = jax.jit(losses.objective, static_argnames=("grid", "pooled"))


def run_objective(out, y, mask, betas, weights, ramp, grid, pooled=False):
    return _objective(
        to_jax(out),
        jnp.asarray(y, jnp.float32),
        jnp.asarray(mask),
        betas=jnp.asarray(betas, jnp.float32),
        weights=jnp.asarray(weights, jnp.float32),
        ramp=jnp.float32(ramp),
        grid=grid,
        pooled=pooled,
    )


def _loss(out, y, betas, weights, ramp, mask, grid):
    return losses.objective(out, y, mask, betas=betas, weights=weights, ramp=ramp, grid=grid)[0]


_loss_and_grads = jax.jit(
    jax.value_and_grad(_loss, argnums=(0, 1, 2, 3, 4)), static_argnames=("grid",)
)


def grad_all(out, y, mask, betas, weights, ramp, grid):
    """Loss and gradients w.r.t. every float input: out, onehot, betas, weights, ramp."""
    args = to_jax((out, y, betas, weights, np.float32(ramp)))
    return _loss_and_grads(*args, jnp.asarray(mask), grid=grid)


def check_objective(got, want):
    loss, terms, gaps, gap_valid = got
    w_loss, w_terms, w_gaps, w_valid = want
    np.testing.assert_allclose(loss, w_loss, rtol=2e-5)
    assert set(terms) == set(w_terms)
    for name in terms:
        np.testing.assert_allclose(terms[name], w_terms[name], rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(gap_valid, w_valid)
    np.testing.assert_allclose(gaps, w_gaps, rtol=1e-4, atol=1e-6)


B = 4  # one batch size for every objective test: one compilation per spatial rank


def mixed_mask(m):
    """Two present (distilled), one present (sep only), all present, the last two present."""
    mask = np.zeros((B, m), bool)
    mask[0, [0, 2]] = True
    mask[1, 1] = True
    mask[2] = True
    mask[3, -2:] = True
    return mask


@pytest.mark.parametrize("pooled", [False, True], ids=["per_sample", "pooled"])
@RANKS
def test_objective_matches_formula(rng, cfg, pooled):
    m, k = cfg["m"], cfg["k"]
    out = make_out(rng, B, m, cfg["spatial"], k, cfg["grid"])
    y = onehot_of(blob_labels(rng, B, cfg["spatial"], k), k)
    mask = mixed_mask(m)
    betas = rng.uniform(0.5, 2.0, m)
    weights = rng.uniform(0.4, 2.0, m)
    ramp = 0.37
    got = run_objective(out, y, mask, betas, weights, ramp, cfg["grid"], pooled)
    check_objective(got, np_objective(out, y, mask, betas, weights, ramp, cfg["grid"], pooled))
    assert got[1]["proto"] > 0 and got[1]["att"] > 0 and got[1]["cov"] > 0


def test_objective_weights_and_ramp(rng):
    """Each weight enters where the formula puts it: the ramp scales only distillation, the
    lambda_* scale their own term, betas and weights only through their product."""
    cfg = BRATS
    m, k = cfg["m"], cfg["k"]
    out = make_out(rng, B, m, cfg["spatial"], k, cfg["grid"])
    y = onehot_of(blob_labels(rng, B, cfg["spatial"], k), k)
    mask = mixed_mask(m)
    betas, weights = rng.uniform(0.5, 1.5, m), rng.uniform(0.5, 1.5, m)
    run = lambda **kw: float(run_objective(out, y, mask, grid=cfg["grid"], **kw)[0])
    no_distil = run(betas=betas, weights=weights, ramp=0.0)
    full = run(betas=betas, weights=weights, ramp=1.0)
    half = run(betas=betas, weights=weights, ramp=0.5)
    np.testing.assert_allclose(half - no_distil, 0.5 * (full - no_distil), rtol=1e-4)
    swapped = run(betas=weights, weights=betas, ramp=1.0)
    np.testing.assert_allclose(swapped, full, rtol=1e-6)
    _, terms, _, _ = run_objective(out, y, mask, betas, weights, 0.0, cfg["grid"])
    np.testing.assert_allclose(
        no_distil - float(terms["fuse"]) - float(terms["ds"]),
        sum(
            np.minimum(betas * weights, 3)[j]
            * np_seg(np_softmax(out["sep_logits"][i : i + 1, j]), y[i : i + 1])[0]
            for i, j in zip(*np.nonzero(mask))
        )
        / B,
        rtol=1e-4,
    )


def test_lambda_is_clipped_at_three(rng):
    cfg = BRATS
    m, k = cfg["m"], cfg["k"]
    out = make_out(rng, B, m, cfg["spatial"], k, cfg["grid"])
    y = onehot_of(blob_labels(rng, B, cfg["spatial"], k), k)
    mask = np.ones((B, m), bool)
    weights = np.asarray(losses.inverse_availability_weights(*MR2468))
    betas = np.array([1.0, 1.0, 1.0, 4.0])  # 4 * 1.97 = 7.9 -> 3
    loss = float(run_objective(out, y, mask, betas, weights, 1.0, cfg["grid"])[0])
    want = np_objective(out, y, mask, betas, weights, 1.0, cfg["grid"])[0]
    np.testing.assert_allclose(loss, want, rtol=2e-5)
    higher = betas.copy()
    higher[3] = 3.0  # 3 * 1.97 = 5.9, still clipped
    assert float(run_objective(out, y, mask, higher, weights, 1.0, cfg["grid"])[0]) == loss
    lower = betas.copy()
    lower[3] = 1.0  # 1.97, not clipped
    assert float(run_objective(out, y, mask, lower, weights, 1.0, cfg["grid"])[0]) < loss - 1e-3


def test_gap_validity(rng):
    cfg = BRATS
    m, k = cfg["m"], cfg["k"]
    out = make_out(rng, B, m, cfg["spatial"], k, cfg["grid"])
    y = onehot_of(blob_labels(rng, B, cfg["spatial"], k), k)
    y[3] = 0  # an unlabelled crop: no class qualifies
    mask = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [1, 1, 1, 1], [1, 0, 0, 1]], bool)
    _, terms, gaps, gap_valid = run_objective(out, y, mask, np.ones(m), np.ones(m), 1.0, (2, 2, 2))
    np.testing.assert_array_equal(
        gap_valid, [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    )
    gaps = np.asarray(gaps)
    assert (gaps[np.asarray(gap_valid)] > 0).all()
    assert not gaps[~np.asarray(gap_valid)].any()
    # Sample 3 still has v = True for cov and att: its pairs count in those terms.
    want = np_objective(out, y, mask, np.ones(m), np.ones(m), 1.0, (2, 2, 2))[1]
    for name in ("cov", "att", "proto"):
        np.testing.assert_allclose(terms[name], want[name], rtol=1e-4)


@RANKS
def test_missing_modality_contributes_exactly_nothing(rng, cfg):
    m, k = cfg["m"], cfg["k"]
    out = make_out(rng, B, m, cfg["spatial"], k, cfg["grid"])
    y = onehot_of(blob_labels(rng, B, cfg["spatial"], k), k)
    mask = mixed_mask(m)
    v = mask & (mask.sum(1, keepdims=True) >= 2)
    betas, weights = np.ones(m), np.ones(m)
    loss, grads = grad_all(out, y, mask, betas, weights, 1.0, cfg["grid"])
    g_out = grads[0]
    for name, where in (("sep_logits", mask), ("student", v), ("student_cca", v)):
        g = np.asarray(g_out[name])
        # Exactly zero for missing pairs, and for a lone modality's distillation inputs.
        assert not g[~where].any(), name
        assert np.abs(g[where]).reshape(where.sum(), -1).max(1).min() > 0, name
    assert not np.asarray(g_out["teacher"]).any()  # the teacher is always stop_gradient'ed
    # Changing a missing modality's inputs leaves the loss bit-identical.
    changed = dict(out)
    for name in ("sep_logits", "student", "student_cca"):
        changed[name] = out[name].copy()
        changed[name][~mask] = rng.normal(0, 10, changed[name][~mask].shape)
    got = run_objective(changed, y, mask, betas, weights, 1.0, cfg["grid"])[0]
    assert float(got) == float(loss)


def assert_all_finite(loss, grads):
    assert np.isfinite(float(loss))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.isfinite(np.asarray(g)).all(), jax.tree_util.keystr(path)


@RANKS
def test_finite_for_single_present_modality(rng, cfg):
    m, k = cfg["m"], cfg["k"]
    out = make_out(rng, B, m, cfg["spatial"], k, cfg["grid"])
    y = onehot_of(blob_labels(rng, B, cfg["spatial"], k), k)
    mask = np.eye(m, dtype=bool)[np.arange(B) % m]
    # What the model gives: zero features for missing modalities, teacher = the only student.
    for name in ("student", "student_cca", "sep_logits"):
        out[name][~mask] = 0.0
    out["teacher"] = out["student"][mask]
    loss, grads = grad_all(out, y, mask, np.ones(m), np.ones(m), 1.0, cfg["grid"])
    assert_all_finite(loss, grads)
    got = run_objective(out, y, mask, np.ones(m), np.ones(m), 1.0, cfg["grid"])
    check_objective(got, np_objective(out, y, mask, np.ones(m), np.ones(m), 1.0, cfg["grid"]))
    assert not np.asarray(got[3]).any() and not np.asarray(got[2]).any()


@RANKS
def test_finite_for_all_background_crop(rng, cfg):
    m, k = cfg["m"], cfg["k"]
    out = make_out(rng, B, m, cfg["spatial"], k, cfg["grid"])
    y = onehot_of(np.zeros((B, *cfg["spatial"]), int), k)
    mask = mixed_mask(m)
    out["student"][~mask] = 0.0
    out["student_cca"][~mask] = 0.0
    out["teacher"][:, :, 0] = 1.0  # a constant channel in the teacher too
    loss, grads = grad_all(out, y, mask, np.ones(m), np.ones(m), 0.5, cfg["grid"])
    assert_all_finite(loss, grads)
    got = run_objective(out, y, mask, np.ones(m), np.ones(m), 0.5, cfg["grid"])
    check_objective(got, np_objective(out, y, mask, np.ones(m), np.ones(m), 0.5, cfg["grid"]))


def test_objective_rejects_a_grid_that_does_not_tile_the_crop(rng):
    out = make_out(rng, 1, 4, (16, 16, 16), 4, (2, 2, 2))
    y = onehot_of(np.zeros((1, 16, 16, 16), int), 4)
    with pytest.raises(ValueError):
        run_objective(out, y, np.ones((1, 4), bool), np.ones(4), np.ones(4), 1.0, (3, 3, 3))
