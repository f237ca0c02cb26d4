"""DTMS (Dynamic Training Monitoring Strategy) as stateful optax transforms.

Spec: ../shared/spec/dmaf-net.md section 5, amended by section 10 items 4-8 and section 11
items 12-14 (11 wins). Two transforms and the optimiser that chains them:

- `monitor`: passes the gradients through unchanged. Its state (`DTMSState`, in the optimiser
  state, so checkpointed with it) tracks the distillation gaps, accumulates their within-sample
  relative values over the epoch and, at the last step of each epoch, sets the loss weights
  `beta` and the encoder update factors `k` that apply from the next epoch's first step.
- `scale_encoder_updates`: multiplies encoder m's *update* (after AMSGrad) by k_m. A constant
  factor on the gradient before Adam cancels in mu / sqrt(nu) (section 10 item 6), so the
  "gradient scaling" of the design card is this transform on the updates.
- `make_optimizer`: chain(monitor, PyTorch AMSGrad, encoder scaling, decoupled weight decay on
  all parameters (not scaled by k), -lr(epoch)) as section 11 item 14 orders it.

Per step, with raw per-sample terms L_bmk (k in cov, att, proto) and valid pairs v_bm:
  EMA_k (pooled over valid pairs, mu per step, initialised from the first valid batch mean) is
  read *before* this step's update; g_bm = sum_k L_bmk / max(EMA_k, 1e-8);
  rho_bm = g_bm / (mean_{valid m'} g_bm' + 1e-6) - 1 (> 0: modality m lags within sample b);
  sum and count of rho per modality over the epoch.
At the step whose successor starts a new epoch (`dtms_next_epoch > dtms_epoch`), epoch e closes:
  R_m = sum / count, seen = count > 0, and if e >= freeze_epochs - 1:
  beta_m <- clip(beta_m + eta_{e+1} R_m, beta_clip) for seen m, then renormalised so that
  ||beta|| = sqrt(M); k_m = max(k_min, 1 - ramp(e+1) tanh(max(0, -R_m))) for seen m.
Closing on the last step of epoch e (rather than on the first step of e+1, when the loss has
already been computed with the old beta) makes "new values apply from epoch e+1" exact: the
caller reads beta and k from the state before each step, and the state after the last step of
epoch e holds the new ones.

Decisions where the spec leaves room:
- Unseen modalities (no valid pair in the epoch) keep beta and k exactly: no R term and no part
  in the renormalisation. The seen ones are rescaled to the norm the vector leaves them,
  sqrt(M - ||beta_unseen||^2); with every modality seen this is the spec's sqrt(M) beta/||beta||,
  and ||beta|| = sqrt(M) holds after every close either way (it holds at init, beta = 1).
- The freeze covers k as well as beta (section 10 item 7: "beta and k frozen"); with the default
  k_ramp (20, 30) the ramp is 0 there anyway.
- The clamp to beta_clip comes before the renormalisation (as PASSION does), so a normalised
  beta can leave [0.1, 4] (only downwards for M <= 16: sqrt(M) <= 4).
- eta for the close of epoch e is eta_{e+1} (the epoch the new beta serves);
  eta_e = eta0 * growth^floor(e / every); `faithful=True` is PASSION's one growth step ahead
  (0.015 from epoch 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from common import optim
from common.optim import scale_by_pytorch_amsgrad

NUM_TERMS = 3  # cov, att, proto
EMA_FLOOR = 1e-8
RHO_EPS = 1e-6


class DTMSState(NamedTuple):
    """DTMS monitor state; every field an array. M = number of modalities."""

    ema: jax.Array  # (3,) f32 running mean of each raw term [cov, att, proto]
    ema_ready: jax.Array  # () bool: ema initialised from a valid batch
    rho_sum: jax.Array  # (M,) f32 sum of rho_bm over the current epoch's valid pairs
    rho_count: jax.Array  # (M,) f32 number of those pairs
    beta: jax.Array  # (M,) f32 loss weights in force
    factors: jax.Array  # (M,) f32 encoder update factors k in force
    seen: jax.Array  # (M,) bool: modality had a valid pair in the last closed epoch
    epoch_rho: jax.Array  # (M,) f32 R_m of the last closed epoch (0 where unseen)
    step_gap: jax.Array  # (M,) f32 this step's mean normalised gap g_bm (0: no valid pair)
    step_rho: jax.Array  # (M,) f32 this step's mean rho_bm (0: no valid pair)


def init_state(num_modalities: int) -> DTMSState:
    m = num_modalities
    f32 = jnp.float32
    return DTMSState(
        ema=jnp.zeros(NUM_TERMS, f32),
        ema_ready=jnp.zeros((), bool),
        rho_sum=jnp.zeros(m, f32),
        rho_count=jnp.zeros(m, f32),
        beta=jnp.ones(m, f32),
        factors=jnp.ones(m, f32),
        seen=jnp.zeros(m, bool),
        epoch_rho=jnp.zeros(m, f32),
        step_gap=jnp.zeros(m, f32),
        step_rho=jnp.zeros(m, f32),
    )


def eta(epoch: jax.Array, eta0: float, growth: float, every: int, faithful: bool) -> jax.Array:
    """eta_e = eta0 * growth^(floor(e / every) [+ 1 if faithful])."""
    steps = jnp.asarray(epoch, jnp.int32) // every + (1 if faithful else 0)
    return jnp.float32(eta0) * jnp.float32(growth) ** steps.astype(jnp.float32)


def close_eta(epoch: jax.Array, eta0: float, growth: float, every: int, faithful: bool):
    """The eta of the beta step that closes `epoch`: 11.13's eta_{e+1}, or PASSION's (faithful),
    which grows at the start of epoch e and so uses eta_e with its extra growth step."""
    return eta(epoch if faithful else epoch + 1, eta0, growth, every, faithful)


def ramp(epoch: jax.Array, start: float, end: float) -> jax.Array:
    """clip((e - start) / (end - start), 0, 1); a step at `start` when end <= start."""
    e = jnp.asarray(epoch, jnp.float32)
    if end <= start:
        return (e >= start).astype(jnp.float32)
    return jnp.clip((e - start) / (end - start), 0.0, 1.0)


def _safe_div(num: jax.Array, den: jax.Array, ok: jax.Array) -> jax.Array:
    """num / den where ok, else 0, with no NaN in either branch (section 11 item 15)."""
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def monitor(
    num_modalities: int,
    *,
    mu: float = 0.99,
    eta0: float = 0.01,
    eta_growth: float = 1.5,
    eta_every: int = 100,
    freeze_epochs: int = 20,
    k_ramp: tuple[float, float] = (20, 30),
    k_min: float = 0.5,
    beta_clip: tuple[float, float] = (0.1, 4.0),
    reweight: bool = True,
    scale: bool = True,
    faithful: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """The DTMS state as an optax transform; the updates pass through unchanged.

    Extras of `update` (all arrays, one compilation for every mask and epoch):
      dtms_gaps: (B, M, 3) raw per-sample distillation terms [cov, att, proto].
      dtms_valid: (B, M) bool, the pairs that count (v_bm and some class qualifies).
      dtms_epoch: () int32, epoch of this step.
      dtms_next_epoch: () int32, epoch of the next step; larger closes `dtms_epoch`.
    `reweight=False` keeps beta = 1 and `scale=False` keeps k = 1 (ablations); R and `seen` are
    tracked either way.
    """
    m_count = num_modalities
    lo, hi = beta_clip
    ramp_start, ramp_end = k_ramp

    def init_fn(params):
        del params
        return init_state(m_count)

    def update_fn(
        updates,
        state: DTMSState,
        params=None,
        *,
        dtms_gaps: jax.Array,
        dtms_valid: jax.Array,
        dtms_epoch: jax.Array,
        dtms_next_epoch: jax.Array,
        **extra: Any,
    ):
        del params, extra
        gaps = jax.lax.stop_gradient(jnp.asarray(dtms_gaps, jnp.float32))
        valid = jnp.asarray(dtms_valid, bool)
        if gaps.shape[1:] != (m_count, NUM_TERMS) or valid.shape != gaps.shape[:2]:
            raise ValueError(
                f"dtms_gaps must be (B, {m_count}, {NUM_TERMS}) and dtms_valid (B, {m_count}); "
                f"got {gaps.shape} and {valid.shape}"
            )
        epoch = jnp.asarray(dtms_epoch, jnp.int32)
        next_epoch = jnp.asarray(dtms_next_epoch, jnp.int32)
        gaps = jnp.where(valid[..., None], gaps, 0.0)  # invalid pairs may hold anything

        # Running means of the raw terms, pooled over valid pairs; this step reads the old one.
        n_valid = jnp.sum(valid).astype(jnp.float32)
        any_valid = n_valid > 0
        batch_mean = _safe_div(jnp.sum(gaps, axis=(0, 1)), n_valid, any_valid)
        ema_read = jnp.where(state.ema_ready, state.ema, batch_mean)
        ema = jnp.where(any_valid, mu * ema_read + (1.0 - mu) * batch_mean, state.ema)
        ema_ready = state.ema_ready | any_valid

        # Normalised gap and its within-sample relative value.
        g = jnp.sum(gaps / jnp.maximum(ema_read, EMA_FLOOR), axis=-1)  # (B, M)
        g = jnp.where(valid, g, 0.0)
        n_b = jnp.sum(valid, axis=1).astype(jnp.float32)  # (B,)
        mean_b = _safe_div(jnp.sum(g, axis=1), n_b, n_b > 0)
        rho = jnp.where(valid, g / (mean_b[:, None] + RHO_EPS) - 1.0, 0.0)
        n_m = jnp.sum(valid, axis=0).astype(jnp.float32)  # (M,)
        rho_sum = state.rho_sum + jnp.sum(rho, axis=0)
        rho_count = state.rho_count + n_m

        # Epoch close.
        close = next_epoch > epoch
        seen = rho_count > 0
        r = _safe_div(rho_sum, rho_count, seen)
        active = close & (epoch >= freeze_epochs - 1)
        nxt = epoch + 1
        beta = state.beta
        if reweight:
            step_eta = close_eta(epoch, eta0, eta_growth, eta_every, faithful)
            stepped = jnp.clip(beta + step_eta * r, lo, hi)
            stepped = jnp.where(seen, stepped, beta)
            unseen_sq = jnp.sum(jnp.where(seen, 0.0, beta**2))
            seen_norm = jnp.sqrt(jnp.sum(jnp.where(seen, stepped**2, 0.0)))
            target = jnp.sqrt(jnp.maximum(m_count - unseen_sq, 0.0))
            normed = stepped * _safe_div(target, seen_norm, seen_norm > 0)
            beta = jnp.where(active & seen, normed, beta)
        factors = state.factors
        if scale:
            k_new = 1.0 - ramp(nxt, ramp_start, ramp_end) * jnp.tanh(jnp.maximum(0.0, -r))
            factors = jnp.where(active & seen, jnp.maximum(k_min, k_new), factors)

        new_state = DTMSState(
            ema=ema,
            ema_ready=ema_ready,
            rho_sum=jnp.where(close, 0.0, rho_sum),
            rho_count=jnp.where(close, 0.0, rho_count),
            beta=beta,
            factors=factors,
            seen=jnp.where(close, seen, state.seen),
            epoch_rho=jnp.where(close, r, state.epoch_rho),
            step_gap=_safe_div(jnp.sum(g, axis=0), n_m, n_m > 0),
            step_rho=_safe_div(jnp.sum(rho, axis=0), n_m, n_m > 0),
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _key_path(encoder_key: str | Sequence[str]) -> tuple[str, ...]:
    return (encoder_key,) if isinstance(encoder_key, str) else tuple(encoder_key)


def _path_names(path) -> tuple[Any, ...]:
    names = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                names.append(getattr(p, attr))
                break
    return tuple(names)


def scale_encoder_updates(
    encoder_key: str | Sequence[str] = "encoder",
) -> optax.GradientTransformationExtraArgs:
    """Multiply every leaf under `updates[encoder_key]` by k along its leading modality axis.

    The encoders are one module vmapped over modalities, so each of their leaves is (M, ...)
    and slice m belongs to encoder m. `encoder_key` is a key or a path of keys from the root
    (e.g. ("params", "encoder")). Extra of `update`: dtms_factors (M,). Stateless.
    Raises at trace time if nothing matches or a leaf's leading axis is not M.
    """
    prefix = _key_path(encoder_key)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, dtms_factors: jax.Array, **extra: Any):
        del params, extra
        k = jnp.asarray(dtms_factors)
        matched = []

        def apply(path, u):
            if u is None or _path_names(path)[: len(prefix)] != prefix:
                return u
            if u.ndim == 0 or u.shape[0] != k.shape[0]:
                raise ValueError(
                    f"encoder leaf {jax.tree_util.keystr(path)} has shape {u.shape}; its leading "
                    f"axis must be the {k.shape[0]} modalities"
                )
            matched.append(path)
            return u * k.astype(u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))

        out = jax.tree_util.tree_map_with_path(apply, updates, is_leaf=lambda x: x is None)
        if not matched:
            raise ValueError(f"no update leaf under {prefix}; check encoder_key")
        return out, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_state(opt_state) -> DTMSState | None:
    """The DTMSState inside a (possibly chained) optimiser state, or None."""
    return optim.find_state(opt_state, DTMSState)


def make_optimizer(
    *,
    learning_rate: float | optax.Schedule,
    num_modalities: int,
    weight_decay: float = 1e-4,
    encoder_key: str | Sequence[str] = "encoder",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    **dtms_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """chain(monitor, PyTorch AMSGrad, k on encoder m's update, decoupled weight decay, -lr).

    `learning_rate` is a float or a schedule of the step count (e.g. `common.optim.
    poly_schedule`); `dtms_kwargs` go to `monitor`. `update` takes the monitor's extras and
    optionally `dtms_factors`; without it the factors in force (the monitor's state before this
    step) are used, which is what a caller reading `find_state(opt_state).factors` would pass.
    """
    lr = learning_rate if callable(learning_rate) else (lambda count: learning_rate)
    inner = optax.chain(
        monitor(num_modalities, **dtms_kwargs),
        scale_by_pytorch_amsgrad(b1, b2, eps),
        scale_encoder_updates(encoder_key),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_schedule(lambda count: -lr(count)),
    )

    def update_fn(updates, state, params=None, **extra: Any):
        if extra.get("dtms_factors") is None:
            extra["dtms_factors"] = state[0].factors
        return inner.update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)
