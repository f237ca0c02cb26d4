"""DMAF-Net's losses: segmentation, deep supervision, relation and prototype distillation, and
the total objective (spec 4.1-4.4 as amended by 10.1, 10.3, 10.5, 10.9, 10.10 and 11.7-11.11,
11.15, 11.16).

Channels-last throughout, any spatial rank: dense maps are (B, *S, K), per-modality tensors carry
the modality axis second, (B, M, ...), and bottleneck tokens are flattened row-major to
(B, N, C). Everything is computed in float32. Missing modalities must give finite values and
finite gradients (0 * NaN stays NaN), so every division has a safe denominator and masks use
-1e9, never -inf.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
PROB_FLOOR = 0.005  # PASSION clamps probabilities before the log
DICE_EPS = 1e-7
CORR_EPS = 1e-5
LN_EPS = 1e-5
PROTO_EPS = 1e-5
NORM_EPS = 1e-12
PROTO_MIN_MASS = 0.25  # a class needs a quarter of a token's worth of voxels (10.5, 11.9)
LAMBDA_MAX = 3.0
NEG = -1e9


MAA_HEADS = 8  # channel groups of the masked attention alignment (section 10.3)


def _f32(x) -> jax.Array:
    return jnp.asarray(x, F32)


def _safe(den: jax.Array) -> jax.Array:
    return jnp.where(den > 0, den, 1.0)


# --------------------------------------------------------------------------- segmentation


def weighted_cross_entropy(probs: jax.Array, onehot: jax.Array) -> jax.Array:
    """`softmax_weighted_loss_bs`: per-sample class weights w_c = 1 - sum_x y_c / sum_{x,c} y.

    probs, onehot: (B, *S, K). Returns (B,): mean over voxels of sum_c -w_c y_c log(clip(p_c)).
    """
    p, y = _f32(probs), _f32(onehot)
    axes = tuple(range(1, y.ndim - 1))
    w = 1.0 - y.sum(axes) / _safe(y.sum(axes).sum(-1, keepdims=True))  # (B, K)
    w = w.reshape(w.shape[0], *(1,) * len(axes), w.shape[-1])
    ce = -(w * y * jnp.log(jnp.clip(p, PROB_FLOOR, 1.0))).sum(-1)
    return ce.mean(axes)


def soft_dice_loss(probs: jax.Array, onehot: jax.Array) -> jax.Array:
    """`dice_loss_bs`: 1 - mean_c 2 sum_x p_c y_c / (sum_x p_c + sum_x y_c + 1e-7), background
    included. probs, onehot: (B, *S, K). Returns (B,)."""
    p, y = _f32(probs), _f32(onehot)
    axes = tuple(range(1, y.ndim - 1))
    dice = 2.0 * (p * y).sum(axes) / (p.sum(axes) + y.sum(axes) + DICE_EPS)  # (B, K)
    return 1.0 - dice.mean(-1)


def _pooled_segmentation_loss(p: jax.Array, y: jax.Array) -> jax.Array:
    # PASSION's `softmax_weighted_loss` keeps per-sample class weights and takes the mean over
    # batch and voxels; its `dice_loss` pools the sums over the whole batch.
    ce = weighted_cross_entropy(p, y).mean()
    axes = tuple(range(y.ndim - 1))
    dice = 2.0 * (p * y).sum(axes) / (p.sum(axes) + y.sum(axes) + DICE_EPS)  # (K,)
    return ce + 1.0 - dice.mean()


def segmentation_loss(probs: jax.Array, onehot: jax.Array, *, pooled: bool = False) -> jax.Array:
    """Weighted CE + soft Dice of probabilities (B, *S, K) against a one-hot (B, *S, K).

    Returns (B,). `pooled=True` is PASSION's fused-loss form (faithful mode, 11.16): Dice sums
    over the whole batch, CE averaged over batch and voxels; the scalar comes back broadcast to
    (B,) so that a batch mean of it is the scalar itself.
    """
    p, y = _f32(probs), _f32(onehot)
    if pooled:
        return jnp.broadcast_to(_pooled_segmentation_loss(p, y), (y.shape[0],))
    return weighted_cross_entropy(p, y) + soft_dice_loss(p, y)


def deep_supervision_loss(aux_logits: Sequence[jax.Array], onehot: jax.Array) -> jax.Array:
    """Sum over k = 1..len(aux_logits) of 2^-k * segmentation_loss(up_{2^k}(softmax(pred_k)), y).

    aux_logits[k-1]: (B, S/2^k, K) logits of level k+1; onehot: (B, *S, K) at full resolution.
    Softmax in float32, then align-corners linear upsampling (spec 10.10). Returns (B,).
    """
    from dmaf_jax.layers import upsample  # the model's module; imported late to keep deps down

    y = _f32(onehot)
    total = jnp.zeros(y.shape[0], F32)
    for k, logits in enumerate(aux_logits, start=1):
        probs = upsample(jax.nn.softmax(_f32(logits), axis=-1), 2**k)
        if probs.shape != y.shape:
            raise ValueError(f"aux_logits[{k - 1}] upsampled to {probs.shape}, want {y.shape}")
        total = total + 2.0**-k * segmentation_loss(probs, y)
    return total


# --------------------------------------------------------------------------- distillation


def correlation_matrix(x: jax.Array) -> jax.Array:
    """Correlation of the channels of (B, N, C) over the N tokens: (B, C, C).

    Sigma = centred X^T X / (N - 1), R = D^-1/2 Sigma D^-1/2 with D = diag(Sigma) + 1e-5, so a
    constant (e.g. all-zero) channel gives a zero row instead of NaN (10.1).
    """
    x = _f32(x)
    n = x.shape[-2]
    xc = x - x.mean(-2, keepdims=True)
    cov = jnp.einsum("...nc,...nd->...cd", xc, xc) / (n - 1)
    inv = jax.lax.rsqrt(jnp.diagonal(cov, axis1=-2, axis2=-1) + CORR_EPS)
    return cov * inv[..., :, None] * inv[..., None, :]


def cca_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """Covariance consistency: ||R_m - R_f||_F^2 / C^2 per (b, m) (10.1, 11.7).

    student: (B, M, N, C), already through the shared Dense projection; teacher: (B, N, C),
    stop-gradient'ed here. Returns (B, M), each in [0, 4].
    """
    c = student.shape[-1]
    r_s = correlation_matrix(student)  # (B, M, C, C)
    r_t = correlation_matrix(jax.lax.stop_gradient(_f32(teacher)))[:, None]
    return jnp.square(r_s - r_t).sum((-2, -1)) / c**2


def neighbourhood(grid: tuple[int, ...]) -> np.ndarray:
    """(N, N) bool, N = prod(grid): True where tokens i and j (row-major flatten of `grid`) are
    at Chebyshev distance exactly 1 (the 3^n neighbourhood without the token itself)."""
    coords = np.stack(np.unravel_index(np.arange(math.prod(grid)), grid), axis=-1)
    return np.abs(coords[:, None] - coords[None]).max(-1) == 1


def _layer_norm(x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPS)


def _split_heads(x: jax.Array, heads: int) -> jax.Array:
    """(..., N, C) -> (..., heads, N, C / heads)."""
    *lead, n, c = x.shape
    return jnp.moveaxis(x.reshape(*lead, n, heads, c // heads), -2, -3)


def maa_loss(
    student: jax.Array, teacher: jax.Array, grid: tuple[int, ...], heads: int = MAA_HEADS
) -> jax.Array:
    """Masked attention alignment, parameter-free (10.3, 11.8). Returns (B, M).

    student: (B, M, N, C) = IN(e^m_L); teacher: (B, N, C) = f_L (stop-gradient'ed here); N =
    prod(grid), tokens row-major. Both are layer-normed over all C (no affine), split into
    `heads` channel groups; P_t = softmax_G(F F^T / sqrt(d)), log P_s = log_softmax_G(X F^T /
    sqrt(d)), G the Chebyshev-1 neighbourhood without self. KL(P_t || P_s) summed over the
    neighbours, averaged over heads and tokens.
    """
    n, c = student.shape[-2:]
    if n != math.prod(grid):
        raise ValueError(f"{n} tokens do not fill the grid {grid}")
    if c % heads:
        raise ValueError(f"{c} channels do not split into {heads} heads")
    g = jnp.asarray(neighbourhood(tuple(grid)))
    bias = jnp.where(g, 0.0, NEG).astype(F32)
    scale = 1.0 / math.sqrt(c // heads)
    f = _split_heads(_layer_norm(jax.lax.stop_gradient(_f32(teacher))), heads)  # (B, h, N, d)
    x = _split_heads(_layer_norm(_f32(student)), heads)  # (B, M, h, N, d)
    log_pt = jax.nn.log_softmax(jnp.einsum("bhid,bhjd->bhij", f, f) * scale + bias, axis=-1)
    log_ps = jax.nn.log_softmax(jnp.einsum("bmhid,bhjd->bmhij", x, f) * scale + bias, axis=-1)
    log_pt = log_pt[:, None]
    kl = jnp.where(g, jnp.exp(log_pt) * (log_pt - log_ps), 0.0).sum(-1)  # (B, M, h, N)
    return kl.mean((-2, -1))


def class_mass(onehot: jax.Array, factor: int) -> jax.Array:
    """Soft class fractions per bottleneck token: average pooling of (B, *S, K) by `factor` on
    every spatial axis, flattened row-major to (B, N, K), N = prod(S / factor)."""
    y = _f32(onehot)
    b, *s, k = y.shape
    if any(n % factor for n in s):
        raise ValueError(f"spatial shape {tuple(s)} is not divisible by {factor}")
    shape = [b]
    for n in s:
        shape += [n // factor, factor]
    y = y.reshape(*shape, k).mean(tuple(range(2, 2 * len(s) + 1, 2)))
    return y.reshape(b, -1, k)


def prototype_loss(
    student: jax.Array, teacher: jax.Array, mass: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Prototype distillation (4.3, 10.5, 11.9).

    student: (B, M, N, C) = IN(e^m_L); teacher: (B, N, C) = f_L (stop-gradient'ed here); mass:
    (B, N, K) from `class_mass` of the ground truth. p_c = sum_n Y_c X / (sum_n Y_c + 1e-5);
    class c qualifies iff sum_n Y_c >= 0.25; L = sum_c q_c (1 - cos_c) / max(sum_c q_c, 1).
    Returns ((B, M) loss, (B,) bool: some class qualifies).
    """
    y = _f32(mass)
    total = y.sum(1)  # (B, K)
    qual = total >= PROTO_MIN_MASS
    den = (total + PROTO_EPS)[..., None]
    p_s = jnp.einsum("bnk,bmnc->bmkc", y, _f32(student)) / den[:, None]
    p_t = jnp.einsum("bnk,bnc->bkc", y, jax.lax.stop_gradient(_f32(teacher))) / den
    p_t = p_t[:, None]
    norm_s = jnp.sqrt(jnp.square(p_s).sum(-1) + NORM_EPS)
    norm_t = jnp.sqrt(jnp.square(p_t).sum(-1) + NORM_EPS)
    cos = (p_s * p_t).sum(-1) / (norm_s * norm_t)  # (B, M, K)
    q = qual.astype(F32)[:, None]
    loss = (q * (1.0 - cos)).sum(-1) / jnp.maximum(q.sum(-1), 1.0)
    return loss, qual.any(-1)


# --------------------------------------------------------------------------- total objective


def inverse_availability_weights(counts, n: int) -> jax.Array:
    """w_m = n / max(n_m, 1), normalised to mean 1 (10.5, 11.11). counts: (M,) cases with
    modality m available among n training cases. Returns (M,) float32."""
    w = n / jnp.maximum(_f32(counts), 1.0)
    return w / w.mean()


def _masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of x over the valid entries (0 when none is valid)."""
    return jnp.where(valid, x, 0.0).sum() / jnp.maximum(valid.sum(), 1).astype(F32)


def objective(
    out: Mapping[str, jax.Array | Sequence[jax.Array]],
    onehot: jax.Array,
    mask: jax.Array,
    *,
    betas: jax.Array,
    weights: jax.Array,
    ramp: jax.Array | float,
    lambda_cov: float = 0.1,
    lambda_att: float = 0.1,
    lambda_proto: float = 0.1,
    grid: tuple[int, ...],
    pooled: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array, jax.Array]:
    """DMAF-Net's training loss (5.2 as amended by 10.4-10.5 and 11.7-11.11).

    out: `logits` (B, *S, K) fused; `aux_logits` 4 x (B, S/2^k, K); `sep_logits` (B, M, *S, K)
    shared decoder per modality; `student` (B, M, N, C) = IN(e^m_L); `student_cca` (B, M, N, C)
    its CCA projection; `teacher` (B, N, C) = f_L (stop-gradient'ed here). onehot (B, *S, K);
    mask (B, M) bool presence; betas, weights (M,) (weights = normalised inverse availability);
    ramp: scalar distillation ramp in [0, 1]; grid: the bottleneck grid, prod(grid) = N.

    L = L_fuse + L_ds + sum_m lam_m a_bm L_sep + ramp sum_m lam_m v_bm (l_cov L_cov + l_att L_att
    + l_proto L_proto), lam_m = min(beta_m w_m, 3), v_bm = a_bm and |S_b| >= 2, each masked
    per-sample term reduced as sum_b / B.

    Returns (loss, terms, gaps, gap_valid): terms holds fuse, ds, sep, cov, att, proto (means
    over their valid pairs, unweighted) and total; gaps (B, M, 3) the raw [cov, att, proto],
    stop-gradient'ed and zero where not valid; gap_valid (B, M) = v_bm and some class qualifies.
    """
    y = _f32(onehot)
    a = jnp.asarray(mask).astype(bool)
    b, m = a.shape
    spatial = y.shape[1:-1]
    if len(grid) != len(spatial) or any(s % g for s, g in zip(spatial, grid)):
        raise ValueError(f"bottleneck grid {grid} does not tile the crop {spatial}")
    factor = spatial[0] // grid[0]
    if any(s != factor * g for s, g in zip(spatial, grid)):
        raise ValueError(f"crop {spatial} is not the grid {grid} times one factor")

    l_fuse = segmentation_loss(jax.nn.softmax(_f32(out["logits"]), -1), y, pooled=pooled)
    l_ds = deep_supervision_loss(out["aux_logits"], y)
    sep_probs = jax.nn.softmax(_f32(out["sep_logits"]), -1)
    l_sep = jax.vmap(segmentation_loss, in_axes=(1, None), out_axes=1)(sep_probs, y)  # (B, M)

    teacher = out["teacher"]
    l_cov = cca_loss(out["student_cca"], teacher)
    l_att = maa_loss(out["student"], teacher, tuple(grid))
    l_proto, qual = prototype_loss(out["student"], teacher, class_mass(y, factor))

    v = a & (a.sum(-1, keepdims=True) >= 2)
    lam = jnp.minimum(_f32(betas) * _f32(weights), LAMBDA_MAX)
    sep = (lam * jnp.where(a, l_sep, 0.0)).sum() / b
    distil = lambda_cov * l_cov + lambda_att * l_att + lambda_proto * l_proto
    distil = _f32(ramp) * (lam * jnp.where(v, distil, 0.0)).sum() / b
    total = l_fuse.mean() + l_ds.mean() + sep + distil

    gap_valid = v & qual[:, None]
    gaps = jnp.stack([l_cov, l_att, l_proto], -1)
    gaps = jax.lax.stop_gradient(jnp.where(gap_valid[..., None], gaps, 0.0))
    terms = {
        "fuse": l_fuse.mean(),
        "ds": l_ds.mean(),
        "sep": _masked_mean(l_sep, a),
        "cov": _masked_mean(l_cov, v),
        "att": _masked_mean(l_att, v),
        "proto": _masked_mean(l_proto, gap_valid),
        "total": total,
    }
    terms = jax.tree.map(jax.lax.stop_gradient, terms)
    return total, terms, gaps, gap_valid
