"""`run.py` as one of several processes of a DMAF training run (tests/test_two_processes.py), with a
record of what it read: `two_process_train.py <out.json> <run.py flags...>`, JAX's standard
variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) in the environment.

run.py initialises jax.distributed from them and trains as usual; this wrapper also writes to
out.json the case indices this process put into each global batch, the device count and a
checksum of the final parameters."""

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
from absl import app  # noqa: E402

import run  # noqa: E402
from dmaf_jax import train  # noqa: E402

out_path = sys.argv.pop(1)
read = []
device_batch, train_loop = train.device_batch, train.train_loop


def recording_device_batch(cfg, batch, shard=None):
    read.append(np.asarray(batch["index"]).tolist())
    return device_batch(cfg, batch, shard)


def recording_train_loop(*args, **kwargs):
    import jax

    state, result = train_loop(*args, **kwargs)
    digest = hashlib.sha256()
    for x in jax.tree.leaves(state.params):
        digest.update(np.asarray(x.addressable_data(0)).tobytes())
    record = {"read": read, "checksum": digest.hexdigest(), "devices": jax.device_count()}
    with open(out_path, "w") as f:
        json.dump(record, f)
    return state, result


train.device_batch, train.train_loop = recording_device_batch, recording_train_loop
app.run(run.main, flags_parser=run._parse_flags)
