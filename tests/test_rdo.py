import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from famf_jax import rdo

CFG = rdo.RDOConfig(buffer_size=16)


def test_clamps():
    c = CFG
    a = lambda a1, a2, al, ga: np.asarray(rdo.clamp_actions(c, jnp.array([a1, a2]), al, ga))
    np.testing.assert_array_equal(a(0, 1, 0.1, 0.1), [2, 2])  # at the lower bounds: no decrease
    np.testing.assert_array_equal(a(3, 4, 0.1, 0.1), [3, 4])  # increases still allowed
    np.testing.assert_array_equal(a(4, 3, 0.9, 3.9), [2, 2])  # at the upper bounds: no increase
    np.testing.assert_array_equal(a(0, 0, 0.9, 3.9), [0, 0])
    np.testing.assert_array_equal(a(0, 4, 0.5, 2.0), [0, 4])


def test_select_updates_alpha_gamma_only_when_active():
    st = rdo.init_state(CFG, jax.random.key(0), 6)
    s = jnp.array([0.1, 0.9, 0.3, 0.2, 3.0, 1.0])
    sel = rdo.select(CFG, st, s, jnp.array(True))
    d = np.asarray(CFG.action_deltas)
    a = np.asarray(sel.actions)
    np.testing.assert_allclose(float(sel.alpha0), 0.5 + d[a[0]], rtol=1e-6)
    np.testing.assert_allclose(float(sel.gamma), 2.0 + d[a[1]], rtol=1e-6)
    off = rdo.select(CFG, st, s, jnp.array(False))
    assert float(off.alpha0) == 0.5 and float(off.gamma) == 2.0
    np.testing.assert_array_equal(np.asarray(off.actions), a)  # same key, same step


def _actions(cfg, st, s, steps):
    return np.asarray(
        jax.vmap(lambda t: rdo.select(cfg, st._replace(step=t, active_steps=t), s, False).actions)(
            steps
        )
    )


def test_exploration_rates():
    s = jnp.zeros(6)
    faithful = dataclasses.replace(CFG, faithful=True)
    st = rdo.init_state(faithful, jax.random.key(1), 6)
    acts = _actions(faithful, st, s, jnp.arange(4000))
    q1, q2 = rdo._qnet(faithful).apply({"params": st.q_params}, s[None])
    for head, q in enumerate((q1, q2)):
        g = int(jnp.argmax(q))
        # Explored with probability Phi(0.4) = 0.655, uniformly over 0..3 (never 4).
        p_differ = 0.655 * (1.0 if g == 4 else 0.75)
        np.testing.assert_allclose((acts[:, head] != g).mean(), p_differ, atol=0.03)
        assert set(np.unique(acts[:, head])) <= {0, 1, 2, 3, g}
    std = rdo.RDOConfig(epsilon_start=1.0, epsilon_end=0.0, epsilon_decay_steps=100)
    st = rdo.init_state(std, jax.random.key(2), 6)
    q1, _ = rdo._qnet(std).apply({"params": st.q_params}, s[None])
    late = _actions(std, st, s, jnp.arange(200, 400))
    np.testing.assert_array_equal(late[:, 0], int(jnp.argmax(q1)))  # epsilon has reached 0
    keys = jax.random.split(jax.random.key(3), 2000)
    early = jax.vmap(lambda k: rdo.select(std, st._replace(key=k), s, False).actions)(keys)
    early = np.asarray(early)  # step 0: epsilon 1, uniform over all five actions
    assert set(np.unique(early[:, 0])) == {0, 1, 2, 3, 4}


def test_buffer_wraps_around():
    buf = rdo.init_state(dataclasses.replace(CFG, buffer_size=3), jax.random.key(0), 2).buffer
    for i in range(5):
        s = jnp.full(2, float(i))
        buf = rdo.push(buf, s, jnp.array([i, i]), float(i), s + 1, jnp.array(True))
    buf = rdo.push(buf, jnp.full(2, 99.0), jnp.array([0, 0]), 99.0, jnp.zeros(2), jnp.array(False))
    assert int(buf.position) == 2 and int(buf.count) == 3
    np.testing.assert_array_equal(np.asarray(buf.reward), [3.0, 4.0, 2.0])
    np.testing.assert_array_equal(np.asarray(buf.next_state[:, 0]), [4.0, 5.0, 3.0])


def test_sample_indices_are_distinct_and_filled():
    for seed in range(20):
        idx = np.asarray(rdo.sample_indices(jax.random.key(seed), jnp.array(10), 32, 8))
        assert len(set(idx)) == 8 and idx.max() < 10


