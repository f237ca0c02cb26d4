"""Optimiser pieces that follow PyTorch's numbers: AMSGrad as `torch.optim.Adam(W)` computes it,
AdamW with PyTorch's per-parameter step counts, the per-epoch poly learning rate of the
PASSION/mmFormer code bases, and `hold` for parameters a step does not use.

`optax.amsgrad` keeps the running maximum of the *bias-corrected* second moment; PyTorch keeps
the maximum of the *raw* moment and bias-corrects afterwards. With large early gradients the
first form holds a large denominator for the whole run (DMAF-Net spec section 10 item 8), so
this module implements PyTorch's. `scale_by_pytorch_amsgrad` followed by
`optax.add_decayed_weights(wd)` and a scale by `-lr` is `torch.optim.AdamW(amsgrad=True)`
(`pytorch_adamw(..., amsgrad=True)`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import optax

T = TypeVar("T")


class ScaleByPytorchAmsgradState(NamedTuple):
    count: jax.Array  # () int32: steps taken; the bias corrections use t = count + 1 (from 1)
    mu: optax.Updates  # first moment
    nu: optax.Updates  # raw second moment
    nu_max: optax.Updates  # running maximum of the raw second moment


def _one_minus_pow(b: float, t: jax.Array) -> jax.Array:
    """1 - b**t in float32 without the cancellation of computing b**t first.

    float32(0.999) is off by 1.3e-8, which is 1.3e-5 of 1 - 0.999; PyTorch forms the correction
    in float64. -expm1(t * log(b)) with log(b) taken in float64 keeps the relative error ~1e-7.
    """
    return -jnp.expm1(t.astype(jnp.float32) * jnp.float32(math.log(b)))


def scale_by_pytorch_amsgrad(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """PyTorch's AMSGrad direction (without learning rate or weight decay).

    t counts from 1; mu = b1 mu + (1 - b1) g; nu = b2 nu + (1 - b2) g^2;
    nu_max = max(nu_max, nu) on the raw moment; u = (mu / (1 - b1^t)) / (sqrt(nu_max) /
    sqrt(1 - b2^t) + eps). The betas are Python floats (the bias corrections need them on the
    host to stay precise).
    """
    b1, b2, eps = float(b1), float(b2), float(eps)

    def init_fn(params):
        zeros = lambda: optax.tree.zeros_like(params)
        return ScaleByPytorchAmsgradState(jnp.zeros([], jnp.int32), zeros(), zeros(), zeros())

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: b1 * m + (1.0 - b1) * g, updates, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * v + (1.0 - b2) * g * g, updates, state.nu)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
        count = optax.safe_increment(state.count)
        new_updates = jax.tree.map(lambda m, v: _direction(m, v, count, b1, b2, eps), mu, nu_max)
        return new_updates, ScaleByPytorchAmsgradState(count, mu, nu, nu_max)

    return optax.GradientTransformation(init_fn, update_fn)


def _direction(m: jax.Array, v: jax.Array, t: jax.Array, b1: float, b2: float, eps: float):
    """PyTorch's Adam step direction at step t (from 1): (m / (1 - b1^t)) /
    (sqrt(v) / sqrt(1 - b2^t) + eps)."""
    denom = jnp.sqrt(v) / jnp.sqrt(_one_minus_pow(b2, t)).astype(m.dtype) + eps
    return ((m / _one_minus_pow(b1, t).astype(m.dtype)) / denom).astype(m.dtype)


class ScaleByPytorchAdamState(NamedTuple):
    count: optax.Updates  # per parameter, () int32: the steps it took (PyTorch's state["step"])
    mu: optax.Updates
    nu: optax.Updates


def scale_by_pytorch_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """PyTorch's Adam direction (without learning rate or weight decay), with a step count per
    parameter as PyTorch keeps it: a parameter that `hold` keeps out of some steps (PyTorch
    skips one whose `.grad` is None) starts its bias corrections at its own first step.
    optax.scale_by_adam shares one count, so a parameter first updated at step 1000 would get
    1000's corrections on fresh moments (MAF after the warm-up: 1.4x a fresh Adam's move)."""
    b1, b2, eps = float(b1), float(b2), float(eps)

    def init_fn(params):
        count = jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params)
        zeros = lambda: optax.tree.zeros_like(params)
        return ScaleByPytorchAdamState(count, zeros(), zeros())

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: b1 * m + (1.0 - b1) * g, updates, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * v + (1.0 - b2) * g * g, updates, state.nu)
        count = jax.tree.map(optax.safe_increment, state.count)
        direction = lambda m, v, t: _direction(m, v, t, b1, b2, eps)  # noqa: E731
        return jax.tree.map(direction, mu, nu, count), ScaleByPytorchAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def pytorch_adamw(
    learning_rate: float | optax.Schedule,
    weight_decay: float = 1e-2,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    amsgrad: bool = False,
) -> optax.GradientTransformation:
    """`torch.optim.AdamW(amsgrad=...)`: Adam with per-parameter step counts (AMSGrad: one
    count for all, as DMAF-Net steps every parameter), then decoupled weight decay
    `-lr * wd * p` (PyTorch's `param.mul_(1 - lr * wd)` before the step, not divided by the
    Adam denominator), then -lr. The learning-rate schedule counts the optimiser's steps (one
    count for all parameters)."""
    direction = scale_by_pytorch_amsgrad if amsgrad else scale_by_pytorch_adam
    return optax.chain(
        direction(b1, b2, eps),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def epoch_of_step(batch_size: int, num_train: int) -> Callable[[jax.Array], jax.Array]:
    """step -> epoch = floor(step * B / N_train), int32 (DMAF spec 11.13).

    Batches straddle epochs when B does not divide N_train; a step belongs to the epoch its
    first sample is drawn in.
    """
    if batch_size < 1 or num_train < 1:
        raise ValueError(f"batch_size and num_train must be >= 1, got {batch_size}, {num_train}")

    def epoch_of(step: jax.Array) -> jax.Array:
        return (jnp.asarray(step, jnp.int32) * batch_size) // num_train

    return epoch_of


def poly_lr(learning_rate: float, epoch: int, epochs: int, power: float = 0.9) -> float:
    """PASSION's `lr0 * (1 - epoch/epochs)^power` rounded to 8 decimals, in float64 (host)."""
    return round(learning_rate * (1.0 - min(epoch, epochs) / epochs) ** power, 8)


