"""Eval-mode inference: the original's two-pass procedure in one jitted function (spec 2.4).

Pass 1 runs with the warm flag off (the plain two-stream network), the CAMs follow in closed
form from its fire9 maps, and pass 2 runs RAA + MAF with them, reusing pass 1's stem and fire2
outputs (identical in eval mode). Everything needed is in the variables and the input shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from famf_jax.cam import closed_form_cams
from famf_jax.model import STREAM_SUFFIX, FAMFNet


def modalities_of(params) -> tuple[str, ...]:
    """The streams present in a parameter tree (both, or one for a single-modality ablation)."""
    return tuple(m for m, sfx in STREAM_SUFFIX.items() if f"stem_{sfx}" in params)


def two_pass(
    model: FAMFNet,
    variables,
    bmode,
    swe,
    *,
    warm: bool,
    train: bool = False,
    every_pass_statistics: bool = False,
) -> tuple[dict, dict]:
    """CAM pass (warm off), closed-form CAMs, main pass; returns (main output, statistics).

    The main output carries cam_bmode/cam_swe when warm. Statistics: {"batch_stats",
    "cam_stats"}, the main pass's and the CAM pass's running batch-norm statistics. Corrected
    mode keeps them apart: after the warm-up the main pass normalises fire3..fire9 inputs that
    MAF fused, the CAM pass raw ones, so at evaluation the CAM pass reads its own statistics
    (`variables["cam_stats"]`, the main ones where absent) as in training it used its batch's.
    Before the warm-up the one pass is both, and both sets follow it. In train mode stem +
    fire2 (identical in both passes) run once. With `every_pass_statistics` (faithful B11) both
    passes run in full and update one shared set, in the original's order; without warm (or
    fusion) the original's second pass still runs then.

    With a compute dtype (bfloat16) and warm, the CAM pass runs in float32 and without gradient,
    and the main pass in full (stem and fire2 again) in the compute dtype: the lesion centres
    are argmax decisions on the CAMs, which bfloat16 backbones would move (measured at
    initialisation: 19-27 % of the centres, for a 12 % relative error of fire9's maps).
    """
    params = variables["params"]

    def run(stats, *args, net=model, params=params, **kw):
        vs = {"params": params, "batch_stats": stats}
        if not train:
            return net.apply(vs, *args, train=False, **kw), stats
        out, upd = net.apply(vs, *args, train=True, mutable=["batch_stats"], **kw)
        return out, upd["batch_stats"]

    def both(main, cam=None):
        return {"batch_stats": main, "cam_stats": main if cam is None else cam}

    main0 = variables["batch_stats"]
    shared = every_pass_statistics
    cam0 = main0 if shared else variables.get("cam_stats", main0)
    fused_warm = warm and model.fused
    low = fused_warm and model.dtype is not None
    if low:
        cam_pass = dict(net=model.clone(dtype=None), params=jax.lax.stop_gradient(params))
        first, stats1 = run(cam0, bmode, swe, warm=False, **cam_pass)
    else:
        first, stats1 = run(cam0, bmode, swe, warm=False)
    if not fused_warm:
        if shared:
            second, stats = run(stats1, bmode, swe, warm=False)
            return second, both(stats)
        return first, both(stats1)
    cams = closed_form_cams(
        first["f9_bmode"],
        first["f9_swe"],
        params["conv10"]["kernel"],
        first["logits"],
        faithful=model.faithful,
    )
    if shared:
        second, stats = run(stats1, bmode, swe, *cams, warm=True)
        return dict(second, cam_bmode=cams[0], cam_swe=cams[1]), both(stats)
    f2 = None if low else {m: first[f"f2_{m}"] for m in model.modalities}
    second, stats = run(main0, bmode, swe, *cams, warm=True, f2=f2)
    # stem and fire2 ran only in the CAM pass: their statistics come from it.
    stats = {k: (stats1[k] if k.startswith(("stem_", "fire2_")) else v) for k, v in stats.items()}
    return dict(second, cam_bmode=cams[0], cam_swe=cams[1]), both(stats, stats1)


@functools.partial(
    jax.jit, static_argnames=("faithful", "warm", "modalities", "scaled_attention", "bfloat16")
)
def predict_core(
    variables,
    bmode,
    swe,
    *,
    faithful: bool,
    warm: bool,
    modalities: tuple,
    scaled_attention: bool = False,
    bfloat16: bool = False,
) -> dict:
    """The jitted eval-mode forward; no host work inside. See `predict` for the outputs."""
    model = FAMFNet(
        faithful=faithful,
        modalities=modalities,
        scaled_attention=scaled_attention,
        dtype=jnp.bfloat16 if bfloat16 else None,
    )
    out, _ = two_pass(model, variables, bmode, swe, warm=warm)
    keys = (
        "probs",
        "logits",
        "cam_bmode",
        "cam_swe",
        "centre_bmode",
        "centre_swe",
        "fused_bmode",
        "fused_swe",
    )
    return {k: out[k] for k in keys if k in out}


def predict(
    variables,
    bmode,
    swe,
    *,
    faithful: bool = False,
    warm: bool = True,
    scaled_attention: bool = False,
    bfloat16: bool = False,
) -> dict:
    """Eval-mode prediction for a batch of image pairs (`bfloat16`: backbone compute, model.py).

    bmode, swe: float32 (B, H, W, 3) in [-1, 1], H and W divisible by 8. Returns numpy arrays:
    probs (B, 2); cam_bmode, cam_swe (B, H/8, W/8) in [0, 1]; centre_bmode, centre_swe (B, 2)
    int (row, col) on the H/2 x W/2 MAF grid; fused_bmode, fused_swe (B, H/2, W/2, 128), the
    MAF outputs that replace fire2's output. `warm=False` gives the plain two-stream network
    (no CAM outputs); a single-modality model gives probs and logits only.
    """
    bmode = jnp.asarray(bmode, jnp.float32)
    swe = jnp.asarray(swe, jnp.float32)
    if bmode.shape != swe.shape or bmode.ndim != 4 or bmode.shape[-1] != 3:
        raise ValueError(f"expected two (B, H, W, 3) arrays, got {bmode.shape} and {swe.shape}")
    if bmode.shape[1] % 8 or bmode.shape[2] % 8:
        raise ValueError(f"H and W must be divisible by 8, got {bmode.shape[1:3]}")
    modalities = modalities_of(variables["params"])
    # Parity with the original needs full float32 matmuls (GPUs default to TF32).
    with jax.default_matmul_precision("highest" if faithful else None):
        out = predict_core(
            variables,
            bmode,
            swe,
            faithful=faithful,
            warm=warm,
            modalities=modalities,
            scaled_attention=scaled_attention,
            bfloat16=bfloat16,
        )
    return {k: np.asarray(v) for k, v in out.items()}