def hand_q(params, s, softmax):
    h = np.maximum(s @ params["fc_0"]["kernel"] + params["fc_0"]["bias"], 0)
    h = np.maximum(h @ params["fc_2"]["kernel"] + params["fc_2"]["bias"], 0)
    heads = [h @ params[n]["kernel"] + params[n]["bias"] for n in ("fc1", "fc2")]
    if softmax:
        heads = [np.exp(q) / np.exp(q).sum(-1, keepdims=True) for q in heads]
    return heads


def test_dqn_loss_and_update_by_hand(rng):
    for faithful in (True, False):
        cfg = dataclasses.replace(CFG, faithful=faithful)
        st = rdo.init_state(cfg, jax.random.key(3), 6)
        target = jax.tree_util.tree_map(lambda x: x * 0.5, st.q_params)
        params = jax.tree_util.tree_map(np.asarray, st.q_params)
        tparams = jax.tree_util.tree_map(np.asarray, target)
        s = rng.normal(size=(8, 6)).astype(np.float32)
        s2 = rng.normal(size=(8, 6)).astype(np.float32)
        a = rng.integers(0, 5, (8, 2)).astype(np.int32)
        r = rng.normal(size=8).astype(np.float32)
        q = hand_q(params, s, faithful)
        qn = hand_q(params if faithful else tparams, s2, faithful)
        want = sum(
            np.mean((q[h][np.arange(8), a[:, h]] - (r + 0.99 * qn[h].max(-1))) ** 2)
            for h in range(2)
        )
        got = rdo.dqn_loss(cfg, st.q_params, target, (s, a, r, s2))
        np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # One Adam step from a fresh state moves each parameter by -lr * g / (|g| + eps).
    cfg = CFG
    st = rdo.init_state(cfg, jax.random.key(4), 6)
    buf = st.buffer
    for i in range(9):
        buf = rdo.push(
            buf,
            jnp.asarray(s[i % 8]),
            jnp.asarray(a[i % 8]),
            float(r[i % 8]),
            jnp.asarray(s2[i % 8]),
            jnp.array(True),
        )
    st = st._replace(buffer=buf)
    key = jax.random.key(5)
    new_params, _, _ = rdo._learn(cfg, st, key)
    idx = rdo.sample_indices(key, buf.count, cfg.buffer_size, cfg.batch_size)
    batch = (buf.state[idx], buf.action[idx], buf.reward[idx], buf.next_state[idx])
    g = jax.grad(rdo.dqn_loss, argnums=1)(cfg, st.q_params, st.target_params, batch)
    expect = jax.tree_util.tree_map(
        lambda p, g: p - cfg.learning_rate * g / (jnp.abs(g) + 1e-8), st.q_params, g
    )
    for x, y in zip(jax.tree_util.tree_leaves(new_params), jax.tree_util.tree_leaves(expect)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-9)


def test_transform_pushes_one_step_late_and_passes_gradients():
    tx = optax.chain(rdo.transform(CFG, 6), optax.sgd(0.1))
    params = {"w": jnp.ones(3)}
    opt = tx.init(params)
    grads = {"w": jnp.array([1.0, 2.0, 3.0])}
    states = []
    for t in range(3):
        st = rdo.find_state(opt)
        s = jnp.full(6, float(t))
        states.append(s)
        sel = rdo.select(CFG, st, s, jnp.array(True))
        counts = jnp.array([1.0, 0.0, 2.0, 1.0])  # tp, fp, tn, fn
        upd, opt = tx.update(
            grads,
            opt,
            params,
            rdo_selection=sel,
            rdo_state=s,
            rdo_counts=counts,
            rdo_new_epoch=jnp.array(t == 0),
        )
        np.testing.assert_allclose(np.asarray(upd["w"]), -0.1 * np.asarray(grads["w"]))
        st = rdo.find_state(opt)
        assert float(st.alpha0) == float(sel.alpha0) and int(st.buffer.count) == t
    buf = rdo.find_state(opt).buffer
    np.testing.assert_array_equal(np.asarray(buf.state[:2, 0]), [0.0, 1.0])
    np.testing.assert_array_equal(np.asarray(buf.next_state[:2, 0]), [1.0, 2.0])
    # reward = 0.5 F1 + 0.5 (rec + spe - 1) with tp=1, fp=0, tn=2, fn=1
    np.testing.assert_allclose(float(buf.reward[0]), 0.5 * (2 / 3) + 0.5 * (0.5 + 1 - 1), 1e-6)


def test_epsilon_counts_only_active_steps():
    # Exploration is spent when actions move alpha/gamma: 30 inactive steps (the warm-up) leave
    # epsilon at its start, the 5 active ones after them advance it.
    std = rdo.RDOConfig(epsilon_start=1.0, epsilon_end=0.0, epsilon_decay_steps=10)
    active = [t >= 30 for t in range(35)]
    states, _ = _run_transform(std, 35, [[1, 0, 2, 1]] * 35, [False] * 35, active)
    assert int(states[29].active_steps) == 0
    assert int(states[-1].step) == 35 and int(states[-1].active_steps) == 5
    np.testing.assert_allclose(float(rdo.epsilon(std, states[-1].active_steps)), 0.5)