def poly_schedule(
    learning_rate: float,
    epochs: int,
    epoch_of: Callable[[jax.Array], jax.Array],
    power: float = 0.9,
) -> optax.Schedule:
    """Per-epoch poly learning rate as an optax schedule of the step count.

    lr(step) = round(lr0 * (1 - e/epochs)^power, 8) with e = epoch_of(step), set at epoch start
    as PASSION does, and 0 from epoch `epochs` on. The per-epoch values are computed on the host
    in float64 and looked up, so the rounding agrees with Python's `round` exactly.
    `epoch_of` is e.g. `epoch_of_step(batch_size, num_train)`.
    """
    table = jnp.asarray([poly_lr(learning_rate, e, epochs, power) for e in range(epochs + 1)])
    table = table.astype(jnp.float32)

    def schedule(step: jax.Array) -> jax.Array:
        return table[jnp.clip(epoch_of(step), 0, epochs)]

    return schedule


def find_state(opt_state: Any, kind: type[T]) -> T | None:
    """The first state of type `kind` inside a (possibly chained, nested) optimiser state."""
    if isinstance(opt_state, kind):
        return opt_state
    if isinstance(opt_state, tuple):
        for s in opt_state:
            found = find_state(s, kind)
            if found is not None:
                return found
    return None


def hold(new: T, old: T, held: Any) -> T:
    """`new` with the leaves marked in `held` (a bool pytree shaped like the parameters) taken
    from `old`, in every parameter-shaped subtree (parameters, momenta, second moments).

    PyTorch's optimisers skip a parameter whose `.grad` is None (not in this step's graph): no
    weight decay, no momentum update. Under jit such a parameter gets a zero gradient instead,
    which coupled L2 and momentum would still move; applied to (params, opt_state) after the
    update, this holds them, and the per-parameter step counts of `pytorch_adamw` with them;
    shared counts (a learning-rate schedule's, as PyTorch's scheduler) keep counting."""
    struct = jax.tree.structure(held)

    def shaped(x) -> bool:
        return jax.tree.structure(x) == struct

    def pick(n, o):
        if not shaped(n):
            return n
        return jax.tree.map(lambda h, a, b: b if h else a, held, n, o)

    return jax.tree.map(pick, new, old, is_leaf=shaped)
