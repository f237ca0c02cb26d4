"""Shared test setup: CPU, a persistent compilation cache, absl flags parsed, tiny inputs."""

import gc
import os
import pathlib
import signal
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's optimisations off, here and in every run.py subprocess (which inherits the
# environment), as flax's example tests do: compilation dominates the tiny models of tests
# on CPU, the programs are the same, and no excess precision is kept inside fusions.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_compilation_cache_dir", str(REPO / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# Grain's multiprocessing reads absl flags; pytest does not parse them.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

SHARED = REPO.parent / "shared"

# DMAF-Net's smoke configuration with three levels instead of five and 16^3 crops: every part
# of the training step (encoders, DMAF fusion, decoders, distillation, DTMS) at about a third
# of the compile time and memory, for tests that compile several steps or run several
# processes at once.
DMAF_SHALLOW = {
    "model.channels": (4, 8, 8),
    "model.token_dim": 16,
    "model.heads": 2,
    "model.depth": 1,
    "data.crop": (16, 16, 16),
}


# Four forced CPU devices, for run.py and scripts in a subprocess (the device count is fixed
# when JAX starts).
FOUR_DEVICES = dict(
    os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4"
)


def with_overrides(cfg, overrides: dict):
    """`cfg` with dotted overrides applied, as run.py's --config.a.b=v flags do:
    {"train.optimizer": "sgd", "faithful": True}."""
    for key, value in overrides.items():
        node = cfg
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return cfg


def dmaf_shallow(cfg):
    """`cfg` (a DMAF smoke config) with DMAF_SHALLOW applied."""
    return with_overrides(cfg, DMAF_SHALLOW)


def dmaf_shallow_flags() -> list[str]:
    """DMAF_SHALLOW as run.py flags."""
    return [f"--config.{k}={v}".replace(" ", "") for k, v in DMAF_SHALLOW.items()]


def pytest_collection_modifyitems(items):
    """Files with end-to-end (`slow`) tests first, the rest after, each in its usual order.
    pytest-xdist (--dist loadfile) hands out files in this order, so two workers no longer
    end with one of them running a minutes-long file alone (measured in CI: 3.7 minutes of
    one idle worker when test_two_processes.py came last)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: order kept within


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """A test process runs many modules (pytest-xdist, --dist loadfile), and JAX keeps every
    compiled program in its caches: one worker grew to 13 GB here and was killed by the
    kernel while the other ran a training subprocess. A finished module's programs go."""
    yield
    jax.clear_caches()
    gc.collect()


def signal_once(cmd, ready, sig=signal.SIGKILL, env=None, timeout: float = 900) -> int:
    """Starts `cmd` (run.py) in its own session and sends `sig` to its whole process group as
    soon as `ready()` is true (fails if the run ends first); waits for the run to end, then
    checks that no process of the session (Grain workers included) outlives it. Returns the
    run's return code."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be signalled"
        os.killpg(proc.pid, sig)
        proc.wait(timeout=300)
        for _ in range(50):  # workers notice a dead parent within a second
            if not session_processes(proc.pid):
                break
            time.sleep(0.1)
        assert not session_processes(proc.pid), "processes of the run outlived it"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


def sigkill_once(cmd, ready, env=None, timeout: float = 900) -> int:
    return signal_once(cmd, ready, signal.SIGKILL, env, timeout)


def session_processes(sid: int) -> list[int]:
    """Live processes (not zombies) of session `sid`, from /proc."""
    out = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # state, ppid, pgrp, session
            out.append(int(stat.parent.name))
    return out


def latest_step(ckpts: pathlib.Path) -> int:
    return max(int(p.name) for p in ckpts.glob("[0-9]*") if p.name.isdigit())


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def run_py(*args: str, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    """`python run.py *args` from the repository, output captured (the compile cache shared;
    a later --compilation_cache in `args` wins). `env`: the whole environment, if given."""
    cmd = [sys.executable, str(REPO / "run.py"), f"--compilation_cache={REPO / '.jax_cache'}"]
    return subprocess.run(
        [*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *culprits: str) -> str:
    """The run failed with a last stderr line `error: ...` naming every `culprits` string, and
    printed no traceback. Returns that line."""
    assert proc.returncode not in (0, None), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    assert last.startswith("error: "), proc.stderr[-2000:]
    for c in culprits:
        assert c in last, f"{c!r} not in {last!r}"
    return last