def test_faithful_reward_uses_cumulative_tn():
    counts = jnp.array([1.0, 1.0, 2.0, 0.0])
    assert float(rdo.batch_reward(counts, jnp.array(6.0))) > float(rdo.batch_reward(counts))


def _run_transform(cfg, steps, counts, new_epoch, active=None):
    """Drive the transform for `steps` steps with per-step counts, epoch starts and activity
    (default: always active); returns the states and the selections made."""
    active = [True] * steps if active is None else active
    tx = rdo.transform(cfg, 6)
    params = {"w": jnp.ones(3)}
    opt = tx.init(params)
    states, sels = [], []
    for t in range(steps):
        st = rdo.find_state(opt)
        s = jnp.full(6, float(t))
        sel = rdo.select(cfg, st, s, jnp.array(active[t]))
        sels.append(sel)
        _, opt = tx.update(
            params,
            opt,
            params,
            rdo_selection=sel,
            rdo_state=s,
            rdo_counts=jnp.asarray(counts[t], jnp.float32),
            rdo_new_epoch=jnp.array(new_epoch[t]),
        )
        states.append(rdo.find_state(opt))
    return states, sels


def test_buffer_holds_the_pending_transition_not_the_current_one():
    counts = [[1, 0, 2, 1], [0, 2, 1, 1], [2, 1, 0, 0], [1, 1, 1, 1]]  # a different reward each
    states, sels = _run_transform(CFG, 4, counts, [True, False, False, False])
    buf = states[-1].buffer
    for t in range(3):  # step t + 1 pushed step t's transition
        np.testing.assert_array_equal(np.asarray(buf.action[t]), np.asarray(sels[t].actions))
        want = float(rdo.batch_reward(jnp.asarray(counts[t], jnp.float32)))
        assert float(buf.reward[t]) == want
        assert float(buf.state[t, 0]) == t and float(buf.next_state[t, 0]) == t + 1
    assert len({float(buf.reward[t]) for t in range(3)}) == 3


def test_faithful_cumulative_true_negatives_reset_each_epoch():
    cfg = dataclasses.replace(CFG, faithful=True)
    tn = [2, 1, 3, 4, 5]
    counts = [[1, 1, n, 0] for n in tn]
    states, _ = _run_transform(cfg, 5, counts, [True, False, False, True, False])
    assert [float(s.cumulative_tn) for s in states] == [2, 3, 6, 4, 9]


def test_target_network_refreshed_every_target_every_steps():
    cfg = dataclasses.replace(CFG, batch_size=2, target_every=3)
    counts = [[1, 0, 2, 1], [0, 2, 1, 1], [2, 1, 0, 0], [1, 1, 1, 1]] * 2
    states, _ = _run_transform(cfg, 8, counts, [False] * 8)

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    for t, st in enumerate(states):
        step = t + 1
        if step % 3 == 0:
            assert same(st.target_params, st.q_params), step
        elif step > 4:  # the Q-network has learnt since the last refresh
            assert not same(st.target_params, st.q_params), step


def test_faithful_dqn_target_is_differentiated(rng):
    # B13: the original's target comes from the online network without detaching it.
    cfg = dataclasses.replace(CFG, faithful=True)
    st = rdo.init_state(cfg, jax.random.key(3), 6)
    s = rng.normal(size=(8, 6)).astype(np.float32)
    s2 = rng.normal(size=(8, 6)).astype(np.float32)
    a = rng.integers(0, 5, (8, 2)).astype(np.int32)
    r = rng.normal(size=8).astype(np.float32)
    net = rdo._qnet(cfg)

    def by_hand(p, stop: bool):
        q = net.apply({"params": p}, s)
        qn = net.apply({"params": p}, s2)
        if stop:
            qn = jax.lax.stop_gradient(qn)
        return sum(
            jnp.mean((q[h][jnp.arange(8), a[:, h]] - (r + 0.99 * qn[h].max(-1))) ** 2)
            for h in range(2)
        )

    got = jax.grad(rdo.dqn_loss, argnums=1)(cfg, st.q_params, st.target_params, (s, a, r, s2))
    free = jax.grad(by_hand)(st.q_params, False)
    stopped = jax.grad(by_hand)(st.q_params, True)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(free)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-8)
    assert any(
        not np.allclose(np.asarray(x), np.asarray(z), rtol=1e-3)
        for x, z in zip(jax.tree.leaves(got), jax.tree.leaves(stopped))
    )
