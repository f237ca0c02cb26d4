"""XLA's memory analysis of DMAF-Net's training step with and without rematerialisation
(issue 9 item 5).

Lowers and compiles `train.jit_train_step` for the paper's network (configs/dmaf_brats2020.py,
default variant) at a crop of `--crop`^3 and `--batch`, once with `model.remat=False` and once
with `model.remat=True`, from abstract inputs (`jax.eval_shape`, `ShapeDtypeStruct`): nothing
is allocated or run. Prints XLA's argument, output, temporary and total sizes in GiB and the
ratio remat / plain, both measured in this run.

    python benchmarks/dmaf_memory.py                 # 128^3 batch 2: several minutes on CPU
    python benchmarks/dmaf_memory.py --crop 64
    python benchmarks/dmaf_memory.py --conv native   # the program a GPU runs (native 3-D convs)

`--conv auto` analyses what this backend runs (on CPU the convolutions decomposed into 2-D
ones over depth-shifted views, which hold three shifted copies of each input).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import conv as conv_lib  # noqa: E402
from configs.dmaf_brats2020 import get_config  # noqa: E402
from dmaf_jax import experiment, train  # noqa: E402

GIB = 2**30
SPE = 219  # the paper's steps per epoch (219 training cases at batch 1)


def config(crop: int, batch: int, remat: bool, channels=None):
    cfg = get_config()
    cfg.data.crop = (crop,) * 3
    cfg.data.batch_size = batch
    cfg.model.remat = remat
    if channels is not None:
        cfg.model.channels = tuple(channels)
    return cfg


def abstract_inputs(cfg) -> tuple:
    """(state, batch) as ShapeDtypeStructs: the state's shapes from tracing its initialiser."""
    tx = experiment.optimizer(cfg, SPE)
    state = jax.eval_shape(
        lambda k: experiment._initial_state(cfg, tx, k), jax.random.key(cfg.seed)
    )
    b, crop = cfg.data.batch_size, tuple(cfg.data.crop)
    m = len(experiment.spec_of(cfg).modalities)
    batch = {
        "image": jax.ShapeDtypeStruct((b, *crop, m), jnp.float32),
        "label": jax.ShapeDtypeStruct((b, *crop), jnp.int32),
        "mask": jax.ShapeDtypeStruct((b, m), jnp.bool_),
    }
    return tx, state, batch


def memory(cfg, compiler_options: dict | None = None) -> dict[str, float]:
    """XLA's memory analysis of the compiled training step, in bytes."""
    tx, state, batch = abstract_inputs(cfg)
    step = train.jit_train_step(cfg, tx, SPE, np.ones(batch["mask"].shape[1]))
    m = step.lower(state, batch).compile(compiler_options).memory_analysis()
    out = {
        "temp": m.temp_size_in_bytes,
        "argument": m.argument_size_in_bytes,
        "output": m.output_size_in_bytes,
        "alias": m.alias_size_in_bytes,
    }
    # Donated state: outputs aliased to arguments are counted once.
    out["total"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--conv", choices=("auto", "native", "decomposed"), default="auto")
    args = ap.parse_args()
    if args.conv != "auto":
        conv_lib.auto_impl = lambda: args.conv
    print(
        f"backend {jax.default_backend()}, jax {jax.__version__}, crop {args.crop}^3, "
        f"batch {args.batch}, channels {tuple(get_config().model.channels)}, "
        f"convolutions {conv_lib.auto_impl()}"
    )
    rows = {}
    for name, remat in (("plain", False), ("remat", True)):
        t = time.perf_counter()
        rows[name] = memory(config(args.crop, args.batch, remat))
        s = time.perf_counter() - t
        print(
            f"{name:6s} "
            + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in rows[name].items())
            + f"  (lowered and compiled in {s:.0f} s)"
        )
    for k in ("temp", "total"):
        print(f"{k} remat / plain: {rows['remat'][k] / rows['plain'][k]:.3f}")


if __name__ == "__main__":
    main()
