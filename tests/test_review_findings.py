"""Regression tests for defects found reviewing the observability and program-root
changes (pool identity, PYARRAYPOOL_ROOT, snapshot, maintenance events, CLI)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest
from helpers import build_preload_shim, fresh_env, pool_files, run_python


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X", "x")


def _unlink_pool(token: str) -> None:
    for name in pool_files(token):
        try:
            os.unlink("/dev/shm/" + name)
        except FileNotFoundError:
            pass


# The root leaves the pool at exit (pyarraypool's finalizer), then lives on a
# little (here: an atexit handler registered before pyarraypool was imported,
# so it runs after). A worker of the program that leaves in that window with
# a pickle in flight keeps the pool "for the root", which will never attach
# again: nothing removes the pool when the program ends.
ROOT_LEFT = """
import atexit, os, subprocess, sys, time
atexit.register(time.sleep, 1.5)
import pyarraypool
worker = subprocess.Popen([sys.executable, "-c", '''
import pickle, time, numpy as np, pyarraypool
a = pyarraypool.zeros(1000, dtype=np.uint8)
blob = pickle.dumps(a)   # in flight, never loaded
print("ready", flush=True)
time.sleep(0.7)          # leaves while the root sits in its atexit handler
'''], stdout=subprocess.PIPE, text=True)
assert worker.stdout.readline() == "ready\\n"
print(os.environ["PYARRAYPOOL_POOL"], worker.pid, flush=True)
"""


def test_a_worker_leaving_after_the_root_left_does_not_leave_the_pool_behind() -> None:
    out = run_python(ROOT_LEFT)
    token, worker = out.stdout.split()
    try:
        deadline = time.time() + 30
        while not _gone(int(worker)) and time.time() < deadline:
            time.sleep(0.05)
        assert _gone(int(worker))
        time.sleep(0.2)
        assert pool_files(token) == [], "the program has ended; its pool is still in /dev/shm"
    finally:
        _unlink_pool(token)


# LD_PRELOAD shim: when pthread_mutex_lock is called from pap::EventLog::push
# (its code range in _core is given by the environment), it keeps the mutex
# 50 ms longer. Only the race window grows; no logic changes.
SLOW_PUSH_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static int (*real_lock)(pthread_mutex_t*);
int pthread_mutex_lock(pthread_mutex_t* m) {
  if (!real_lock) real_lock = dlsym(RTLD_NEXT, "pthread_mutex_lock");
  int r = real_lock(m);
  static unsigned long lo, hi;
  if (!hi) {
    const char* a = getenv("SLOWPUSH_LO"); const char* b = getenv("SLOWPUSH_HI");
    if (!a || !b) return r;
    lo = strtoul(a, 0, 16); hi = strtoul(b, 0, 16);
  }
  Dl_info info;
  void* ra = __builtin_return_address(0);
  if (dladdr(ra, &info) && info.dli_fname && strstr(info.dli_fname, "_core.") &&
      (unsigned long)((char*)ra - (char*)info.dli_fbase) >= lo &&
      (unsigned long)((char*)ra - (char*)info.dli_fbase) < hi) {
    struct timespec ts = {0, 50 * 1000 * 1000};
    nanosleep(&ts, 0);
  }
  return r;
}
"""

# A thread that makes one maintenance event per loop: with a transfer_timeout
# of 1 us, the pickle it made has expired by the collect() that follows.
CHURN = """
pyarraypool.stats()
stop = False
def churn():
    while not stop:
        a = pyarraypool.zeros(8, dtype=np.uint8)
        b = pickle.dumps(a)
        del a, b
        pyarraypool.collect()
t = threading.Thread(target=churn, daemon=True)
t.start()
"""

# One thread makes maintenance events continuously (a pickle expires at every
# collect()); the main thread forks. The pool lock is not held across fork
# (before_fork releases it), so the other thread can be inside EventLog::push
# at fork: the child inherits the event log's mutex locked and its first push
# waits forever -- while holding the shared pool lock.
FORK_DURING_PUSH = """
import json, logging, os, pickle, threading, time
import numpy as np, pyarraypool
lg = logging.getLogger("pyarraypool")
lg.addHandler(logging.NullHandler())
lg.propagate = False
""" + CHURN + """hung = failed = 0
for i in range(30):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            a = pyarraypool.zeros(8, dtype=np.uint8)
            b = pickle.dumps(a)
            del a, b
            pyarraypool.collect()
        except BaseException as e:   # e.g. a handle of a block the child does not hold
            os.write(2, f"child: {e!r}\\n".encode())
            code = 3
        os._exit(code)
    # The shim keeps the pool lock 50 ms per event and the churn thread
    # takes it again at once, so a child may wait seconds for it; a child
    # whose push() waits on a mutex nobody will unlock waits forever.
    deadline = time.time() + 30
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            failed += os.waitstatus_to_exitcode(status) != 0
            break
        time.sleep(0.01)
    else:
        hung += 1
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        break
stop = True
t.join(30)
print(json.dumps({"forks": i + 1, "hung": hung, "failed": failed}))
"""


