"""PyTorch AMSGrad and the per-epoch poly schedule (common/optim.py).

The TORCH_* numbers were recorded once with `parity/record_amsgrad.py` (torch 2.13.0+cpu,
float64): the per-step parameter changes of `torch.optim.AdamW(amsgrad=True, lr=2e-4,
weight_decay=1e-4)` on GRADS from PARAMS0. torch is not needed to run these tests.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common.optim import (
    epoch_of_step,
    find_state,
    hold,
    poly_lr,
    poly_schedule,
    pytorch_adamw,
    scale_by_pytorch_amsgrad,
)

SHAPES = {"a": (3,), "b": (2, 2), "c": (2,)}
LR, WD = 2e-4, 1e-4

GRADS = [
    {
        "a": [0.0123, 2.9875, -2.7414],
        "b": [-8.9059, -4.5467, -9.9165, 0.6014],
        "c": [13.4022, -4.9221],
    },
    {
        "a": [-6.2047, 4.8984, 3.5689],
        "b": [1.0541, -9.3047, -0.2925, 6.953],
        "c": [-13.4421, -4.5762],
    },
    {
        "a": [-0.019, -0.0129, -0.0184],
        "b": [-0.0024, -0.0127, 0.0027, 0.0016],
        "c": [-0.0019, -0.0252],
    },
    {
        "a": [-0.0054, -0.0005, 0.0011],
        "b": [-0.0153, -0.0048, -0.0098, -0.0081],
        "c": [0.0106, -0.0081],
    },
    {
        "a": [-0.0003, 0.0088, -0.0058],
        "b": [-0.0011, 0.0011, 0.0006, -0.0123],
        "c": [0.0008, 0.0136],
    },
    {"a": [-0.0155, 0.0086, 0.0012], "b": [-0.0064, 0.02, 0.0076, -0.012], "c": [0.0007, 0.0058]},
    {
        "a": [-0.0019, 0.0068, -0.0007],
        "b": [0.0067, 0.0144, -0.0068, 0.002],
        "c": [-0.0046, 0.0013],
    },
    {
        "a": [-0.0119, -0.0058, -0.002],
        "b": [0.009, 0.0115, -0.0132, -0.0079],
        "c": [0.0065, -0.0199],
    },
    {
        "a": [-0.0046, -0.001, 0.0126],
        "b": [0.0069, -0.0033, -0.0037, -0.0025],
        "c": [0.0152, -0.0043],
    },
    {
        "a": [-0.003, 0.0035, -0.0012],
        "b": [-0.002, -0.0111, -0.0001, -0.0044],
        "c": [0.0117, 0.0065],
    },
]
PARAMS0 = {
    "a": [2.0409, -2.5557, 0.4181],
    "b": [-0.5678, -0.4526, -0.2156, -2.02],
    "c": [-0.2319, -0.8652],
}
TORCH_DELTAS_CONSTANT = [
    {
        "a": [-0.00020004065539858118, -0.00019994888533059196, 0.0001999916372704691],
        "b": [
            0.00020001135577540907,
            0.00020000905156009052,
            0.00020000431179831302,
            -0.00019995959667484797,
        ],
        "c": [-0.00019999536185077993, 0.000200017303593647],
    },
    {
        "a": [0.0001485207311882064, -0.00019678004869927435, -3.644730125129669e-05],
        "b": [
            0.00011559144890538331,
            0.00019255081831121013,
            0.00013833879175778607,
            -0.00015977638968633912,
        ],
        "c": [1.0828207589075323e-05, 0.00019950535730528518],
    },
    {
        "a": [0.00011513148793085293, -0.00015173655195122038, -2.763920601273062e-05],
        "b": [
            8.934462475773675e-05,
            0.00014892664790411292,
            0.00010684899582774632,
            -0.00012346594364842645,
        ],
        "c": [8.379896688087696e-06, 0.00015462420493284057],
    },
    {
        "a": [9.435529390655617e-05, -0.00012421178838106783, -2.2658962937904814e-05],
        "b": [
            7.334951880100249e-05,
            0.00012198614832942267,
            8.75960612723159e-05,
            -0.00010094298503249277,
        ],
        "c": [6.796789686791538e-06, 0.0001267386420854555],
    },
    {
        "a": [7.971079119206692e-05, -0.00010509419342108473, -1.9003076815737874e-05],
        "b": [
            6.198121073675011e-05,
            0.00010304435711477877,
            7.399568257637767e-05,
            -8.507861700257635e-05,
        ],
        "c": [5.738085079087796e-06, 0.00010685133136811853],
    },
    {
        "a": [6.892123479351753e-05, -9.068175486337537e-05, -1.639901128586141e-05],
        "b": [
            5.346919816417994e-05,
            8.856605575108256e-05,
            6.366337542954015e-05,
            -7.310493633072568e-05,
        ],
        "c": [4.9398048851678755e-06, 9.195822017982191e-05],
    },
    {
        "a": [6.0184918400540965e-05, -7.926668859692398e-05, -1.4299468926448622e-05],
        "b": [
            4.6597260091263415e-05,
            7.716673275143249e-05,
            5.5639675916291376e-05,
            -6.383479766558509e-05,
        ],
        "c": [4.336933432547152e-06, 8.02499312144711e-05],
    },
    {
        "a": [5.321539512515017e-05, -6.973707912472094e-05, -1.2556458200863041e-05],
        "b": [
            4.0959536145024344e-05,
            6.788405121466168e-05,
            4.915767896052081e-05,
            -5.612902478313586e-05,
        ],
        "c": [3.787946075639592e-06, 7.100547199279106e-05],
    },
    {
        "a": [4.7285461360235814e-05, -6.18543481318845e-05, -1.1415924635715946e-05],
        "b": [
            3.62690998448878e-05,
            6.026514333340449e-05,
            4.3654170701928896e-05,
            -4.976326156880262e-05,
        ],
        "c": [3.2832421118789146e-06, 6.306709208236949e-05],
    },
    {
        "a": [4.222251959440371e-05, -5.522956618353447e-05, -1.0158418810302106e-05],
        "b": [
            3.2375992565003564e-05,
            5.3863187423952574e-05,
            3.894230137604926e-05,
            -4.4324910121851246e-05,
        ],
        "c": [2.8695208536821948e-06, 5.6165920487738497e-05],
    },
]
TORCH_DELTAS_POLY = [
    {
        "a": [-0.00020004065539858118, -0.00019994888533059196, 0.0001999916372704691],
        "b": [
            0.00020001135577540907,
            0.00020000905156009052,
            0.00020000431179831302,
            -0.00019995959667484797,
        ],
        "c": [-0.00019999536185077993, 0.000200017303593647],
    },
    {
        "a": [0.0001485207311882064, -0.00019678004869927435, -3.644730125129669e-05],
        "b": [
            0.00011559144890538331,
            0.00019255081831121013,
            0.00013833879175778607,
            -0.00015977638968633912,
        ],
        "c": [1.0828207589075323e-05, 0.00019950535730528518],
    },
    {
        "a": [0.00011513148793085293, -0.00015173655195122038, -2.763920601273062e-05],
        "b": [
            8.934462475773675e-05,
            0.00014892664790411292,
            0.00010684899582774632,
            -0.00012346594364842645,
        ],
        "c": [8.379896688087696e-06, 0.00015462420493284057],
    },
    {
        "a": [7.283285136683304e-05, -9.587907945141083e-05, -1.7490453491753044e-05],
        "b": [
            5.6618493562421435e-05,
            9.416110789545185e-05,
            6.761539969610264e-05,
            -7.79178901466615e-05,
        ],
        "c": [5.246441959261272e-06, 9.782955782577929e-05],
    },
    {
        "a": [6.152876005316443e-05, -8.112220833922379e-05, -1.4668475073864595e-05],
        "b": [
            4.784329682605559e-05,
            7.953993968645712e-05,
            5.71172676891718e-05,
            -6.567218482000925e-05,
        ],
        "c": [4.429227896479704e-06, 8.247854312937175e-05],
    },
    {
        "a": [3.693489015121898e-05, -4.859635299148124e-05, -8.788230249967555e-06],
        "b": [
            2.8654143627071527e-05,
            4.74625498271819e-05,
            3.411720328774792e-05,
            -3.917693583455062e-05,
        ],
        "c": [2.647241468645145e-06, 4.928041076546208e-05],
    },
    {
        "a": [3.225309853949199e-05, -4.247901943044141e-05, -7.663085581144369e-06],
        "b": [
            2.4971472279755602e-05,
            4.135365307222916e-05,
            2.9817303035251097e-05,
            -3.420906888740305e-05,
        ],
        "c": [2.324162681727193e-06, 4.300593916639617e-05],
    },
    {
        "a": [2.8518131315102835e-05, -3.737210210896791e-05, -6.7290062044089716e-06],
        "b": [
            2.1950216248733945e-05,
            3.637906442049976e-05,
            2.6343601143424822e-05,
            -3.007954551748071e-05,
        ],
        "c": [2.0299603787354847e-06, 3.805183386862421e-05],
    },
    {
        "a": [1.3578020943594282e-05, -1.7761477005162618e-05, -3.278082928992454e-06],
        "b": [
            1.0414672573566541e-05,
            1.7305136825629397e-05,
            1.2535295777743594e-05,
            -1.4289521317767395e-05,
        ],
        "c": [9.427830236496959e-07, 1.8109716445668944e-05],
    },
    {
        "a": [1.212419740914683e-05, -1.5859171122123428e-05, -2.9169901779591e-06],
        "b": [
            9.296766966593317e-06,
            1.54668154329074e-05,
            1.1182282679517153e-05,
            -1.2727898903275303e-05,
        ],
        "c": [8.239829777934027e-07, 1.612804528050571e-05],
    },
]


def _tree(flat: dict) -> dict:
    return {k: jnp.asarray(np.reshape(v, SHAPES[k]), jnp.float32) for k, v in flat.items()}


def _run(tx: optax.GradientTransformation) -> list[dict]:
    """Per-step updates (= parameter changes) of `tx` on GRADS from PARAMS0, in float32."""
    params = _tree(PARAMS0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for g in GRADS:
        u, state = update(_tree(g), state, params)
        params = optax.apply_updates(params, u)
        out.append({k: np.ravel(np.asarray(v)) for k, v in u.items()})
    return out


def _max_rel_err(ours: list[dict], ref: list[dict]) -> float:
    return max(
        float(np.max(np.abs(o[k] - np.asarray(r[k])) / np.abs(np.asarray(r[k]))))
        for o, r in zip(ours, ref, strict=True)
        for k in SHAPES
    )


def test_matches_torch_adamw_amsgrad_constant_lr():
    assert _max_rel_err(_run(pytorch_adamw(LR, WD, amsgrad=True)), TORCH_DELTAS_CONSTANT) < 3e-6


def test_matches_torch_with_poly_schedule_straddling_epochs():
    # B = 2, N_train = 5, 4 epochs: the torch loop set lr = poly(floor(t * 2 / 5)) per step.
    sched = poly_schedule(LR, 4, epoch_of_step(2, 5))
    assert _max_rel_err(_run(pytorch_adamw(sched, WD, amsgrad=True)), TORCH_DELTAS_POLY) < 3e-6


def test_optax_amsgrad_differs_from_torch():
    # optax maxes the bias-corrected moment: after the large early gradients it stays slower.
    tx = optax.chain(optax.scale_by_amsgrad(), optax.add_decayed_weights(WD), optax.scale(-LR))
    ours = _run(tx)
    # Step 1 agrees up to optax's float32 bias correction (1 - 0.999 loses 1.3e-5 relative).
    assert _max_rel_err(ours[:1], TORCH_DELTAS_CONSTANT[:1]) < 2e-5
    assert _max_rel_err(ours, TORCH_DELTAS_CONSTANT) > 0.3
    last = [np.abs(ours[-1][k]).sum() / np.abs(TORCH_DELTAS_CONSTANT[-1][k]).sum() for k in SHAPES]
    assert max(last) < 0.75  # every parameter moves markedly less than torch's


def test_amsgrad_direction_by_hand():
    """Scalar steps, the formula written out: the max is of the raw second moment."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    g = [3.0, 0.05, 0.05]  # raw nu falls after step 1, so nu_max keeps step 1's raw value
    tx = scale_by_pytorch_amsgrad(b1, b2, eps)
    state = tx.init(jnp.zeros(()))
    m = v = vmax = 0.0
    for t, gt in enumerate(g, start=1):
        u, state = tx.update(jnp.float32(gt), state)
        m = b1 * m + (1 - b1) * gt
        v = b2 * v + (1 - b2) * gt**2
        vmax = max(vmax, v)
        want = (m / (1 - b1**t)) / (math.sqrt(vmax) / math.sqrt(1 - b2**t) + eps)
        np.testing.assert_allclose(float(u), want, rtol=1e-6)
    assert int(state.count) == 3
    # Raw step-1 moment (optax would hold its bias-corrected value, 9.0).
    np.testing.assert_allclose(float(state.nu_max), (1 - b2) * 9.0, rtol=1e-6)
    assert float(state.nu) < float(state.nu_max)


