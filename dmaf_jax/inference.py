"""Sliding-window inference (spec 7.1, 11.18), with encoder features computed once per window.

A modality's encoder output does not depend on which modalities are present, so a window is
encoded once and fused + decoded under every requested combination (a `lax.map` over the
masks inside one jitted call: one compilation serves any set of C combinations).

Windows: the training crop, start positions per axis `0, s, 2s, ...` for ceil((S - W) / s)
steps plus `S - W` (s = W * (1 - overlap)); a volume smaller than the window on some axis is
padded with each channel's corner value and the prediction cropped back. The windows of a
volume go through the network `windows_per_call` at a time (the last call padded by repeating
a window, so the compiled shape never changes); softmax probabilities are summed per voxel
and divided by the number of windows covering it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmaf_jax.model import DMAFNet


def window_starts(size: int, window: int, overlap: float = 0.5) -> list[int]:
    """Start positions along one axis (the original's rule); [0] when size <= window."""
    if size <= window:
        return [0]
    stride = max(1, int(window * (1 - overlap)))
    n = math.ceil((size - window) / stride)
    return [i * stride for i in range(n)] + [size - window]


def pad_to_window(volume: np.ndarray, window: Sequence[int]) -> np.ndarray:
    """(*S, M) padded at the end of each axis shorter than the window with each channel's
    corner value (section 11.18)."""
    pads = [(0, max(0, w - s)) for s, w in zip(volume.shape, window)]
    if not any(p for _, p in pads):
        return volume
    corner = volume[(0,) * len(window)]
    out = np.empty([s + p for s, (_, p) in zip(volume.shape, pads)] + [volume.shape[-1]])
    out = out.astype(volume.dtype)
    out[...] = corner
    out[tuple(slice(0, s) for s in volume.shape[:-1])] = volume
    return out


class SlidingWindow:
    """Batched sliding-window prediction for one model, window size and batch of windows.

    `encode` and `fuse` are jitted once per instance; `predict(params, volume, masks)` returns
    the averaged probabilities (C, *S, K) for C presence masks."""

    def __init__(
        self,
        model: DMAFNet,
        window: Sequence[int],
        windows_per_call: int = 2,
        overlap: float = 0.5,
    ):
        self.model, self.window = model, tuple(window)
        self.windows_per_call, self.overlap = windows_per_call, overlap

        def encode(params, x):
            return model.apply({"params": params}, x, method=DMAFNet.encode)

        def fuse(params, feats, masks):
            n = feats[0].shape[0]

            def one(mask):
                m = jnp.broadcast_to(mask, (n, mask.shape[-1]))
                logits, _, _, _ = model.apply(
                    {"params": params}, feats, m, method=DMAFNet.fuse_decode
                )
                return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

            return jax.lax.map(one, masks)

        self.encode = jax.jit(encode)
        self.fuse = jax.jit(fuse)

    def windows(self, shape: Sequence[int]) -> list[tuple[int, ...]]:
        axes = [window_starts(s, w, self.overlap) for s, w in zip(shape, self.window)]
        return list(itertools.product(*axes))

    def predict(self, params, volume: np.ndarray, masks: np.ndarray, progress=None) -> np.ndarray:
        """volume (*S, M) float32, masks (C, M) bool -> probabilities (C, *S, K) float32."""
        masks = np.asarray(masks, bool)
        shape = volume.shape[:-1]
        vol = pad_to_window(np.asarray(volume, np.float32), self.window)
        full = vol.shape[:-1]
        starts = self.windows(full)
        k = self.model.num_classes
        acc = np.zeros((len(masks), *full, k), np.float32)
        count = np.zeros(full, np.float32)
        dev_masks = jnp.asarray(masks)
        n = self.windows_per_call
        batches = [starts[i : i + n] for i in range(0, len(starts), n)]
        for group in progress(batches) if progress else batches:
            sl = [tuple(slice(o, o + w) for o, w in zip(s, self.window)) for s in group]
            x = np.stack([vol[s] for s in sl] + [vol[sl[-1]]] * (n - len(sl)))
            probs = np.asarray(self.fuse(params, self.encode(params, jnp.asarray(x)), dev_masks))
            for i, s in enumerate(sl):
                acc[(slice(None),) + s] += probs[:, i]
                count[s] += 1
        acc /= count[..., None]
        return acc[(slice(None),) + tuple(slice(0, s) for s in shape)]


def to_model_input(volume: np.ndarray, rank: int) -> np.ndarray:
    """Stored (H, W, D, M) volumes -> the model's (*S, M): rank 2 (MyoPS) drops the depth axis
    of size 1."""
    if rank == 2:
        if volume.shape[2] != 1:
            raise ValueError(f"a 2-D model takes (H, W, 1, M) slices, not {volume.shape}")
        return volume[:, :, 0]
    return volume
