"""A correct program prints nothing: no warning, nothing on stderr.

`multiprocessing.Pool.__exit__` terminates its workers (SIGTERM: no exit
handler runs), and a worker may still hold pool arrays then: ones it keeps in
a global, the arguments of a task still running. Reclaiming those is routine,
logged at DEBUG: the program stopped its own worker. Each program below runs
in a fresh program of its own with logging configured to print every
WARNING on stderr, and must leave stderr empty; the ones whose workers are
terminated while holding blocks also report how many reclaims they saw at
DEBUG, so that the test knows the case it is about did happen.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, fresh_env

METHODS = ["fork", "spawn", "forkserver"]
RUNS = 3

# Everything at WARNING and above reaches stderr (as an unconfigured program
# would show it, through Python's last-resort handler); DEBUG records of the
# pool are counted, not printed.
LOGGING = """
import logging
logging.basicConfig(level=logging.WARNING)
logging.getLogger().handlers[0].setLevel(logging.WARNING)
reclaims = []
class Count(logging.Handler):
    def emit(self, record):
        if getattr(record, "pyarraypool_event", {}).get("kind") == "reclaim":
            reclaims.append(record.pyarraypool_event)
pool_logger = logging.getLogger("pyarraypool")
pool_logger.setLevel(logging.DEBUG)
pool_logger.addHandler(Count())
"""

# Every worker keeps an array of the pool in a global (received by its
# initializer: inherited under fork, loaded from a pickle otherwise) and is
# still running a task on another array when the pool is terminated.
TERMINATED_HOLDERS = LOGGING + """
import json, multiprocessing, os, sys, time
import numpy as np, pyarraypool

kept = None

def init(arr):
    global kept
    kept = arr

def who(i):
    time.sleep(0.05)
    return os.getpid() if kept is not None else None

def busy(arr, i, ready):
    arr[i] = 1
    ready.set()
    time.sleep(60)

if __name__ == "__main__":
    ctx = multiprocessing.get_context(sys.argv[1])
    shared = pyarraypool.zeros(100_000)
    other = pyarraypool.zeros(50_000)
    m = ctx.Manager()
    ready = [m.Event() for _ in range(2)]
    with ctx.Pool(2, initializer=init, initargs=(shared,)) as pool:
        pids = set(pool.map(who, range(8), chunksize=1))
        assert None not in pids, pids
        # Both workers busy: neither can take the pool's "no more work"
        # sentinel and exit normally (which would be no event at all).
        for i in range(2):
            pool.apply_async(busy, (other, i, ready[i]))
        assert all(r.wait(30) for r in ready)
    m.shutdown()
    assert (other[:2] == 1).all()
    pyarraypool.collect()
    print(json.dumps({"workers": len(pids), "reclaims": len(reclaims)}), flush=True)
"""

EXECUTOR = LOGGING + """
import json, multiprocessing, sys
from concurrent.futures import ProcessPoolExecutor
import numpy as np, pyarraypool

kept = []

def keep(arr, i):
    kept.append(arr)
    arr[i] = i
    return i

if __name__ == "__main__":
    ctx = multiprocessing.get_context(sys.argv[1])
    shared = pyarraypool.zeros(1000)
    with ProcessPoolExecutor(2, mp_context=ctx) as ex:
        assert list(ex.map(keep, [shared] * 8, range(8))) == list(range(8))
    assert (shared[:8] == range(8)).all()
    pyarraypool.collect()
    print(json.dumps({"reclaims": len(reclaims)}), flush=True)
"""


def run_program(tmp_path, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs `code` as a script (spawn and forkserver import its functions by path)."""
    path = tmp_path / "program.py"
    path.write_text(code)
    out = subprocess.run([sys.executable, str(path), *args], env=fresh_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert out.stderr == "", out.stderr
    return out


@pytest.mark.parametrize("method", METHODS)
def test_pool_that_terminates_workers_holding_arrays_prints_nothing(tmp_path, method):
    for _ in range(RUNS):
        res = json.loads(run_program(tmp_path, TERMINATED_HOLDERS, method).stdout)
        # Each worker held `shared` and `other` when it was terminated:
        # reclaimed by this program, quietly, at DEBUG.
        assert res == {"workers": 2, "reclaims": 2}, res


@pytest.mark.parametrize("method", METHODS)
def test_process_pool_executor_prints_nothing(tmp_path, method):
    for _ in range(RUNS):
        run_program(tmp_path, EXECUTOR, method)


def test_seed_example_prints_nothing(tmp_path):
    # Its three start methods, twice; it configures no logging, so any
    # warning would reach stderr through Python's last-resort handler.
    code = open(os.path.join(REPO, "examples", "seed_example.py")).read()
    for _ in range(2):
        run_program(tmp_path, code)