def test_epoch_of_step_floor():
    epoch_of = epoch_of_step(2, 5)
    got = [int(epoch_of(jnp.int32(s))) for s in range(8)]
    assert got == [(s * 2) // 5 for s in range(8)] == [0, 0, 0, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError):
        epoch_of_step(0, 5)


def test_poly_schedule_per_epoch_rounded():
    epochs, ipe = 300, 219
    sched = jax.jit(poly_schedule(LR, epochs, epoch_of_step(1, ipe)))
    for e in (0, 1, 100, 299):
        want = round(LR * (1 - e / epochs) ** 0.9, 8)
        for s in (e * ipe, e * ipe + ipe - 1):  # constant over the epoch
            assert float(sched(jnp.int32(s))) == pytest.approx(want, rel=1e-7)
    assert float(sched(jnp.int32(epochs * ipe))) == 0.0
    assert float(sched(jnp.int32(10 * epochs * ipe))) == 0.0
    # The rounding is visible: 2e-4 * (1 - 1/300)^0.9 = 1.99399...e-4 -> 1.994e-4.
    assert poly_lr(LR, 1, epochs) == 1.994e-4


def test_hold_keeps_marked_leaves_in_every_parameter_shaped_subtree():
    params = {"a": jnp.ones(2), "b": {"c": jnp.ones(3)}}
    tx = optax.chain(optax.add_decayed_weights(0.5), optax.sgd(0.1, momentum=0.9))
    opt = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, new_opt = tx.update(grads, opt, params)
    new = optax.apply_updates(params, updates)
    held = {"a": False, "b": {"c": True}}
    p, o = hold((new, new_opt), (params, opt), held)
    np.testing.assert_array_equal(p["b"]["c"], 1.0)  # held: no decay, no step
    np.testing.assert_allclose(p["a"], 1.0 - 0.1 * 1.5)  # moved: gradient + L2
    trace = find_state(o, optax.TraceState).trace
    np.testing.assert_array_equal(trace["b"]["c"], 0.0)  # momentum not started
    np.testing.assert_allclose(trace["a"], 1.5)


def _normal_like(rng, tree):
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), tree)


