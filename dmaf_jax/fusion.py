"""Dynamic Modality-Aware Fusion (spec 3.1, amended by 10.1-10.2 and decided by 11.4-11.6).

Per level, from the modality features E_m (zeroed where the modality is missing) and the
presence mask a (B, M):

  tokens  t_m = Dense(C -> 128)(avgpool_g(IN(E_m))) + pos + mod[m]       g = bottleneck grid
  4 pre-norm transformer layers over the M*T tokens, keys of missing modalities biased -1e9
  s_m     = up(Dense(128 -> 1)(LN(X_m))) + w^T IN(E_m)       both heads zero-initialised
  A       = softmax over the present m of s_m (float32, per voxel), exactly 0 where missing
  f       = sum_m A_m * IN(E_m)

With zero-initialised heads A starts uniform over the present modalities: mean fusion.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmaf_jax.layers import avg_pool, instance_norm, resize_align_corners, xavier_dense

NEG = -1e9  # masked logits: -inf would turn 0 * inf into NaN in the backward pass


def normalise_modalities(feats: jax.Array) -> jax.Array:
    """IN(E_m) of (B, M, *S, C), each modality of each sample on its own (section 10.1)."""
    b, m, *s, c = feats.shape
    return instance_norm(feats.reshape(b * m, *s, c)).reshape(b, m, *s, c)


class TransformerLayer(nn.Module):
    """Pre-norm layer: masked multi-head self-attention and a GELU MLP, dropout on the MLP and
    residual paths only (section 11.5)."""

    dim: int = 128
    heads: int = 8
    mlp: int = 512
    dropout: float = 0.1
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, key_bias: jax.Array, key: jax.Array | None) -> jax.Array:
        """x (B, T, d); key_bias (B, T): 0 for present keys, -1e9 for missing ones; `key` the
        dropout key when training, None at evaluation."""
        b, t, d = x.shape
        keys = iter(jax.random.split(key, 3) if key is not None else [None] * 3)

        def dropout(y):
            return nn.Dropout(self.dropout, deterministic=key is None)(y, rng=next(keys))

        dh = d // self.heads
        h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ln_attn")(x)
        q, k, v = (
            xavier_dense(d, name=n, dtype=self.dtype)(h).reshape(b, t, self.heads, dh)
            for n in ("query", "key", "value")
        )
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits / jnp.sqrt(jnp.float32(dh)) + key_bias[:, None, None, :]
        p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, d)
        o = xavier_dense(d, name="out", dtype=self.dtype)(o)
        x = x + dropout(o)
        h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ln_mlp")(x)
        h = nn.gelu(xavier_dense(self.mlp, name="mlp_in", dtype=self.dtype)(h), approximate=False)
        h = dropout(h)
        h = xavier_dense(d, name="mlp_out", dtype=self.dtype)(h)
        return x + dropout(h)


class DMAF(nn.Module):
    """One level's fusion. `pool` is the factor from this level to the bottleneck grid."""

    pool: int
    dim: int = 128
    heads: int = 8
    depth: int = 4
    mlp: int = 512
    dropout: float = 0.1
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, feats: jax.Array, mask: jax.Array, key_data: jax.Array | None = None):
        """feats (B, M, *S, C), mask (B, M) bool, the dropout key's data (`jax.random.key_data`)
        when training, None at evaluation -> (fused (B, *S, C), weights (B, M, *S)). The key
        comes in as an argument, not from `make_rng`, so that `layers.remat_call` can replay the
        same dropout in the backward pass."""
        b, m, *s, c = feats.shape
        z = normalise_modalities(feats).reshape(b * m, *s, c)
        pooled = avg_pool(z, self.pool)  # (B*M, *g, C)
        grid = pooled.shape[1:-1]
        n_tok = math.prod(grid)
        tokens = xavier_dense(self.dim, name="project", dtype=self.dtype)(
            pooled.reshape(b, m, n_tok, c)
        )
        init = nn.initializers.normal(0.02)
        pos = self.param("pos", init, (n_tok, self.dim))
        mod = self.param("modality", init, (m, self.dim))
        x = tokens + pos[None, None] + mod[None, :, None]
        x = x.reshape(b, m * n_tok, self.dim)
        present = mask.astype(bool)
        key_bias = jnp.repeat(jnp.where(present, 0.0, NEG), n_tok, axis=1).astype(jnp.float32)
        keys = (
            jax.random.split(jax.random.wrap_key_data(key_data), self.depth)
            if key_data is not None
            else [None] * self.depth
        )
        for i in range(self.depth):
            x = TransformerLayer(
                self.dim, self.heads, self.mlp, self.dropout, self.dtype, name=f"layer_{i}"
            )(x, key_bias, keys[i])
        x = x.reshape(b, m, n_tok, self.dim) * present[:, :, None, None].astype(x.dtype)
        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ln_head")(x)
        s_tok = nn.Dense(
            1, use_bias=False, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="head"
        )(x)  # (B, M, T, 1)
        s_tok = resize_align_corners(s_tok.reshape(b * m, *grid, 1), s)
        w_local = self.param("local_head", nn.initializers.zeros, (c, 1))  # 1x1 conv, no bias
        local = z @ w_local.astype(z.dtype)
        logits = (s_tok + local).astype(jnp.float32).reshape(b, m, *s)
        bcast = present.reshape(b, m, *([1] * len(s)))
        logits = jnp.where(bcast, logits, NEG)
        weights = jax.nn.softmax(logits, axis=1)  # (B, M, *S), 0 where missing
        fused = jnp.einsum("bm...,bm...c->b...c", weights.astype(z.dtype), z.reshape(b, m, *s, c))
        return fused, weights


def mean_fusion(feats: jax.Array, mask: jax.Array):
    """The ablation baseline: the mean of IN(E_m) over the present modalities."""
    b, m, *s, c = feats.shape
    z = normalise_modalities(feats)
    w = mask.astype(jnp.float32) / jnp.maximum(mask.sum(1, keepdims=True), 1).astype(jnp.float32)
    weights = jnp.broadcast_to(w.reshape(b, m, *([1] * len(s))), (b, m, *s))
    return jnp.einsum("bm...,bm...c->b...c", weights.astype(z.dtype), z), weights
