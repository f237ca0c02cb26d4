"""RDO: a DQN agent that moves the focal loss's alpha and gamma during training (spec section 3).

Shape of one training step (everything inside the jitted step):

1. `state_vector(probs, labels)`: the batch's P(malignant) (stop_gradient) and class counts, B + 2.
2. `select(rdo_state, s, active)`: greedy/exploratory actions for the alpha and gamma heads,
   clamped, and the new (alpha0, gamma) when `active` (epoch >= warm-up; faithful: epoch >
   warm-up, B15). The step's loss
   already uses them, as in the original.
3. The loss, its gradients, and the optimiser. `transform(cfg)` is the stateful optax
   `GradientTransformationExtraArgs` holding the agent; its `update` receives the step's
   selection, state vector and reward as keyword extras, passes the gradients through unchanged,
   stores the new alpha/gamma, pushes the *previous* step's transition with this step's state as
   its next state, and runs one DQN update once the buffer holds more than `batch_size`.

Pushing one step late needs no extra forward passes; the original runs a CAM pass and a forward
on a look-ahead batch after the optimiser step to get `next_state` (and gets stale CAMs, B9/B10).
Here the next state is the next batch's pre-step state, which is what the agent acts on next.

Faithful (B8, B12, B13): Q-heads softmaxed, no target network, target not detached, exploration
`randn < 0.4` (65.5 %) with random actions from 0..3, specificity from the epoch-cumulative true
negatives. Standard: linear heads, an epsilon schedule over all 5 actions, a target network
refreshed every `target_every` steps, `stop_gradient` on the target, the batch's own specificity.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from common import optim
from famf_jax.layers import torch_uniform_init

FAITHFUL_EXPLORE_THRESHOLD = 0.4  # randn < 0.4 happens with probability Phi(0.4) = 0.655


@dataclasses.dataclass(frozen=True)
class RDOConfig:
    faithful: bool = False
    action_deltas: tuple[float, ...] = (-0.002, -0.001, 0.0, 0.001, 0.002)
    alpha0_init: float = 0.5
    gamma_init: float = 2.0
    alpha_bounds: tuple[float, float] = (0.1, 0.9)
    gamma_bounds: tuple[float, float] = (0.1, 3.9)
    hidden: tuple[int, ...] = (128, 256)
    learning_rate: float = 1e-5
    discount: float = 0.99
    buffer_size: int = 10_000
    batch_size: int = 8
    epsilon_start: float = 1.0  # standard DQN only: linear schedule
    epsilon_end: float = 0.05
    epsilon_decay_steps: int = 2_000
    target_every: int = 100


class TorchDense(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        init = torch_uniform_init(x.shape[-1])
        kernel = self.param("kernel", init, (x.shape[-1], self.features))
        bias = self.param("bias", init, (self.features,))
        return x @ kernel + bias


class QNetwork(nn.Module):
    """Linear(d->128) ReLU Linear(128->256) ReLU, two heads of 5 (PyTorch `fc`, `fc1`, `fc2`)."""

    hidden: tuple[int, ...] = (128, 256)
    num_actions: int = 5
    softmax_heads: bool = False

    @nn.compact
    def __call__(self, s: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = s
        for i, h in enumerate(self.hidden):
            x = nn.relu(TorchDense(h, name=f"fc_{2 * i}")(x))
        q1 = TorchDense(self.num_actions, name="fc1")(x)
        q2 = TorchDense(self.num_actions, name="fc2")(x)
        if self.softmax_heads:
            q1, q2 = jax.nn.softmax(q1, -1), jax.nn.softmax(q2, -1)
        return q1, q2


def init_qnetwork(net: QNetwork, key: jax.Array, state_dim: int):
    return net.init(key, jnp.zeros((1, state_dim), jnp.float32))["params"]


class Buffer(NamedTuple):
    """Replay ring buffer of fixed size, on the device."""

    state: jax.Array  # (N, D)
    action: jax.Array  # (N, 2) int32
    reward: jax.Array  # (N,)
    next_state: jax.Array  # (N, D)
    position: jax.Array  # () int32, next slot to write
    count: jax.Array  # () int32, filled slots


class Selection(NamedTuple):
    actions: jax.Array  # (2,) int32, after clamping
    alpha0: jax.Array
    gamma: jax.Array
    active: jax.Array  # () bool: alpha0/gamma moved this step


class RDOState(NamedTuple):
    alpha0: jax.Array
    gamma: jax.Array
    q_params: dict
    q_opt_state: optax.OptState
    target_params: dict
    buffer: Buffer
    pending_state: jax.Array  # the previous step's transition, pushed when the next state is known
    pending_action: jax.Array
    pending_reward: jax.Array
    pending_valid: jax.Array
    cumulative_tn: jax.Array  # faithful B8 only: true negatives so far in this epoch
    key: jax.Array  # raw uint32 key data
    step: jax.Array
    dqn_loss: jax.Array  # last DQN loss, for logging
    active_steps: jax.Array  # () int32: steps whose actions moved alpha/gamma (epsilon's clock)


def state_vector(probs: jax.Array, labels: jax.Array) -> jax.Array:
    """(B, 2) probabilities and (B,) labels -> (B + 2,): P(class 1) then the two class counts."""
    n1 = jnp.sum(labels == 1).astype(jnp.float32)
    n0 = labels.shape[0] - n1
    return jnp.concatenate([jax.lax.stop_gradient(probs[:, 1]), jnp.stack([n0, n1])])


def batch_counts(probs: jax.Array, labels: jax.Array) -> jax.Array:
    """(tp, fp, tn, fn) of argmax predictions, class 1 positive."""
    pred = jnp.argmax(probs, -1)
    pos, neg = labels == 1, labels == 0
    return jnp.stack(
        [
            jnp.sum((pred == 1) & pos),
            jnp.sum((pred == 1) & neg),
            jnp.sum((pred == 0) & neg),
            jnp.sum((pred == 0) & pos),
        ]
    ).astype(jnp.float32)


def batch_reward(counts: jax.Array, tn_for_specificity: jax.Array | None = None) -> jax.Array:
    """0.5 F1_b + 0.5 (recall_b + specificity_b - 1) with the original's 1e-8 guards.

    `tn_for_specificity` replaces the numerator of the specificity (faithful B8 passes the
    epoch-cumulative tn); the denominator is always the batch's tn_b + fp_b.
    """
    tp, fp, tn, fn = counts
    pre = tp / (tp + fp + 1e-8)
    rec = tp / (tp + fn + 1e-8)
    f1 = 2 * pre * rec / (pre + rec + 1e-8)
    tn_num = tn if tn_for_specificity is None else tn_for_specificity
    spe = tn_num / (tn + fp + 1e-8)
    return 0.5 * f1 + 0.5 * (rec + spe - 1.0)


def _qnet(cfg: RDOConfig) -> QNetwork:
    return QNetwork(cfg.hidden, len(cfg.action_deltas), softmax_heads=cfg.faithful)


def _q_optimizer(cfg: RDOConfig) -> optax.GradientTransformation:
    return optax.adam(cfg.learning_rate, b1=0.9, b2=0.999)


def init_state(cfg: RDOConfig, key: jax.Array, state_dim: int) -> RDOState:
    k_net, k_run = jax.random.split(key)
    q_params = init_qnetwork(_qnet(cfg), k_net, state_dim)
    n = cfg.buffer_size
    f32 = jnp.float32
    buf = Buffer(
        jnp.zeros((n, state_dim), f32),
        jnp.zeros((n, 2), jnp.int32),
        jnp.zeros(n, f32),
        jnp.zeros((n, state_dim), f32),
        jnp.zeros((), jnp.int32),
        jnp.zeros((), jnp.int32),
    )
    return RDOState(
        alpha0=jnp.asarray(cfg.alpha0_init, f32),
        gamma=jnp.asarray(cfg.gamma_init, f32),
        q_params=q_params,
        q_opt_state=_q_optimizer(cfg).init(q_params),
        target_params=jax.tree_util.tree_map(jnp.copy, q_params),  # own buffers (donation)
        buffer=buf,
        pending_state=jnp.zeros(state_dim, f32),
        pending_action=jnp.zeros(2, jnp.int32),
        pending_reward=jnp.zeros((), f32),
        pending_valid=jnp.zeros((), bool),
        cumulative_tn=jnp.zeros((), f32),
        key=jax.random.key_data(k_run),  # raw uint32: checkpointable as a plain array
        step=jnp.zeros((), jnp.int32),
        dqn_loss=jnp.zeros((), f32),
        active_steps=jnp.zeros((), jnp.int32),
    )


def epsilon(cfg: RDOConfig, step: jax.Array) -> jax.Array:
    """Linear decay over the first `epsilon_decay_steps` *active* steps: exploration before
    the actions move alpha and gamma would be spent for nothing."""
    frac = jnp.minimum(step / max(cfg.epsilon_decay_steps, 1), 1.0)
    return cfg.epsilon_start + frac * (cfg.epsilon_end - cfg.epsilon_start)


def clamp_actions(cfg: RDOConfig, actions: jax.Array, alpha0: jax.Array, gamma: jax.Array):
    """Clamp action indices at the bounds (spec 3.2): no further decrease below the lower bound,
    no increase above the upper; the clamped indices are what the buffer stores."""
    keep = len(cfg.action_deltas) // 2
    a1, a2 = actions[0], actions[1]
    lo_a, hi_a = cfg.alpha_bounds
    lo_g, hi_g = cfg.gamma_bounds
    a1 = jnp.where(((alpha0 <= lo_a) & (a1 < keep)) | ((alpha0 >= hi_a) & (a1 > keep)), keep, a1)
    a2 = jnp.where(((gamma <= lo_g) & (a2 < keep)) | ((gamma >= hi_g) & (a2 > keep)), keep, a2)
    return jnp.stack([a1, a2]).astype(jnp.int32)


def select(cfg: RDOConfig, st: RDOState, s: jax.Array, active: jax.Array) -> Selection:
    """Actions for state `s` (B + 2,) and the alpha0/gamma the step's loss uses.

    Deterministic given `st.key` and `st.step`, so `update` can be given its result.
    """
    q1, q2 = _qnet(cfg).apply({"params": st.q_params}, s[None])
    greedy = jnp.stack([jnp.argmax(q1[0]), jnp.argmax(q2[0])])
    k_explore, k_action = jax.random.split(jax.random.fold_in(st.key, st.step))
    n = len(cfg.action_deltas)
    if cfg.faithful:
        explore = jax.random.normal(k_explore, (2,)) < FAITHFUL_EXPLORE_THRESHOLD
        random_action = jax.random.randint(k_action, (2,), 0, n - 1)  # randint(0, 4): never 4
    else:
        explore = jax.random.uniform(k_explore, (2,)) < epsilon(cfg, st.active_steps)
        random_action = jax.random.randint(k_action, (2,), 0, n)
    actions = clamp_actions(cfg, jnp.where(explore, random_action, greedy), st.alpha0, st.gamma)
    deltas = jnp.asarray(cfg.action_deltas, jnp.float32)
    alpha0 = jnp.where(active, st.alpha0 + deltas[actions[0]], st.alpha0)
    gamma = jnp.where(active, st.gamma + deltas[actions[1]], st.gamma)
    return Selection(actions, alpha0, gamma, jnp.asarray(active, bool))


def push(buf: Buffer, s, a, r, s_next, valid: jax.Array) -> Buffer:
    """Write one transition at `position` if `valid` (a no-op write otherwise)."""
    i = buf.position

    def put(arr, x):
        return arr.at[i].set(jnp.where(valid, x, arr[i]))

    n = buf.state.shape[0]
    inc = valid.astype(jnp.int32)
    return Buffer(
        put(buf.state, s),
        put(buf.action, a),
        put(buf.reward, r),
        put(buf.next_state, s_next),
        (i + inc) % n,
        jnp.minimum(buf.count + inc, n),
    )


def sample_indices(key: jax.Array, count: jax.Array, capacity: int, k: int) -> jax.Array:
    """k distinct filled slots, uniformly (top-k of uniform scores, unfilled slots last)."""
    scores = jnp.where(jnp.arange(capacity) < count, jax.random.uniform(key, (capacity,)), -1.0)
    return jax.lax.top_k(scores, k)[1]


def dqn_loss(cfg: RDOConfig, q_params, target_params, batch) -> jax.Array:
    """Sum over the two heads of mean_b (Q(s)[a] - (r + discount * max Q'(s')))^2."""
    s, a, r, s_next = batch
    net = _qnet(cfg)
    q = net.apply({"params": q_params}, s)
    if cfg.faithful:  # B13: the online network, target not detached
        q_next = net.apply({"params": q_params}, s_next)
    else:
        q_next = jax.lax.stop_gradient(net.apply({"params": target_params}, s_next))
    loss = 0.0
    for head in range(2):
        q_sa = jnp.take_along_axis(q[head], a[:, head : head + 1], axis=-1)[:, 0]
        target = r + cfg.discount * q_next[head].max(-1)
        loss = loss + jnp.mean((q_sa - target) ** 2)
    return loss


def _learn(cfg: RDOConfig, st: RDOState, key: jax.Array):
    buf = st.buffer
    idx = sample_indices(key, buf.count, cfg.buffer_size, cfg.batch_size)
    batch = (buf.state[idx], buf.action[idx], buf.reward[idx], buf.next_state[idx])
    loss, grads = jax.value_and_grad(dqn_loss, argnums=1)(cfg, st.q_params, st.target_params, batch)
    updates, opt_state = _q_optimizer(cfg).update(grads, st.q_opt_state, st.q_params)
    ready = buf.count > cfg.batch_size

    def pick(new, old):
        return jax.tree_util.tree_map(lambda n, o: jnp.where(ready, n, o), new, old)

    params = pick(optax.apply_updates(st.q_params, updates), st.q_params)
    return params, pick(opt_state, st.q_opt_state), jnp.where(ready, loss, st.dqn_loss)


def transform(
    cfg: RDOConfig, state_dim: int, seed: int = 0
) -> optax.GradientTransformationExtraArgs:
    """The agent as an optax transform: gradients pass through; the agent learns on the side.

    Extras of `update`: rdo_selection (Selection of this step), rdo_state (the state vector),
    rdo_counts (tp, fp, tn, fn of the batch), rdo_new_epoch (bool: resets the cumulative tn).
    """

    def init_fn(params):
        del params
        return init_state(cfg, jax.random.key(seed), state_dim)

    def update_fn(
        updates,
        st: RDOState,
        params=None,
        *,
        rdo_selection,
        rdo_state,
        rdo_counts,
        rdo_new_epoch,
        **_,
    ):
        del params
        cum_tn = jnp.where(rdo_new_epoch, 0.0, st.cumulative_tn) + rdo_counts[2]
        reward = batch_reward(rdo_counts, cum_tn if cfg.faithful else None)
        buf = push(
            st.buffer,
            st.pending_state,
            st.pending_action,
            st.pending_reward,
            rdo_state,
            st.pending_valid,
        )
        st = st._replace(buffer=buf)
        k_learn = jax.random.fold_in(jax.random.fold_in(st.key, st.step), 1)
        q_params, q_opt, loss = _learn(cfg, st, k_learn)
        step = st.step + 1
        if cfg.faithful:  # no target network (B13); the field stays unused
            target = st.target_params
        else:
            refresh = step % cfg.target_every == 0
            target = jax.tree_util.tree_map(
                lambda n, o: jnp.where(refresh, n, o), q_params, st.target_params
            )
        new = st._replace(
            alpha0=rdo_selection.alpha0,
            gamma=rdo_selection.gamma,
            q_params=q_params,
            q_opt_state=q_opt,
            target_params=target,
            pending_state=rdo_state,
            pending_action=rdo_selection.actions,
            pending_reward=reward,
            pending_valid=jnp.ones((), bool),
            cumulative_tn=cum_tn,
            step=step,
            dqn_loss=loss,
            active_steps=st.active_steps + rdo_selection.active.astype(jnp.int32),
        )
        return updates, new

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_state(opt_state) -> RDOState | None:
    """The RDOState inside a (possibly chained) optimiser state, or None."""
    return optim.find_state(opt_state, RDOState)
