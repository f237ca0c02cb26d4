"""Data parallelism over every device of every process, the JAX way: one mesh with a `data`
axis, batches sharded along it, the training state replicated (or, with `fsdp`, each large
array split along one of its axes over the same devices), and XLA's partitioner inserting the
collectives. The same jitted step runs on one CPU, one GPU, eight GPUs or several hosts.

    mesh = parallel.mesh()
    shard = parallel.Sharding(mesh, fsdp=cfg.parallel.fsdp)
    state = jax.device_put(state, shard.state(state))
    step = jax.jit(fn, in_shardings=(shard.state(state), shard.batch),
                   out_shardings=(shard.state(state), shard.replicated), donate_argnums=0)
    batch = shard.put_batch(host_batch)      # this process's rows of the global batch

Several hosts: `initialize()` (before anything touches a device) runs
`jax.distributed.initialize` when `cfg.parallel` or the standard environment says so; each
process reads its own rows of every global batch (`process_rows`), `put_batch` assembles the
global array from the processes' parts, and orbax saves and restores collectively.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"
# FSDP: arrays smaller than this stay replicated (splitting biases and norms saves nothing
# and costs a collective each).
FSDP_MIN_SIZE = 2**14


def initialize(coordinator: str | None = None, num_processes: int = 0, process_id: int = -1):
    """`jax.distributed.initialize` for a run over several processes: from the arguments (the
    config's `parallel.coordinator`, `parallel.num_processes`, `parallel.process_id`) or, when
    the coordinator is not given, from JAX's standard environment (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID, or a cluster JAX detects such as SLURM). A single
    process does nothing. Must run before anything touches a device."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator:
        return
    kw: dict[str, Any] = {"coordinator_address": coordinator}
    n = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", 0))
    pid = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", -1))
    if n:
        kw["num_processes"] = n
    if pid >= 0:
        kw["process_id"] = pid
    # CPU devices need a collectives implementation across processes (GPUs use NCCL; the
    # setting only concerns the CPU backend).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kw)


def is_main() -> bool:
    """The process that logs, draws progress bars and writes reports."""
    return jax.process_index() == 0


def _client():
    from jax._src import distributed  # jax.distributed's own coordination-service client

    return distributed.global_state.client


def barrier(name: str, hours: float = 24) -> None:
    """Every process waits here until all have arrived (none: a single process). The
    coordination service's barrier, not a device collective: process 0 may spend an hour
    preprocessing while the others wait, longer than collectives wait."""
    if jax.process_count() == 1:
        return
    _client().wait_at_barrier(name, int(hours * 3600 * 1000))


class MainFailed(ValueError):
    """Raised on the other processes when `main_first`'s function failed on process 0."""


def main_first(fn, name: str):
    """`fn()` on process 0, then on the others: it writes files (data preparation) that they
    then find ready and only read. If it fails on process 0, the others raise `MainFailed`
    with its message after the barrier instead of running it themselves."""
    if jax.process_count() == 1:
        return fn()
    if is_main():
        try:
            return fn()
        except BaseException as e:
            _client().key_value_set(f"{name}/failed", f"{type(e).__name__}: {e}")
            raise
        finally:
            barrier(name)
    barrier(name)
    try:
        failed = _client().key_value_try_get(f"{name}/failed")
    except jax.errors.JaxRuntimeError:  # NOT_FOUND: process 0 succeeded
        failed = None
    if failed:
        raise MainFailed(f"process 0 failed ({name}): {failed}")
    return fn()


def assert_same(obj, what: str) -> None:
    """Every process holds the same `obj` (JSON-able): decisions each process derived from
    files (cases found, splits, masks) must agree, or the run would diverge or hang."""
    if jax.process_count() == 1:
        return
    import hashlib
    import json

    from jax.experimental import multihost_utils

    digest = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).digest()
    every = multihost_utils.process_allgather(np.frombuffer(digest, np.uint8))
    differ = [k for k in range(len(every)) if not np.array_equal(every[k], every[0])]
    if differ:
        raise ValueError(
            f"processes {differ} disagree with process 0 on {what}: every process must see "
            "the same data files (a shared file system, fully written)"
        )


def mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (AXIS,))


def check_batch(batch_size: int, field: str, devices: int | None = None) -> None:
    """A global batch must split evenly over the devices (and so over the processes)."""
    n = jax.device_count() if devices is None else devices
    if batch_size < 1 or batch_size % n:
        raise ValueError(
            f"{field}={batch_size} does not divide by the {n} devices: use a multiple of {n}"
        )


@dataclasses.dataclass(frozen=True)
class Sharding:
    """The shardings of one run: `batch` (leading axis over the devices), `replicated`, and
    `state(tree)` (replicated, or FSDP-split)."""

    mesh: Mesh
    fsdp: bool = False

    @property
    def batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(AXIS))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def devices(self) -> int:
        return self.mesh.devices.size

    def describe(self, batch_size: int) -> str:
        """One log line: the devices, processes and how a global batch splits over them."""
        n, procs = self.devices, jax.process_count()
        state = "FSDP-split" if self.fsdp else "replicated"
        return (
            f"data parallel over {n} device(s) in {procs} process(es): global batch "
            f"{batch_size}, {batch_size // n} per device; state {state}"
        )

    def leaf(self, x) -> NamedSharding:
        """FSDP: the largest axis that divides by the device count is split; else
        replicated."""
        shape = getattr(x, "shape", ())
        if not self.fsdp or self.devices == 1 or int(np.prod(shape)) < FSDP_MIN_SIZE:
            return self.replicated
        order = sorted(range(len(shape)), key=lambda a: -shape[a])
        for axis in order:
            if shape[axis] % self.devices == 0:
                spec = [None] * len(shape)
                spec[axis] = AXIS
                return NamedSharding(self.mesh, P(*spec))
        return self.replicated

    def state(self, tree) -> Any:
        return jax.tree.map(self.leaf, tree)

    def put_rows(self, batch) -> Any:
        """Whole batches (a pytree of arrays whose first axis divides by the devices) of this
        process -> arrays split along the mesh's devices (evaluation, `local()`)."""
        return jax.device_put(batch, self.batch)

    def put_batch(self, batch) -> Any:
        """This process's rows of a global batch (a pytree of numpy arrays) -> global arrays
        sharded along the devices. One process: a plain sharded transfer."""
        if jax.process_count() == 1:
            return jax.device_put(batch, self.batch)
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self.batch, np.asarray(x)), batch
        )


def jit_step(fn, shard: Sharding | None, state, **jit_kw):
    """`jax.jit(fn, donate_argnums=0)` for `fn(state, batch, ...) -> (state, outputs)`. With
    `shard`, the new state keeps the state's shardings and the outputs are replicated; the
    inputs bring their own (`jax.device_put(state, shard.state(state))`, `shard.put_batch`),
    which also leaves keyword arguments free."""
    if shard is None:
        return jax.jit(fn, donate_argnums=0, **jit_kw)
    out = (shard.state(state), shard.replicated)
    return jax.jit(fn, out_shardings=out, donate_argnums=0, **jit_kw)


def local() -> Sharding:
    """Evaluation's shardings: this process's devices. Each process evaluates whole batches of
    images or windows on its own devices, split along the batch, so evaluation needs no
    collective (over several hosts each repeats it; process 0 writes the reports)."""
    return Sharding(mesh(jax.local_devices()))


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least `n` (batch sizes over devices)."""
    return -(-n // multiple) * multiple


def local_copy(tree):
    """`tree` as arrays this process can compute with alone (validation during training): over
    several processes each array, replicated or split, is gathered to every process; in one
    process the tree itself."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
