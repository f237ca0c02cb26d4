"""FAMF-Net (the original's `OursNet`, spec section 2): two SqueezeNet streams, RAA + MAF after
fire2, late fusion of the fire9 maps, 1x1 conv and global average pooling.

Submodule names follow the PyTorch state_dict (`stem_1`, `fire2_1`, ..., `muatt_1`, `conv10`;
suffix 1 = B-mode, 2 = SWE) so that `convert.py` is a renaming. Parameters: 1,476,098 trainable
(the 450 frozen edge-kernel values of the original are constants here, see handcrafted.py).

Deviations (B-numbers of the spec): B25, Flax keeps the biased batch variance in its running
average where PyTorch keeps the unbiased one (a relative difference of 1/(B*H*W - 1)). The rest
are documented in cam.py, raa.py and maf.py. B11 (which passes write batch statistics) is the
training step's business; `discarded_statistics` provides the original's side effect.

`dtype=jnp.bfloat16` (config `model.bfloat16`) runs the two backbones in bfloat16 with float32
parameters; float32 stay: batch-norm statistics and normalisation (layers.py), all of MAF and
RAA (maf.py: handcrafted features, its convolutions, attention logits and softmax, the CAM-driven
centres, masks and shifts), the pooled features, conv10, logits and softmax, so the CAMs
(cam.py) and the losses see float32. Parameters and batch statistics are identical either way.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from famf_jax.layers import ConvBN, Fire, TorchConv, max_pool2
from famf_jax.maf import MutualAttentionFusion

STREAM_SUFFIX = {"bmode": "1", "swe": "2"}
# (index, output channels, squeeze channels) of fire2..fire9.
FIRES = (
    (2, 128, 16),
    (3, 128, 16),
    (4, 256, 32),
    (5, 256, 32),
    (6, 384, 48),
    (7, 384, 48),
    (8, 512, 64),
    (9, 512, 64),
)
RESIDUAL_FIRES = (3, 5, 7)
POOLED_FIRES = (4, 8)


class FAMFNet(nn.Module):
    """Inputs are (B, H, W, 3) in [-1, 1]; H divisible by 8 (the MAF grid is H/2, the CAM H/8).

    `modalities` selects the streams; with one stream there is no fusion (an ablation).
    """

    num_classes: int = 2
    faithful: bool = False
    modalities: tuple[str, ...] = ("bmode", "swe")
    scaled_attention: bool = False  # MAF's logits / sqrt(N) (see maf.py)
    dtype: Any = None  # backbone compute dtype (None: float32); parameters stay float32

    def setup(self):
        for m in self.modalities:
            sfx = STREAM_SUFFIX[m]
            setattr(self, f"stem_{sfx}", ConvBN(96, 3))
            for i, out, squeeze in FIRES:
                setattr(self, f"fire{i}_{sfx}", Fire(out, squeeze))
        if self.fused:
            self.muatt_1 = MutualAttentionFusion(128, self.faithful, self.scaled_attention)
        self.conv10 = TorchConv(self.num_classes, 1)

    @property
    def fused(self) -> bool:
        return tuple(self.modalities) == ("bmode", "swe")

    def _fire(self, i: int, modality: str):
        return getattr(self, f"fire{i}_{STREAM_SUFFIX[modality]}")

    def encode(self, x: jax.Array, modality: str, train: bool) -> jax.Array:
        """Stem and fire2 of one stream: (B, H, W, 3) -> (B, H/2, H/2, 128)."""
        stem = getattr(self, f"stem_{STREAM_SUFFIX[modality]}")
        if self.dtype is not None:
            x = x.astype(self.dtype)
        return self._fire(2, modality)(max_pool2(stem(x, train)), train)

    def trunk(self, x: jax.Array, f2: jax.Array, modality: str, train: bool) -> jax.Array:
        """fire3..fire9 of one stream; `x` replaces fire2's output, `f2` is fire3's residual."""
        for i, _, _ in FIRES[1:]:
            y = self._fire(i, modality)(x, train)
            if i == 3:
                y = y + f2
            elif i in RESIDUAL_FIRES:
                y = y + x
            x = max_pool2(y) if i in POOLED_FIRES else y
        return x

    def __call__(
        self,
        bmode: jax.Array,
        swe: jax.Array,
        cam_bmode: jax.Array | None = None,
        cam_swe: jax.Array | None = None,
        *,
        warm: bool = False,
        train: bool = False,
        f2: dict | None = None,
    ) -> dict:
        """One forward pass; `warm` (static) turns RAA + MAF on, with CAMs (B, H/8, W/8).

        `f2` ({modality: (B, H/2, W/2, 128)}) reuses the stem + fire2 outputs of an earlier pass
        on the same batch. Returns logits, probs (B, 2); f2_<m>, f9_<m> per stream, and with
        two streams stream_logits_<m> (B, 2); with warm, also fused_<m> and the RAA outputs
        (centres, masks, shifts).
        """
        inputs = {"bmode": bmode, "swe": swe}
        if f2 is None:
            f2 = {m: self.encode(inputs[m], m, train) for m in self.modalities}
        f2 = {m: v.astype(self.dtype or v.dtype) for m, v in f2.items()}
        out = {f"f2_{m}": f2[m] for m in self.modalities}
        stream_in = dict(f2)
        if self.fused and warm:
            if cam_bmode is None or cam_swe is None:
                raise ValueError("warm=True needs cam_bmode and cam_swe")
            maf = self.muatt_1(f2["bmode"], f2["swe"], bmode, swe, cam_bmode, cam_swe, train)
            out.update(maf)
            # MAF computes in float32; the trunks continue in the compute dtype.
            stream_in = {m: maf[f"fused_{m}"].astype(f2[m].dtype) for m in self.modalities}
        elif self.fused and train and self.faithful:
            self.muatt_1.discarded_statistics(f2["bmode"], f2["swe"])
        f9 = {m: self.trunk(stream_in[m], f2[m], m, train) for m in self.modalities}
        out.update({f"f9_{m}": f9[m] for m in self.modalities})
        fused = jnp.concatenate([f9[m] for m in self.modalities], axis=-1)
        # conv10 is linear, so pooling first gives the same logits at 1/(h*w) of the cost.
        # Pooling, logits and softmax in float32: the CAMs and the losses read them.
        pooled = fused.astype(jnp.float32).mean(axis=(1, 2), keepdims=True)
        logits = self.conv10(pooled)[:, 0, 0, :]
        out["logits"] = logits
        out["probs"] = jax.nn.softmax(logits, axis=-1)
        if len(self.modalities) == 2:
            # What each trunk says alone (train.stream_loss): its half of conv10, the other
            # trunk's features zeroed, the bias in both (after the warm-up a trunk reads MAF's
            # fusion, which carries some of the other modality). Unused: removed under jit.
            first, second = self.modalities
            k = f9[first].shape[-1]
            alone = {first: pooled.at[..., k:].set(0), second: pooled.at[..., :k].set(0)}
            for m, x in alone.items():
                out[f"stream_logits_{m}"] = self.conv10(x)[:, 0, 0, :]
        return out


def init_variables(model: FAMFNet, key: jax.Array, image_size: int, batch: int = 1) -> dict:
    """Initial `params` and `batch_stats` (a warm pass, so the fusion module is created too)."""
    x = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)
    cam = jnp.ones((batch, image_size // 8, image_size // 8), jnp.float32)
    return dict(model.init(key, x, x, cam, cam, warm=True, train=False))


def count_params(params) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
