"""One of two processes of a DMAF smoke training run over localhost (tests/test_parallel.py):
usage `two_process_train.py <process id> <port> <workdir> <data root> <out.json>`.

Initialises jax.distributed from the standard environment variables (as `run.py` does), trains
through `dmaf_jax.train.train` with a global batch of 2 (one row per process), and writes the
case indices this process read per step and a checksum of its final parameters."""

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

pid, port, workdir, root, out_path = sys.argv[1:6]
os.environ.update(
    JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=pid
)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from common import parallel  # noqa: E402

parallel.initialize()
flags.FLAGS.mark_as_parsed()

from configs import dmaf_brats2020  # noqa: E402
from dmaf_jax import train  # noqa: E402

cfg = dmaf_brats2020.get_config("smoke")
cfg.data.root = root
cfg.data.batch_size = 2
cfg.train.log_every = 1

read, final = [], []
device_batch, train_loop = train.device_batch, train.train_loop


def recording_device_batch(cfg, batch, shard=None):
    read.append(np.asarray(batch["index"]).tolist())
    return device_batch(cfg, batch, shard)


def capturing_train_loop(*args, **kwargs):
    state, result = train_loop(*args, **kwargs)
    final.append(state)
    return state, result


train.device_batch, train.train_loop = recording_device_batch, capturing_train_loop
train.train(cfg, workdir)
params = final[0].params
digest = hashlib.sha256()
for x in jax.tree.leaves(params):
    digest.update(np.asarray(x.addressable_data(0)).tobytes())
checksum = digest.hexdigest()
with open(out_path, "w") as f:
    json.dump({"read": read, "checksum": checksum, "devices": jax.device_count()}, f)
