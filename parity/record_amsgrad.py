"""Record `torch.optim.AdamW(amsgrad=True)` on a fixed gradient sequence for tests/test_optim.py.

Needs torch (not a project requirement). Runs in float64 so the recorded per-step parameter
changes are PyTorch's formula without float32 rounding; the test compares our float32 updates
to them. Prints Python literals to paste into the test:

    python parity/record_amsgrad.py

Two runs on the same gradients: constant lr 2e-4, and the per-epoch poly schedule with B = 2,
N_train = 5, 4 epochs (epoch(step) = floor(step * B / N), so batches straddle epochs), the lr
set in the param group at the first step of each epoch and rounded to 8 decimals as PASSION does.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SHAPES = {"a": (3,), "b": (2, 2), "c": (2,)}
STEPS = 10
LR, WD = 2e-4, 1e-4


def gradients() -> list[dict[str, np.ndarray]]:
    """Two large steps (std 10), then small ones (std 0.01): optax.amsgrad stays slow after."""
    rng = np.random.default_rng(7)
    out = []
    for t in range(STEPS):
        scale = 10.0 if t < 2 else 0.01
        out.append({k: np.round(scale * rng.standard_normal(s), 4) for k, s in SHAPES.items()})
    return out


def initial_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {k: np.round(rng.standard_normal(s), 4) for k, s in SHAPES.items()}


def poly_lr(epoch: int, epochs: int = 4) -> float:
    return round(LR * (1 - epoch / epochs) ** 0.9, 8)


def run(schedule: bool) -> list[dict[str, np.ndarray]]:
    params = {
        k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
        for k, v in initial_params().items()
    }
    opt = torch.optim.AdamW(list(params.values()), lr=LR, weight_decay=WD, amsgrad=True)
    deltas = []
    for t, g in enumerate(gradients()):
        if schedule:
            for group in opt.param_groups:
                group["lr"] = poly_lr(math.floor(t * 2 / 5))
        before = {k: p.detach().clone() for k, p in params.items()}
        for k, p in params.items():
            p.grad = torch.tensor(g[k], dtype=torch.float64)
        opt.step()
        deltas.append({k: (params[k].detach() - before[k]).numpy() for k in params})
    return deltas


def literal(seq: list[dict[str, np.ndarray]]) -> str:
    def arr(x):
        return "[" + ", ".join(repr(float(v)) for v in np.ravel(x)) + "]"

    rows = [
        "    {" + ", ".join(f'"{k}": {arr(d[k])}' for d in [step] for k in d) + "}," for step in seq
    ]
    return "[\n" + "\n".join(rows) + "\n]"


if __name__ == "__main__":
    print(f"# torch {torch.__version__}, float64")
    print("GRADS =", literal(gradients()))
    print(
        "PARAMS0 =",
        "{"
        + ", ".join(
            f'"{k}": {[float(x) for x in np.ravel(v)]}' for k, v in initial_params().items()
        )
        + "}",
    )
    print("TORCH_DELTAS_CONSTANT =", literal(run(schedule=False)))
    print("TORCH_DELTAS_POLY =", literal(run(schedule=True)))
