"""Mutual Attention Fusion (spec sections 2.3 and 2.6).

Each stream re-mixes its fire2 channels by their similarity to the other modality's handcrafted
embedding, restricted to that modality's lesion window and moved onto this stream's lesion
position: B-mode channels are weighted by the aligned SWE colour moments, SWE channels by the
aligned B-mode edges. The attention is channel-by-channel, (C, C), with no projections.

B17: the original leaves the logits unscaled (dot products over 16,384 positions at 256x256
input), and so does the default: measured at initialisation on realistic inputs the rows of the
softmax then peak at 0.17-0.63. `scaled_attention=True` divides them by sqrt(N), N the number of
grid positions, as transformers do; at 256x256 that makes the attention near-uniform (row
maxima 0.008-0.012 against a uniform 0.0078) and every fused channel the channel mean, i.e.
MAF switched off in effect, so it is an option, not a correction.

With bfloat16 compute (model.py) MAF runs in float32: the unscaled logits are sums of N products,
large enough that bfloat16's 8-bit mantissa would move the softmax visibly, and the fire2
inputs, the embeddings and the shifted regions are small next to the backbone.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from famf_jax import handcrafted, raa
from famf_jax.layers import BN_EPSILON, BN_MOMENTUM, TorchConv, avg_pool2


def attention_weights(query: jax.Array, value: jax.Array, scaled: bool) -> jax.Array:
    """softmax_j(sum_n q[n, i] v[n, j]) [/ sqrt(N)]: (B, S, S, C) each -> (B, C, C)."""
    b, h, w, c = value.shape
    q = query.reshape(b, h * w, c)
    v = value.reshape(b, h * w, c)
    logits = jnp.einsum("bni,bnj->bij", q, v, precision=jax.lax.Precision.HIGHEST)
    if scaled:
        logits = logits / math.sqrt(h * w)
    return jax.nn.softmax(logits, axis=-1)


def channel_attention(query: jax.Array, value: jax.Array, scaled: bool) -> jax.Array:
    """Attention softmax_j(sum_n q[n, i] v[n, j]) applied to v; (B, S, S, C) each."""
    b, h, w, c = value.shape
    attn = attention_weights(query, value, scaled)
    v = value.reshape(b, h * w, c)
    out = jnp.einsum("bij,bnj->bni", attn, v, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, h, w, c)


class MutualAttentionFusion(nn.Module):
    """RAA + MAF on the fire2 outputs of both streams (PyTorch's `muatt_1`)."""

    features: int = 128
    faithful: bool = False
    scaled_attention: bool = False  # logits / sqrt(N) (never in faithful mode)

    def setup(self):
        self.conv1 = TorchConv(self.features, 3)  # edge embedding, ReLU6
        self.conv2 = TorchConv(self.features, 3)  # colour-moment embedding, no activation
        # One BatchNorm shared by both streams, so its statistics move twice per pass.
        self.bn = nn.BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPSILON)

    def _normalise(self, x: jax.Array, train: bool) -> jax.Array:
        return jnp.clip(self.bn(x, use_running_average=not train), 0.0, 6.0)

    def __call__(
        self,
        f2_bmode: jax.Array,
        f2_swe: jax.Array,
        bmode: jax.Array,
        swe: jax.Array,
        cam_bmode: jax.Array,
        cam_swe: jax.Array,
        train: bool,
    ) -> dict:
        """f2_*: (B, S, S, C); bmode, swe: (B, 2S, 2S, 3) inputs; cam_*: (B, h, w) in [0, 1].

        Returns fused_bmode, fused_swe (B, S, S, C), the RAA outputs of `raa.alignment`, and the
        two handcrafted embeddings edge_bmode, colour_swe (B, S, S, C).
        """
        f2_bmode, f2_swe = f2_bmode.astype(jnp.float32), f2_swe.astype(jnp.float32)
        size = f2_bmode.shape[1]
        align = raa.alignment(cam_bmode, cam_swe, size, self.faithful)
        edge = jnp.clip(self.conv1(avg_pool2(handcrafted.edge_map(bmode))), 0.0, 6.0)
        colour = self.conv2(avg_pool2(handcrafted.local_colour_moments(swe)))
        move = jax.vmap(raa.shift)
        colour_moved = move(colour * align["mask_swe"][..., None], align["shift_to_bmode"])
        edge_moved = move(edge * align["mask_bmode"][..., None], align["shift_to_swe"])
        scaled = self.scaled_attention and not self.faithful
        fused_b = self._normalise(channel_attention(colour_moved, f2_bmode, scaled), train)
        fused_s = self._normalise(channel_attention(edge_moved, f2_swe, scaled), train)
        return dict(
            fused_bmode=fused_b,
            fused_swe=fused_s,
            edge_bmode=edge,
            colour_swe=colour,
            **align,
        )

    def discarded_statistics(self, f2_bmode: jax.Array, f2_swe: jax.Array) -> None:
        """The original's warm-off MAF in train mode, kept only for its BatchNorm side effect (B11).

        With zero masks the attention is uniform, so every output channel is the channel mean.
        """
        for f in (f2_bmode.astype(jnp.float32), f2_swe.astype(jnp.float32)):
            self._normalise(jnp.broadcast_to(f.mean(-1, keepdims=True), f.shape), True)
