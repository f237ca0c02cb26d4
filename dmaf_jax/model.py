"""DMAF-Net (spec 2 with the amendments of 10 and the decisions of 11), any spatial rank.

    x (B, *S, M), mask (B, M) bool
    -> one encoder per modality (parameters stacked over M: params["encoder"]
       leaves have a leading axis M, so DTMS can scale one modality's update)
    -> per level l: DMAF over the M feature maps -> f_l
    -> the fusion decoder on f_1..f_L -> fused logits + 4 deep-supervision logits
    -> the shared decoder (one set of parameters, modalities folded into the batch) on each
       modality's pyramid
    -> the distillation inputs at the bottleneck: IN(e^m_L), its CCA projection, and f_L.

Missing modalities are zeroed at the input and in every encoder level (PASSION's IDT), so no
gradient reaches a missing modality's encoder and one compiled program serves every mask.
Encoding does not depend on the mask, so evaluation encodes a window once and fuses it under
each combination (`encode` then `fuse_decode`).

With `remat`, every pre-norm convolution block of the encoders and decoders runs through
`layers.remat_call` (a checkpoint XLA cannot undo), and so does each DMAF module: the backward
pass keeps only each block's inputs and recomputes its norm, activation, padding and stacked
conv views, and each fusion's attention. Parameters and their names do not change, nor does
the dropout (its keys are arguments, replayed in the recomputation).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from common.conv import Conv
from dmaf_jax.fusion import DMAF, mean_fusion, normalise_modalities
from dmaf_jax.layers import PreNormConv, call_with, upsample

DEFAULT_CHANNELS = (8, 16, 32, 64, 128)


def _block(remat: bool):
    """A factory of pre-norm convolution blocks called through `call_with(remat)` (same
    parameters and names either way): `_block(remat)(features, ...)(x)`."""
    call = call_with(remat)

    def make(*args, **kwargs):
        block = PreNormConv(*args, **kwargs)
        return lambda x: call(block, x)

    return make


class Encoder(nn.Module):
    """One modality's 5-level encoder (spec 2.3): c1 (stride 2 after level 1), then a residual
    pair of pre-norm convolutions."""

    channels: Sequence[int]
    dtype: jnp.dtype | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """x (B, *S, 1) -> [(B, S / 2^l, C_l) for each level l]."""
        block = _block(self.remat)
        feats = []
        for level, c in enumerate(self.channels):
            if level == 0:
                x = Conv(c, 3, dtype=self.dtype, name="l1_c1")(x)
            else:
                x = block(c, 3, 2, self.dtype, name=f"l{level + 1}_c1")(x)
            r = block(c, dtype=self.dtype, name=f"l{level + 1}_c2")(x)
            x = x + block(c, dtype=self.dtype, name=f"l{level + 1}_c3")(r)
            feats.append(x)
        return feats


class _EncoderStep(Encoder):
    """The encoder as a scan body: (carry, x) -> (carry, features)."""

    @nn.compact
    def __call__(self, carry, x):  # noqa: D102
        return carry, super().__call__(x)


class SharedDecoder(nn.Module):
    """`Decoder_sep` (spec 2.4): up x2, conv C_{l+1} -> C_l, concat the skip, conv, 1x1 conv;
    a 1x1 head to the classes. Returns logits."""

    channels: Sequence[int]
    num_classes: int
    dtype: jnp.dtype | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, feats: list[jax.Array]) -> jax.Array:
        block = _block(self.remat)
        x = feats[-1]
        for level in reversed(range(len(self.channels) - 1)):
            c, n = self.channels[level], level + 1
            x = block(c, dtype=self.dtype, name=f"d{n}_c1")(upsample(x, 2))
            x = jnp.concatenate([x, feats[level]], axis=-1)
            x = block(c, dtype=self.dtype, name=f"d{n}_c2")(x)
            x = block(c, 1, dtype=self.dtype, name=f"d{n}_out")(x)
        return Conv(self.num_classes, 1, dtype=self.dtype, name="seg")(x)


class FusionDecoder(nn.Module):
    """`Decoder_fuse` (spec 2.5) on the fused pyramid; returns (logits, aux logits), the aux
    list ordered pred_1 (level 2, S/2) .. pred_4 (level 5, S/16)."""

    channels: Sequence[int]
    num_classes: int
    dtype: jnp.dtype | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, fused: list[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
        top = len(self.channels) - 1
        dt = self.dtype
        block = _block(self.remat)
        g = block(self.channels[top], dtype=dt, name=f"block{top + 1}")(fused[top])
        aux = [Conv(self.num_classes, 1, dtype=dt, name=f"pred{top}")(g)]
        u = block(self.channels[top - 1], dtype=dt, name=f"up{top + 1}")(upsample(g, 2))
        for level in reversed(range(top)):
            c, n = self.channels[level], level + 1
            b = block(c, dtype=dt, name=f"block{n}")(fused[level])
            g = block(c, dtype=dt, name=f"d{n}_c1")(jnp.concatenate([b, u], axis=-1))
            g = block(c, 1, dtype=dt, name=f"d{n}_c2")(g)
            if level > 0:
                aux.append(Conv(self.num_classes, 1, dtype=dt, name=f"pred{level}")(g))
                u = block(self.channels[level - 1], dtype=dt, name=f"up{n}")(upsample(g, 2))
        logits = Conv(self.num_classes, 1, dtype=dt, name="seg")(g)
        return logits, aux[::-1]


def _stack_modalities(feats: list[jax.Array]) -> list[jax.Array]:
    """[(M, B, ...)] from the scanned encoder (initialisation) -> [(B, M, ...)]."""
    return [jnp.swapaxes(f, 0, 1) for f in feats]


def _mask_features(feats: list[jax.Array], mask: jax.Array) -> list[jax.Array]:
    out = []
    for f in feats:  # f (B, M, *S, C)
        m = mask.astype(f.dtype).reshape(mask.shape + (1,) * (f.ndim - 2))
        out.append(f * m)
    return out


class DMAFNet(nn.Module):
    num_modalities: int = 4
    num_classes: int = 4
    channels: Sequence[int] = DEFAULT_CHANNELS
    fusion: str = "dmaf"  # dmaf | mean (ablation)
    token_dim: int = 128
    heads: int = 8
    depth: int = 4
    mlp: int = 512
    dropout: float = 0.1
    dtype: jnp.dtype | None = None
    remat: bool = False  # recompute encoder, decoder and fusion blocks (memory for compute)

    def setup(self):
        # Parameters stacked over the modalities (nn.scan creates them; `encode` applies them).
        self.encoder = nn.scan(
            _EncoderStep,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=0,
            out_axes=0,
            length=self.num_modalities,
        )(self.channels, self.dtype, self.remat)
        self.shared_decoder = SharedDecoder(self.channels, self.num_classes, self.dtype, self.remat)
        levels = len(self.channels)
        if self.fusion == "dmaf":
            self.dmaf = [
                DMAF(
                    2 ** (levels - 1 - level),
                    self.token_dim,
                    self.heads,
                    self.depth,
                    self.mlp,
                    self.dropout,
                    self.dtype,
                )
                for level in range(levels)
            ]
        elif self.fusion != "mean":
            raise ValueError(f"model.fusion must be dmaf or mean, not {self.fusion!r}")
        self.fusion_decoder = FusionDecoder(self.channels, self.num_classes, self.dtype, self.remat)
        c = self.channels[-1]
        # CCA's shared linear map (section 11.7), identity at the start.
        self.cca_projection = nn.Dense(
            c,
            use_bias=False,
            kernel_init=lambda key, shape, dtype=jnp.float32: jnp.eye(shape[0], dtype=dtype),
            dtype=jnp.float32,
        )

    def encode(self, x: jax.Array) -> list[jax.Array]:
        """x (B, *S, M) -> per level (B, M, *S_l, C_l), unmasked (the mask is applied later)."""
        xm = jnp.moveaxis(x, -1, 0)[..., None]  # (M, B, *S, 1)
        if self.dtype is not None:
            xm = xm.astype(self.dtype)
        if self.is_initializing():
            _, feats = self.encoder(None, xm)
            return _stack_modalities(feats)
        # One encoder call per modality on its slice of the stacked parameters: on CPU a
        # scan's backward pass is 7x slower and a vmap (a grouped convolution) 6-20x slower.
        stacked = self.encoder.variables["params"]
        single = Encoder(self.channels, self.dtype, self.remat, parent=None)
        per = [
            single.apply({"params": jax.tree.map(lambda p, i=i: p[i], stacked)}, xm[i])
            for i in range(xm.shape[0])
        ]
        return [jnp.stack(level, axis=1) for level in zip(*per)]

    def fuse_decode(self, feats: list[jax.Array], mask: jax.Array, train: bool = False):
        """Encoder features and a mask -> (fused logits, aux logits, fused pyramid, weights)."""
        feats = _mask_features(feats, mask)
        fused, weights = [], []
        for level, f in enumerate(feats):
            if self.fusion == "dmaf":
                # Dropout keys drawn here and passed in, so remat can replay them; the
                # attention maps of all levels dominate the saved activations at large crops.
                key = (jax.random.key_data(self.make_rng("dropout")),) if train else ()
                y, w = call_with(self.remat)(self.dmaf[level], f, mask, *key)
            else:
                y, w = mean_fusion(f, mask)
            fused.append(y)
            weights.append(w)
        logits, aux = self.fusion_decoder(fused)
        return logits, aux, fused, weights

    def predict(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Test-time softmax of the fused logits, (B, *S, K) float32."""
        logits, _, _, _ = self.fuse_decode(self.encode(x), mask, train=False)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    def __call__(self, x: jax.Array, mask: jax.Array, train: bool = False) -> dict:
        """Everything the training objective needs. x (B, *S, M) with missing channels zeroed
        or not (they are zeroed here), mask (B, M) bool."""
        mask = mask.astype(bool)
        x = x * mask.astype(x.dtype).reshape(mask.shape[0], *([1] * (x.ndim - 2)), -1)
        feats = self.encode(x)
        logits, aux, fused, weights = self.fuse_decode(feats, mask, train)
        feats = _mask_features(feats, mask)
        # Shared decoder on each modality's pyramid (all M, static shapes; the loss weights
        # each by presence).
        b, m = mask.shape
        sep = self.shared_decoder([f.reshape(b * m, *f.shape[2:]) for f in feats])
        sep = sep.reshape(b, m, *sep.shape[1:])  # (B, M, *S, K)
        bottom = feats[-1]  # (B, M, *g, C)
        c = bottom.shape[-1]
        # The distillation inputs in float32 even with bfloat16 compute (section 11.15).
        student = normalise_modalities(bottom.astype(jnp.float32)).reshape(b, m, -1, c)
        return {
            "logits": logits,
            "aux_logits": aux,
            "sep_logits": sep,
            "student": student,
            "student_cca": self.cca_projection(student),
            "teacher": fused[-1].astype(jnp.float32).reshape(b, -1, c),
            "weights": weights,
        }


def build_model(cfg, spec) -> DMAFNet:
    m = cfg.model
    return DMAFNet(
        num_modalities=len(spec.modalities),
        num_classes=spec.num_classes,
        channels=tuple(m.channels),
        fusion=m.fusion,
        token_dim=m.token_dim,
        heads=m.heads,
        depth=m.depth,
        mlp=m.mlp,
        dropout=m.dropout,
        dtype=jnp.bfloat16 if m.bfloat16 else None,
        remat=m.remat,
    )


def init_variables(model: DMAFNet, key: jax.Array, crop: Sequence[int]) -> dict:
    """Parameters for inputs of spatial shape `crop` (the token grid depends on it)."""
    x = jnp.zeros((1, *crop, model.num_modalities), jnp.float32)
    mask = jnp.ones((1, model.num_modalities), bool)
    return model.init({"params": key, "dropout": key}, x, mask, train=False)