def _push_range() -> tuple[int, int] | None:
    import pyarraypool._core as core

    nm = subprocess.run(["nm", "-C", "-S", "--defined-only", core.__file__],
                        capture_output=True, text=True, check=True).stdout
    for line in nm.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4 and parts[3] == "pap::EventLog::push(pap::PoolEvent const&)":
            lo = int(parts[0], 16)
            return lo, lo + int(parts[1], 16)
    return None


def test_a_fork_while_another_thread_records_an_event_does_not_hang_the_child(
    tmp_path: pathlib.Path,
) -> None:
    if shutil.which("nm") is None:
        pytest.skip("needs nm to find pap::EventLog::push for the LD_PRELOAD shim")
    rng = _push_range()
    if rng is None:
        pytest.skip("pap::EventLog::push is not a separate function in this build")
    lib = build_preload_shim(tmp_path, "slowpush", SLOW_PUSH_C)
    env = fresh_env(PYARRAYPOOL_TRANSFER_TIMEOUT="0.000001", LD_PRELOAD=lib,
                    SLOWPUSH_LO=f"{rng[0]:x}", SLOWPUSH_HI=f"{rng[1]:x}")
    out = run_python(FORK_DURING_PUSH, env=env, timeout=300)
    res = json.loads(out.stdout)
    assert res["hung"] == 0, f"a fork child deadlocked in EventLog::push ({res})"
    assert res["failed"] == 0, f"a fork child failed ({res}):\n{out.stderr}"


@pytest.mark.parametrize("interval", ["inf", "1e300"])
def test_stats_watch_rejects_an_interval_time_sleep_cannot_take(interval: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pyarraypool", "stats", "--watch", interval, "--pool", "0" * 32],
        env=fresh_env(), capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "--watch" in proc.stderr, proc.stderr



# Events another thread queued just before a fork (pushed under the pool lock,
# not drained yet: draining needs the GIL, which the forking thread holds) are
# copied into the child, which logs them again as if it had reclaimed them.
FORK_COPIES_EVENTS = """
import json, logging, os, pickle, tempfile, threading, time
import numpy as np, pyarraypool
ages = []
class Keep(logging.Handler):
    def emit(self, record):
        e = record.pyarraypool_event
        ages.append([e["bytes"], e["age"]])
lg = logging.getLogger("pyarraypool")
lg.addHandler(Keep())
lg.propagate = False
pyarraypool.stats()
stop = False
def churn():
    # Every pickle's block has its own size (the loop is paced so that k
    # stays far below the wrap): an event is told apart by (bytes, age), not
    # by age alone, which two events may share by chance.
    k = 0
    while not stop:
        k += 1
        a = pyarraypool.zeros(64 * (1 + k % 200_000), dtype=np.uint8)
        b = pickle.dumps(a)
        del a, b
        pyarraypool.collect()
        time.sleep(0.0001)
t = threading.Thread(target=churn, daemon=True)
t.start()
d = tempfile.mkdtemp()
for i in range(200):
    pid = os.fork()
    if pid == 0:
        ages.clear()
        pyarraypool.stats()
        with open(os.path.join(d, str(os.getpid())), "w") as f:
            json.dump(ages, f)
        os._exit(0)
    deadline = time.time() + 10
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.time() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            break
        time.sleep(0.002)
stop = True
t.join(30)
parent = {tuple(e) for e in ages}
copied = 0
for name in os.listdir(d):
    with open(os.path.join(d, name)) as f:
        copied += bool({tuple(e) for e in json.load(f)} & parent)
    os.unlink(os.path.join(d, name))
os.rmdir(d)
print(json.dumps({"children": 200, "copied": copied}))
"""


def test_a_fork_child_does_not_log_the_events_of_its_parent() -> None:
    # An expiry's age is measured in ns at the walk that dropped the pickle,
    # and each pickle's block has its own size: the same (bytes, age) in
    # parent and child is the same event, logged twice.
    env = fresh_env(PYARRAYPOOL_TRANSFER_TIMEOUT="0.000001")
    res = json.loads(run_python(FORK_COPIES_EVENTS, env=env, timeout=300).stdout)
    assert res["copied"] == 0, f"fork children logged their parent's events again ({res})"
