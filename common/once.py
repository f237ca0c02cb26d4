"""Functions a process runs once, such as a model's state initialisation: compiled with XLA's
cheap pipeline and called.

Run eagerly, an `init` dispatches and compiles each operation on its own (FAMF's smoke model:
18 s on 2 cores); compiled as one program with XLA's full optimisation it takes longer to
compile than the optimisation can ever save on a single call (DMAF demo: 64 s, against 21 s
with this pipeline). The persistent compilation cache keeps the result like any other."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_once(
    fn: Callable[..., Any], *args: Any, compiler_options: dict | None = FAST_COMPILE
) -> Any:
    """`fn(*args)`, jit-compiled with `compiler_options` (None: XLA's default pipeline);
    `args`: arrays or pytrees of arrays."""
    return jax.jit(fn).lower(*args).compile(compiler_options)(*args)
