"""Every script in examples/ runs, as a program of its own, and checks its data.

Each example exits non-zero when a result is wrong; here each one runs in a
fresh program with a pool name of our choosing, must exit 0 and print its
result line, and must leave behind neither a process nor a file of its pool
in /dev/shm.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, fresh_env, group_alive, pool_files

EXAMPLES = os.path.join(REPO, "examples")
METHODS = ["fork", "spawn", "forkserver"]


def run_example(script: str, *args: str, timeout: float = 180) -> str:
    """Runs examples/`script` in its own session; returns its output once all of it is gone."""
    token = secrets.token_hex(16)
    with subprocess.Popen(
        [sys.executable, os.path.join(EXAMPLES, script), *args],
        env=fresh_env(PYARRAYPOOL_POOL=token),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"{script} ran over {timeout} s:\n{out}\n{err}") from None
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{out}\n{err}"
    # Helpers of multiprocessing (forkserver, resource tracker) notice the
    # program's end by themselves, a moment after it.
    deadline = time.monotonic() + 10
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group_alive(proc.pid) == [], f"{script} left processes running"
    assert pool_files(token) == [], f"{script} left its pool in /dev/shm"
    return out


def test_seed_example():
    out = run_example("seed_example.py")
    for method in METHODS:
        assert re.search(rf"^ *{method}: pyarraypool .* every plane checked$", out, re.M), out
    assert re.search(r"^pool after the runs: 0 bytes used in 0 blocks$", out, re.M), out


@pytest.mark.parametrize("method", METHODS)
def test_image_tiles(method):
    out = run_example("image_tiles.py", method)
    assert out == (f"image_tiles ({method}): 64 tiles of 256x256 inverted in place "
                   "by a Pool of 4; every tile checked\n")


@pytest.mark.parametrize("method", METHODS)
def test_queue_pipeline(method):
    out = run_example("queue_pipeline.py", method)
    assert out == (f"queue_pipeline ({method}): 24 arrays from 2 producers through "
                   "2 consumers; every result checked\n")


def test_joblib_pipeline():
    out = run_example("joblib_pipeline.py")
    assert out == ("joblib_pipeline: 8 chunks of 250000 int64 through 2 loky stages "
                   "on 2 workers; every result checked\n")


def test_every_example_is_run_here():
    tested = {"seed_example.py", "image_tiles.py", "queue_pipeline.py", "joblib_pipeline.py"}
    assert {f for f in os.listdir(EXAMPLES) if f.endswith(".py")} == tested
