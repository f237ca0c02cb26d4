"""Sliding-window inference (spec 7.1, 11.18), with encoder features computed once per window.

A modality's encoder output does not depend on which modalities are present, so a window is
encoded once and fused + decoded under every requested combination (a `lax.map` over the
masks inside one jitted call: one compilation serves any set of C combinations).

Windows: the training crop, start positions per axis `0, s, 2s, ...` for ceil((S - W) / s)
steps plus `S - W` (s = W * (1 - overlap)); a volume smaller than the window on some axis is
padded with each channel's corner value and the prediction cropped back. The windows of a
volume go through the network `windows_per_call` at a time (rounded up to a multiple of this
process's devices, which split each call's windows; the last call padded by repeating a window,
so the compiled shape never changes); softmax probabilities are summed per voxel
and divided by the number of windows covering it. `centre=True` (MyoPS, spec 7.3: "single
256^2 slice forward pass, no sliding window") predicts only the centred crop training uses
(padded as training pads) and background outside it. `predict(..., weights=True)` also averages
the level-1 DMAF attention maps (report figures; a third jitted function).

`PerCombinationWindow` is the original's procedure, kept as the reference of tests and of
`benchmarks/dmaf_eval_combinations.py`: each combination a separate pass, one window per call,
all encoders run again every time.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from common import parallel
from dmaf_jax import data
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
    shape = [s + p for s, (_, p) in zip(volume.shape, pads)] + [volume.shape[-1]]
    out = np.empty(shape, volume.dtype)
    out[...] = corner
    out[tuple(slice(0, s) for s in volume.shape[:-1])] = volume
    return out


class SlidingWindow:
    """Batched sliding-window prediction for one model, window size and batch of windows.

    `encode`, `fuse` (and `fuse_weights`) are jitted once per instance, and their shapes depend
    only on the window, `windows_per_call` and the number of masks C: one compilation serves
    every volume. `predict(params, volume, masks)` returns the averaged probabilities
    (C, *S, K) for C presence masks."""

    def __init__(
        self,
        model: DMAFNet,
        window: Sequence[int],
        windows_per_call: int = 2,
        overlap: float = 0.5,
        centre: bool = False,
        shard: parallel.Sharding | None = None,
    ):
        self.model, self.window = model, tuple(window)
        self.overlap, self.centre = overlap, centre
        # Each call's windows split over this process's devices: a multiple of their count.
        self.shard = shard or parallel.local()
        self.windows_per_call = parallel.round_up(windows_per_call, self.shard.devices)

        def encode(params, x):
            return model.apply({"params": params}, x, method=DMAFNet.encode)

        def fuse(params, feats, masks, with_weights=False):
            n = feats[0].shape[0]

            def one(mask):
                m = jnp.broadcast_to(mask, (n, mask.shape[-1]))
                logits, _, _, weights = model.apply(
                    {"params": params}, feats, m, method=DMAFNet.fuse_decode
                )
                probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
                if not with_weights:
                    return probs
                return probs, jnp.moveaxis(weights[0], 1, -1).astype(jnp.float32)  # (n, *W, M)

            return jax.lax.map(one, masks)

        self.encode = jax.jit(encode)
        self.fuse = jax.jit(fuse)
        self.fuse_weights = jax.jit(functools.partial(fuse, with_weights=True))

    def windows(self, shape: Sequence[int]) -> list[tuple[int, ...]]:
        axes = [window_starts(s, w, self.overlap) for s, w in zip(shape, self.window)]
        return list(itertools.product(*axes))

    def predict(
        self,
        params,
        volume: np.ndarray,
        masks: np.ndarray,
        progress=None,
        *,
        weights: bool = False,
        starts: Sequence[tuple[int, ...]] | None = None,
    ):
        """volume (*S, M) float32, masks (C, M) bool -> probabilities (C, *S, K) float32, and
        with `weights` also the level-1 DMAF attention maps (C, *S, M) averaged the same way.

        `progress` wraps the iterable of window batches (e.g. a progress bar); `starts`
        restricts the windows to these start positions (benchmarks: voxels no window covers
        are 0)."""
        if self.centre and starts is None:
            return self._predict_centre(params, volume, masks, progress, weights)
        masks = np.asarray(masks, bool)
        shape = volume.shape[:-1]
        vol = pad_to_window(np.asarray(volume, np.float32), self.window)
        full = vol.shape[:-1]
        starts = self.windows(full) if starts is None else [tuple(s) for s in starts]
        acc = np.zeros((len(masks), *full, self.model.num_classes), np.float32)
        att = np.zeros((len(masks), *full, masks.shape[1]), np.float32) if weights else None
        count = np.zeros(full, np.float32)
        dev_masks = jax.device_put(masks, self.shard.replicated)
        params = jax.device_put(params, self.shard.replicated)
        n = self.windows_per_call
        batches = [starts[i : i + n] for i in range(0, len(starts), n)]
        for group in progress(batches) if progress else batches:
            sl = [tuple(slice(o, o + w) for o, w in zip(s, self.window)) for s in group]
            x = np.stack([vol[s] for s in sl] + [vol[sl[-1]]] * (n - len(sl)))
            feats = self.encode(params, self.shard.put_rows(x))
            if weights:
                probs, maps = jax.device_get(self.fuse_weights(params, feats, dev_masks))
            else:
                probs = np.asarray(self.fuse(params, feats, dev_masks))
            for i, s in enumerate(sl):
                acc[(slice(None),) + s] += probs[:, i]
                if weights:
                    att[(slice(None),) + s] += maps[:, i]
                count[s] += 1
        count = np.maximum(count, 1)[..., None]
        crop = (slice(None),) + tuple(slice(0, s) for s in shape)
        acc /= count
        if not weights:
            return acc[crop]
        att /= count
        return acc[crop], att[crop]

    def _predict_centre(self, params, volume, masks, progress, weights):
        shape, rank = volume.shape[:-1], len(self.window)
        origin = data.crop_origin(shape, self.window, None, False)
        x = data.crop_array(np.asarray(volume, np.float32), origin, self.window)
        out = self.predict(params, x, masks, progress, weights=weights, starts=[(0,) * rank])
        src, dst = data.overlap(origin, self.window, shape)
        probs = np.zeros((len(masks), *shape, self.model.num_classes), np.float32)
        probs[..., 0] = 1.0  # background outside the crop
        probs[(slice(None),) + src] = (out[0] if weights else out)[(slice(None),) + dst]
        if not weights:
            return probs
        att = np.zeros((len(masks), *shape, out[1].shape[-1]), np.float32)
        att[(slice(None),) + src] = out[1][(slice(None),) + dst]
        return probs, att

    def compilations(self) -> dict[str, int]:
        """How many programs each jitted function has compiled (one each is the aim)."""
        return {
            name: getattr(self, name)._cache_size() for name in ("encode", "fuse", "fuse_weights")
        }


class PerCombinationWindow:
    """The original code's evaluation (PASSION `utils/predict.py`): for each combination a
    separate sliding-window pass, one window per call, the whole network (every encoder) on
    each window. Same windows, padding and averaging as `SlidingWindow`."""

    def __init__(self, model: DMAFNet, window: Sequence[int], overlap: float = 0.5):
        self.model, self.window, self.overlap = model, tuple(window), overlap

        def forward(params, x, mask):
            return model.apply({"params": params}, x, mask, method=DMAFNet.predict)

        self.forward = jax.jit(forward)

    def predict(
        self,
        params,
        volume: np.ndarray,
        masks: np.ndarray,
        *,
        starts: Sequence[tuple[int, ...]] | None = None,
    ) -> np.ndarray:
        """volume (*S, M), masks (C, M) bool -> probabilities (C, *S, K) float32."""
        masks = np.asarray(masks, bool)
        shape = volume.shape[:-1]
        vol = pad_to_window(np.asarray(volume, np.float32), self.window)
        full = vol.shape[:-1]
        if starts is None:
            axes = [window_starts(s, w, self.overlap) for s, w in zip(full, self.window)]
            starts = list(itertools.product(*axes))
        out = np.zeros((len(masks), *full, self.model.num_classes), np.float32)
        for c, mask in enumerate(masks):
            count = np.zeros(full, np.float32)
            m = jnp.asarray(mask[None])
            for start in starts:
                s = tuple(slice(o, o + w) for o, w in zip(start, self.window))
                out[(c,) + s] += np.asarray(self.forward(params, jnp.asarray(vol[s][None]), m))[0]
                count[s] += 1
            out[c] /= np.maximum(count, 1)[..., None]
        return out[(slice(None),) + tuple(slice(0, s) for s in shape)]


def to_model_input(volume: np.ndarray, rank: int) -> np.ndarray:
    """Stored (H, W, D, M) volumes -> the model's (*S, M): rank 2 (MyoPS) drops the depth axis
    of size 1."""
    if rank == 2:
        if volume.shape[2] != 1:
            raise ValueError(f"a 2-D model takes (H, W, 1, M) slices, not {volume.shape}")
        return volume[:, :, 0]
    return volume
