"""Shared test setup: CPU, a persistent compilation cache, absl flags parsed, tiny inputs."""

import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
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


@pytest.fixture
def rng():
    return np.random.default_rng(0)