def _adamw_run(tx, params, grads, held_steps: int = 0):
    """Parameters after each step; `b` held (not in the step's graph) for `held_steps`."""
    state, out = tx.init(params), []
    for t, g in enumerate(grads):
        updates, new_state = tx.update(g, state, params)
        new = optax.apply_updates(params, updates)
        if t < held_steps:
            new, new_state = hold((new, new_state), (params, state), {"a": False, "b": True})
        params, state = new, new_state
        out.append(params)
    return out


def test_pytorch_adamw_is_optax_adamw_when_every_parameter_steps():
    rng = np.random.default_rng(0)
    params = _normal_like(rng, {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))})
    grads = [_normal_like(rng, params) for _ in range(6)]
    ours = _adamw_run(pytorch_adamw(1e-2, 0.05), params, grads)[-1]
    theirs = _adamw_run(optax.adamw(1e-2, weight_decay=0.05), params, grads)[-1]
    # Same formula; optax forms 1 - 0.999^t from float32 powers (1.3e-5 relative off, see
    # _one_minus_pow), so the moves agree to ~1e-5 of their size, not to float32 rounding.
    for name in params:
        move, gap = ours[name] - params[name], ours[name] - theirs[name]
        assert np.abs(gap).max() <= 1e-4 * np.abs(move).max(), name


def test_pytorch_adamw_counts_steps_per_parameter():
    """A parameter held for the first k steps (PyTorch: `.grad` None, AdamW skips it) moves
    from step k on exactly as a fresh AdamW started at step k on the same gradients: its bias
    corrections count its own steps. optax.adamw's shared count does not (1e-2 relative)."""
    rng = np.random.default_rng(1)
    params = _normal_like(rng, {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))})
    grads = [_normal_like(rng, params) for _ in range(9)]
    k = 5

    def b_moves(tx, grads, held_steps=0):
        run = _adamw_run(tx, params, grads, held_steps)
        return np.stack([np.asarray(p["b"]) for p in run])

    fresh_b = b_moves(pytorch_adamw(1e-2, 0.05), grads[k:])
    held = b_moves(pytorch_adamw(1e-2, 0.05), grads, k)
    np.testing.assert_array_equal(held[:k], np.broadcast_to(params["b"], held[:k].shape))
    np.testing.assert_allclose(held[k:], fresh_b, rtol=1e-6, atol=1e-7)
    shared = b_moves(optax.adamw(1e-2, weight_decay=0.05), grads, k)
    assert np.abs((shared[k:] - held[k:]) / (held[k:] - np.asarray(params["b"]))).max() > 1e-2
