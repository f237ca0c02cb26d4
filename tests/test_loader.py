"""Grain worker processes end with the process that started them (common/loader.py)."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited


@pytest.mark.slow
@pytest.mark.skipif(not pathlib.Path("/proc").is_dir(), reason="needs /proc")
def test_workers_do_not_outlive_a_killed_main_process():
    script = (
        f"import sys, time; sys.path.insert(0, {str(REPO)!r})\n"
        "from absl import flags\n"
        "flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags\n"
        "import grain\n"
        "from common.loader import iterate\n"
        "it = iter(iterate(grain.MapDataset.range(10**6).map(float), workers=2, batch_size=2))\n"
        "next(it)\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(p.pid)], capture_output=True)
        children = [int(x) for x in out.stdout.split()]
        assert len(children) >= 2  # the two workers (and maybe multiprocessing's helpers)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(c) for c in children):
            time.sleep(0.2)
        assert not [c for c in children if _alive(c)]
    finally:
        if p.poll() is None:
            p.kill()
