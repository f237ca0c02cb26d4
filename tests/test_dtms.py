"""DTMS transforms (dmaf_jax/dtms.py) against a loop-by-loop numpy reference on hand-written gaps.

Tiny "epochs" of two steps, freeze_epochs = 2 and k_ramp = (1, 3), so the warm-up, the first
active close, the ramp, an unseen modality and the eta growth all happen within eight steps.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common.optim import scale_by_pytorch_amsgrad
from dmaf_jax import dtms

M, B = 3, 2
GARBAGE = 1e6  # in invalid pairs: must never reach the state
KW = dict(mu=0.9, eta0=0.1, eta_growth=1.5, eta_every=2, freeze_epochs=2, k_ramp=(1, 3))


def _step(pairs: dict[tuple[int, int], list[float]], epoch: int, next_epoch: int):
    gaps = np.full((B, M, 3), GARBAGE, np.float32)
    gaps[1, 2, 1] = np.nan  # invalid everywhere below: NaN must not leak either
    valid = np.zeros((B, M), bool)
    for (b, m), terms in pairs.items():
        gaps[b, m] = terms
        valid[b, m] = True
    return gaps, valid, epoch, next_epoch


# Modality 0 lags (large gaps), 1 dominates (small gaps), 2 in between and absent in epoch 2.
SEQ = [
    _step({}, 0, 0),  # no valid pair: the EMA must stay uninitialised
    _step(
        {
            (0, 0): [0.4, 0.8, 0.3],
            (0, 1): [0.1, 0.2, 0.05],
            (0, 2): [0.2, 0.5, 0.2],
            (1, 0): [0.5, 0.9, 0.4],
            (1, 1): [0.1, 0.3, 0.1],
        },
        0,
        1,
    ),
    _step(
        {
            (0, 0): [0.45, 0.7, 0.35],
            (0, 1): [0.08, 0.25, 0.06],
            (0, 2): [0.25, 0.4, 0.15],
            (1, 1): [0.12, 0.2, 0.08],
            (1, 2): [0.3, 0.6, 0.2],
        },
        1,
        1,
    ),
    _step(
        {
            (0, 0): [0.5, 0.9, 0.3],
            (0, 2): [0.2, 0.45, 0.2],
            (1, 0): [0.4, 0.8, 0.25],
            (1, 1): [0.09, 0.22, 0.07],
            (1, 2): [0.22, 0.5, 0.18],
        },
        1,
        2,
    ),
    _step({(0, 0): [0.5, 0.8, 0.3], (0, 1): [0.1, 0.2, 0.05]}, 2, 2),
    _step(
        {
            (0, 0): [0.4, 0.7, 0.3],
            (0, 1): [0.2, 0.3, 0.1],
            (1, 0): [0.6, 0.9, 0.5],
            (1, 1): [0.1, 0.1, 0.1],
        },
        2,
        3,
    ),
    _step(
        {
            (0, 0): [0.5, 0.9, 0.4],
            (0, 1): [0.1, 0.2, 0.1],
            (0, 2): [0.3, 0.5, 0.2],
            (1, 1): [0.1, 0.25, 0.05],
            (1, 2): [0.2, 0.4, 0.25],
        },
        3,
        3,
    ),
    _step(
        {
            (0, 0): [0.45, 0.8, 0.3],
            (0, 2): [0.25, 0.5, 0.2],
            (1, 0): [0.5, 0.85, 0.35],
            (1, 1): [0.15, 0.2, 0.1],
        },
        3,
        4,
    ),
]


def reference(
    seq,
    *,
    mu=0.99,
    eta0=0.01,
    eta_growth=1.5,
    eta_every=100,
    freeze_epochs=20,
    k_ramp=(20, 30),
    k_min=0.5,
    beta_clip=(0.1, 4.0),
    reweight=True,
    scale=True,
    faithful=False,
    clamp=True,
):
    """Sections 10.4-10.7 and 11.12-11.13 written as loops in float64; a dict per step."""
    ema, ready = np.zeros(3), False
    rho_sum, count = np.zeros(M), np.zeros(M)
    beta, k, seen, last_r = np.ones(M), np.ones(M), np.zeros(M, bool), np.zeros(M)
    out = []
    for gaps, valid, e, ne in seq:
        pairs = [(b, m) for b in range(B) for m in range(M) if valid[b, m]]
        read = ema.copy()
        if pairs:
            batch_mean = np.mean([gaps[b, m].astype(np.float64) for b, m in pairs], axis=0)
            if not ready:
                ema, ready = batch_mean.copy(), True
            read = ema.copy()
            ema = mu * ema + (1 - mu) * batch_mean
        g = {(b, m): sum(gaps[b, m, t] / max(read[t], 1e-8) for t in range(3)) for b, m in pairs}
        rho = {}
        for b in range(B):
            ms = [m for m in range(M) if valid[b, m]]
            for m in ms:
                rho[b, m] = g[b, m] / (np.mean([g[b, j] for j in ms]) + 1e-6) - 1
        step_gap, step_rho = np.zeros(M), np.zeros(M)
        for m in range(M):
            bs = [b for b in range(B) if valid[b, m]]
            if bs:
                step_gap[m] = np.mean([g[b, m] for b in bs])
                step_rho[m] = np.mean([rho[b, m] for b in bs])
            for b in bs:
                rho_sum[m] += rho[b, m]
                count[m] += 1
        if ne > e:
            seen = count > 0
            r = np.array([rho_sum[m] / count[m] if seen[m] else 0.0 for m in range(M)])
            last_r = r
            if e >= freeze_epochs - 1:
                nxt = e + 1
                # Faithful: PASSION grows eta at the start of each epoch e with e % every == 0
                # and steps beta at that epoch's end; otherwise 11.13's eta_{e+1}.
                if faithful:
                    eta = eta0 * eta_growth ** (sum(1 for i in range(e + 1) if i % eta_every == 0))
                else:
                    eta = eta0 * eta_growth ** (nxt // eta_every)
                ramp = min(max((nxt - k_ramp[0]) / (k_ramp[1] - k_ramp[0]), 0.0), 1.0)
                if reweight:
                    stepped = beta.copy()
                    for m in range(M):
                        if seen[m]:
                            stepped[m] = beta[m] + eta * r[m]
                            if clamp:
                                stepped[m] = min(max(stepped[m], beta_clip[0]), beta_clip[1])
                    unseen_sq = sum(beta[m] ** 2 for m in range(M) if not seen[m])
                    seen_norm = math.sqrt(sum(stepped[m] ** 2 for m in range(M) if seen[m]))
                    for m in range(M):
                        if seen[m]:
                            beta[m] = stepped[m] * math.sqrt(M - unseen_sq) / seen_norm
                if scale:
                    for m in range(M):
                        if seen[m]:
                            k[m] = max(k_min, 1 - ramp * math.tanh(max(0.0, -r[m])))
            rho_sum, count = np.zeros(M), np.zeros(M)
        out.append(
            dict(
                ema=ema.copy(),
                ema_ready=ready,
                rho_sum=rho_sum.copy(),
                rho_count=count.copy(),
                beta=beta.copy(),
                factors=k.copy(),
                seen=seen.copy(),
                epoch_rho=last_r.copy(),
                step_gap=step_gap,
                step_rho=step_rho,
            )
        )
    return out


def run(seq, **kw) -> list[dtms.DTMSState]:
    tx = dtms.monitor(M, **kw)
    state = tx.init(None)
    states = []
    for gaps, valid, e, ne in seq:
        _, state = tx.update(
            {}, state, dtms_gaps=gaps, dtms_valid=valid, dtms_epoch=e, dtms_next_epoch=ne
        )
        states.append(state)
    return states


def assert_matches(states, refs):
    for i, (s, r) in enumerate(zip(states, refs, strict=True)):
        for name, want in r.items():
            got = np.asarray(getattr(s, name))
            if got.dtype == bool:
                np.testing.assert_array_equal(got, want, err_msg=f"step {i} {name}")
            else:
                assert got.dtype == np.float32, name
                np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6, err_msg=f"{i} {name}")


def test_sequence_matches_reference():
    states = run(SEQ, **KW)
    assert_matches(states, reference(SEQ, **KW))
    for s in states:
        assert all(np.isfinite(np.asarray(x)).all() for x in s)


def test_ema_initialised_from_first_valid_batch_then_read_before_update():
    states = run(SEQ, **KW)
    assert not bool(states[0].ema_ready)
    np.testing.assert_array_equal(np.asarray(states[0].ema), 0.0)
    np.testing.assert_array_equal(np.asarray(states[0].rho_count), 0.0)
    first = np.array([[0.4, 0.8, 0.3], [0.1, 0.2, 0.05], [0.2, 0.5, 0.2], [0.5, 0.9, 0.4],
                      [0.1, 0.3, 0.1]])  # fmt: skip
    mean1 = first.mean(0)  # pooled over the 5 valid pairs, per term
    assert bool(states[1].ema_ready)
    np.testing.assert_allclose(np.asarray(states[1].ema), mean1, rtol=1e-6)
    # Step 1's gaps used the freshly initialised EMA: modality 1's mean over its two pairs.
    want_g1 = np.mean([np.sum(first[i] / mean1) for i in (1, 4)])
    np.testing.assert_allclose(float(states[1].step_gap[1]), want_g1, rtol=1e-6)
    # Step 2 reads the EMA of step 1, then updates it with mu = 0.9.
    second = SEQ[2][0][SEQ[2][1]]
    np.testing.assert_allclose(
        np.asarray(states[2].ema), 0.9 * mean1 + 0.1 * second.mean(0), rtol=1e-6
    )
    gap_m2_b1 = np.sum(np.array([0.3, 0.6, 0.2]) / mean1)
    gap_m2_b0 = np.sum(np.array([0.25, 0.4, 0.15]) / mean1)
    np.testing.assert_allclose(float(states[2].step_gap[2]), (gap_m2_b0 + gap_m2_b1) / 2, rtol=1e-6)


def test_rho_within_sample():
    states = run(SEQ, **KW)
    mean1 = np.asarray(states[1].ema)
    g = {m: np.sum(SEQ[1][0][1, m] / mean1) for m in (0, 1)}  # sample 1: modalities 0 and 1
    rho_b1_m1 = g[1] / ((g[0] + g[1]) / 2 + 1e-6) - 1
    g0 = {m: np.sum(SEQ[1][0][0, m] / mean1) for m in range(3)}
    rho_b0_m1 = g0[1] / (np.mean(list(g0.values())) + 1e-6) - 1
    # Epoch 0 closes at step 1, so its R holds this step's rho; the sums are reset.
    np.testing.assert_allclose(float(states[1].epoch_rho[1]), (rho_b0_m1 + rho_b1_m1) / 2, 1e-5)
    np.testing.assert_array_equal(np.asarray(states[1].rho_sum), 0.0)
    # rho sums to ~0 over a sample's valid modalities (up to the 1e-6 in the denominator).
    assert abs(rho_b1_m1 + (g[0] / ((g[0] + g[1]) / 2 + 1e-6) - 1)) < 1e-5
    # Mid-epoch the sums accumulate: step 2 is the first of epoch 1.
    np.testing.assert_array_equal(np.asarray(states[2].rho_count), [1, 2, 2])


def test_warm_up_freezes_beta_and_k_but_tracks_r():
    states = run(SEQ, **KW)
    for s in states[:3]:  # epoch 0 closes at step 1, frozen (freeze_epochs - 1 = 1)
        np.testing.assert_array_equal(np.asarray(s.beta), 1.0)
        np.testing.assert_array_equal(np.asarray(s.factors), 1.0)
    np.testing.assert_array_equal(np.asarray(states[1].seen), [True, True, True])
    r0 = np.asarray(states[1].epoch_rho)
    assert r0[0] > 0 > r0[1]  # tracked during the warm-up all the same
    assert not np.allclose(np.asarray(states[3].beta), 1.0)  # the close of epoch 1 acts


def test_lagging_modality_gets_larger_beta_dominant_gets_k_below_one():
    states = run(SEQ, **KW)
    s = states[3]  # close of epoch 1, applies from epoch 2
    r = np.asarray(s.epoch_rho)
    assert r[0] > 0 and r[1] < 0
    beta, k = np.asarray(s.beta), np.asarray(s.factors)
    assert beta[0] > 1.0 > beta[1]
    assert k[0] == 1.0 and k[1] < 1.0
    np.testing.assert_allclose(np.linalg.norm(beta), math.sqrt(M), rtol=1e-6)
    # ramp(2) = 0.5 with k_ramp (1, 3): half the full slow-down.
    np.testing.assert_allclose(k[1], 1 - 0.5 * math.tanh(-r[1]), rtol=1e-6)
    # Nothing changes between closes: the values hold for the whole next epoch.
    np.testing.assert_array_equal(np.asarray(states[4].beta), beta)
    np.testing.assert_array_equal(np.asarray(states[4].factors), k)


def test_all_seen_normalisation_is_sqrt_m_beta_over_norm():
    states = run(SEQ, **KW)
    r = np.asarray(states[3].epoch_rho, np.float64)
    stepped = np.clip(1.0 + 0.1 * 1.5 ** (2 // 2) * r, 0.1, 4.0)  # eta_{e+1} = eta_2 = 0.15
    np.testing.assert_allclose(
        np.asarray(states[3].beta), math.sqrt(M) * stepped / np.linalg.norm(stepped), rtol=1e-6
    )


def test_unseen_modality_keeps_beta_and_k():
    states = run(SEQ, **KW)
    before, after = states[4], states[5]  # epoch 2 closes at step 5 without modality 2
    np.testing.assert_array_equal(np.asarray(after.seen), [True, True, False])
    assert float(after.epoch_rho[2]) == 0.0
    assert float(after.beta[2]) == float(before.beta[2])
    assert float(after.factors[2]) == float(before.factors[2])
    assert float(after.beta[0]) != float(before.beta[0])
    np.testing.assert_allclose(np.linalg.norm(np.asarray(after.beta)), math.sqrt(M), rtol=1e-6)


def test_clamps_before_normalisation_and_k_floor():
    kw = dict(KW, eta0=20.0)  # steps far past both beta bounds
    refs = reference(SEQ, **kw)
    states = run(SEQ, **kw)
    assert_matches(states, refs)
    unclamped = reference(SEQ, **kw, clamp=False)
    assert not np.allclose(unclamped[3]["beta"], refs[3]["beta"], rtol=1e-3)
    # Before normalisation beta was [4, 0.1, .]; after: ratio 40 between modalities 0 and 1.
    beta = np.asarray(states[3].beta)
    np.testing.assert_allclose(beta[0] / beta[1], 40.0, rtol=1e-5)
    # k: ramp(3) = 1 at the close of epoch 2, and modality 1's R is below -atanh(0.5).
    r1 = float(states[5].epoch_rho[1])
    assert 1 - math.tanh(-r1) < 0.5
    assert float(states[5].factors[1]) == 0.5
    assert all(float(k) >= 0.5 for s in states for k in s.factors)


def test_faithful_eta_is_one_growth_step_ahead():
    refs = reference(SEQ, **KW, faithful=True)
    states = run(SEQ, **KW, faithful=True)
    assert_matches(states, refs)
    plain = run(SEQ, **KW)
    # every=2: the closes of epochs 1 and 3 use the same eta in both modes, the close of
    # epoch 2 (state 5) a grown one in faithful mode (PASSION grows at the start of epoch 2).
    np.testing.assert_array_equal(np.asarray(states[3].beta), np.asarray(plain[3].beta))
    assert not np.allclose(np.asarray(states[5].beta), np.asarray(plain[5].beta))
    e = jnp.arange(6)
    np.testing.assert_allclose(
        np.asarray(dtms.eta(e, 0.01, 1.5, 100, True)), 0.015, rtol=1e-6
    )  # PASSION: 0.015 from epoch 0
    # The step closing epoch 99 still uses 0.015, the one closing epoch 100 uses 0.0225.
    np.testing.assert_allclose(
        np.asarray(dtms.close_eta(jnp.array([99, 100]), 0.01, 1.5, 100, True)),
        [0.015, 0.0225],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(dtms.close_eta(jnp.array([98, 99]), 0.01, 1.5, 100, False)),
        [0.01, 0.015],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(dtms.eta(jnp.array([0, 99, 100, 200]), 0.01, 1.5, 100, False)),
        [0.01, 0.01, 0.015, 0.0225],
        rtol=1e-6,
    )


@pytest.mark.parametrize("reweight,scale", [(False, True), (True, False)])
def test_ablations_freeze_one_side(reweight, scale):
    states = run(SEQ, **KW, reweight=reweight, scale=scale)
    assert_matches(states, reference(SEQ, **KW, reweight=reweight, scale=scale))
    beta, k = np.asarray(states[-1].beta), np.asarray(states[-1].factors)
    if reweight:
        assert not np.allclose(beta, 1.0)
    else:
        np.testing.assert_array_equal(beta, 1.0)
    if scale:
        assert k.min() < 1.0
    else:
        np.testing.assert_array_equal(k, 1.0)


def test_updates_pass_through_and_shapes_are_checked():
    tx = dtms.monitor(M)
    upd = {"w": jnp.arange(4.0)}
    gaps, valid, e, ne = SEQ[1]
    out, _ = tx.update(
        upd, tx.init(None), dtms_gaps=gaps, dtms_valid=valid, dtms_epoch=e, dtms_next_epoch=ne
    )
    np.testing.assert_array_equal(np.asarray(out["w"]), np.arange(4.0))
    with pytest.raises(ValueError, match="dtms_gaps"):
        tx.update(
            upd,
            tx.init(None),
            dtms_gaps=gaps[:, :2],
            dtms_valid=valid[:, :2],
            dtms_epoch=e,
            dtms_next_epoch=ne,
        )


def test_one_compilation_serves_every_mask_and_epoch():
    tx = dtms.monitor(M, **KW)
    traces = []

    def step(state, gaps, valid, e, ne):
        traces.append(1)
        return tx.update(
            {}, state, dtms_gaps=gaps, dtms_valid=valid, dtms_epoch=e, dtms_next_epoch=ne
        )[1]

    jstep = jax.jit(step)
    state = tx.init(None)
    jitted = []
    for gaps, valid, e, ne in SEQ:
        state = jstep(state, gaps, valid, jnp.int32(e), jnp.int32(ne))
        jitted.append(state)
    assert len(traces) == 1
    assert_matches(jitted, reference(SEQ, **KW))


# The optimiser chain: the factor scales the encoder's update after AMSGrad.

ENC_KEY = "encoder"


def _params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        ENC_KEY: {
            "kernel": jax.random.normal(k1, (M, 2, 3)),
            "bias": jax.random.normal(k2, (M, 3)),
        },
        "decoder": {"kernel": jax.random.normal(k3, (3, 2))},
    }


def _grads(step):
    return jax.tree.map(
        lambda p: 10.0 ** (1 - step) * jax.random.normal(jax.random.key(step), p.shape),
        _params(jax.random.key(0)),
    )


def _extras(step):
    gaps, valid, _, _ = SEQ[1]
    return dict(dtms_gaps=gaps, dtms_valid=valid, dtms_epoch=step, dtms_next_epoch=step)


def test_factor_scales_encoder_update_after_amsgrad():
    k = jnp.array([1.0, 0.5, 0.75])
    lr, wd = 1e-3, 1e-4
    tx = dtms.make_optimizer(learning_rate=lr, num_modalities=M, weight_decay=wd, **KW)
    params = _params(jax.random.key(0))
    sa = sb = tx.init(params)
    pa = pb = params
    update = jax.jit(tx.update)
    for step in range(3):
        g = _grads(step)
        ua, sa = update(g, sa, pa, dtms_factors=jnp.ones(M), **_extras(step))
        ub, sb = update(g, sb, pb, dtms_factors=k, **_extras(step))
        for name in ("kernel", "bias"):
            # update = -lr (k u + wd p): the decay part is not scaled.
            da = ua[ENC_KEY][name] + lr * wd * pa[ENC_KEY][name]
            db = ub[ENC_KEY][name] + lr * wd * pb[ENC_KEY][name]
            kk = k.reshape((M,) + (1,) * (da.ndim - 1))
            np.testing.assert_allclose(np.asarray(db), np.asarray(kk * da), rtol=1e-5, atol=1e-12)
            assert float(jnp.abs(da[1]).min()) > 1e-5  # a real step, not ~0
        # Other leaves: identical updates (same parameters and moments in both runs).
        np.testing.assert_array_equal(
            np.asarray(ua["decoder"]["kernel"]), np.asarray(ub["decoder"]["kernel"])
        )
        pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
        # AMSGrad's moments see the same gradients: the factor acts after them.
        jax.tree.map(
            lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), sa[1], sb[1]
        )


def test_factor_on_gradients_would_cancel_in_amsgrad():
    """Why the factor goes after the optimiser (section 10 item 6)."""
    amsgrad = scale_by_pytorch_amsgrad()
    g = _grads(0)[ENC_KEY]["kernel"]
    ua, _ = amsgrad.update(g, amsgrad.init(g))
    ub, _ = amsgrad.update(0.5 * g, amsgrad.init(g))
    np.testing.assert_allclose(np.asarray(ub), np.asarray(ua), rtol=1e-6)


def test_default_factors_are_the_states_and_find_state():
    tx = dtms.make_optimizer(learning_rate=1e-3, num_modalities=M, **KW)
    params = _params(jax.random.key(0))
    state = tx.init(params)
    found = dtms.find_state(state)
    assert isinstance(found, dtms.DTMSState)
    assert dtms.find_state((optax.EmptyState(), (state,))) is found
    assert dtms.find_state(optax.adam(1e-3).init(params)) is None
    k = jnp.array([0.5, 1.0, 0.7])
    state = (found._replace(factors=k),) + state[1:]
    g = _grads(0)
    implicit, s1 = tx.update(g, state, params, **_extras(0))
    explicit, s2 = tx.update(g, state, params, dtms_factors=k, **_extras(0))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), implicit, explicit)
    ones, _ = tx.update(g, state, params, dtms_factors=jnp.ones(M), **_extras(0))
    assert not np.allclose(np.asarray(implicit[ENC_KEY]["bias"]), np.asarray(ones[ENC_KEY]["bias"]))
    # The monitor's state moved with the step (its gaps were fed through the chain).
    assert bool(dtms.find_state(s1).ema_ready)


def test_scale_encoder_updates_nested_key_and_errors():
    tx = dtms.scale_encoder_updates(("params", ENC_KEY))
    upd = {"params": _params(jax.random.key(1))}
    k = jnp.array([2.0, 0.0, 1.0])
    out, _ = tx.update(upd, tx.init(upd), dtms_factors=k)
    want = np.asarray(upd["params"][ENC_KEY]["bias"]) * np.asarray(k)[:, None]
    np.testing.assert_array_equal(np.asarray(out["params"][ENC_KEY]["bias"]), want)
    np.testing.assert_array_equal(
        np.asarray(out["params"]["decoder"]["kernel"]),
        np.asarray(upd["params"]["decoder"]["kernel"]),
    )
    with pytest.raises(ValueError, match="no update leaf"):
        dtms.scale_encoder_updates("missing").update(upd, None, dtms_factors=k)
    with pytest.raises(ValueError, match="leading"):
        tx.update(upd, None, dtms_factors=jnp.ones(4))
