"""Faults: processes killed at any instant, pickles whose sender is gone, pid reuse.

Contract points 8, 10 and 14 (see /work/shared/guide/contract.md). Every
scenario runs in a child program of its own (its own pool), started in a new
session so that the whole process group can be killed if it hangs: each wait
is bounded and a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import fresh_env, group_alive, pool_files

# Common prelude of the child programs: bounded waits and small helpers.
PRELUDE = r'''
import gc, os, pickle, random, select, signal, struct, subprocess, sys, threading, time
import numpy as np
import pyarraypool
from pyarraypool import _core

def say_token():
    pyarraypool.stats()  # attaches
    print("TOKEN", _core._pool_token(), flush=True)

def read_byte(fd, timeout=60.0):
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, f"no word from the child within {timeout} s"
    b = os.read(fd, 1)
    assert b, "the child closed its pipe without a word"
    return b

def reap(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not die within {timeout} s")

def bounded(fn, timeout=10.0):
    """fn() in a thread; fails (instead of hanging) if it takes longer than timeout."""
    box = {}
    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: B036
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(timeout)
    if t.is_alive():
        print(f"HANG: still blocked after {timeout} s", flush=True)
        os._exit(3)
    if "error" in box:
        raise box["error"]
    return box["value"], time.monotonic() - t0

def start_time(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])

def settle():
    gc.collect()
    pyarraypool.collect()
    return pyarraypool.stats()
'''


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Programs:
    """Runs child programs from files, each in its own session and pool."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.tokens: set[str] = set()
        self.count = 0

    def run(self, code: str, *, timeout: float = 60, env: dict[str, str] | None = None,
            head: str = ""):
        """`head` (dedented) runs before the prelude, hence before `import pyarraypool`."""
        self.count += 1
        base = self.tmp_path / f"prog{self.count}"
        script = base.with_suffix(".py")
        script.write_text(textwrap.dedent(head) + PRELUDE + textwrap.dedent(code))
        with open(f"{base}.out", "w+") as out, open(f"{base}.err", "w+") as err:
            proc = subprocess.Popen([sys.executable, str(script)], env=env or fresh_env(),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout)
                timed_out = False
                # Give helper processes (resource tracker, forkserver, workers
                # still leaving) a moment to end on their own.
                deadline = time.monotonic() + 5
                while group_alive(proc.pid) and time.monotonic() < deadline:
                    time.sleep(0.01)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)  # workers left behind, and the program if it hangs
            proc.wait()
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        self.tokens.update(re.findall(r"^TOKEN ([0-9a-f]{32})$", stdout, re.M))
        if timed_out or proc.returncode != 0:
            what = f"timed out after {timeout} s" if timed_out else "failed"
            raise AssertionError(f"child program {what} (exit {proc.returncode})\n"
                                 f"stdout:\n{stdout}\nstderr:\n{stderr}")
        return stdout

    def cleanup(self) -> None:
        # A program that failed may have left its pool behind: remove it, so
        # that one failure does not also leave /dev/shm dirty.
        for token in self.tokens:
            for name in pool_files(token):
                try:
                    os.unlink("/dev/shm/" + name)
                except FileNotFoundError:
                    pass


@pytest.fixture
def programs(tmp_path):
    p = Programs(tmp_path)
    yield p
    p.cleanup()


def assert_left_nothing(stdout: str) -> None:
    tokens = re.findall(r"^TOKEN ([0-9a-f]{32})$", stdout, re.M)
    assert tokens, "the child did not print its token"
    for t in tokens:
        assert pool_files(t) == [], f"the program left {pool_files(t)} in /dev/shm"


# --- (a) a worker killed while it holds arrays --------------------------------


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_worker_killed_while_holding_arrays_is_reclaimed(programs, method):
    out = programs.run(f'''
    import multiprocessing as mp

    def worker(conn, shared):
        own = [pyarraypool.zeros(100_000) for _ in range(4)]   # 4 x 800 kB, only here
        for a in own:
            a[:] = 1
        shared[:] = 7                                           # held by both
        view = shared[10:20]                                    # a view holds it too
        conn.send("ready")
        time.sleep(120)

    if __name__ == "__main__":
        say_token()
        start = settle().used_bytes
        shared = pyarraypool.zeros(1000)
        with_shared = settle().used_bytes
        ctx = mp.get_context("{method}")
        here, there = ctx.Pipe()
        p = ctx.Process(target=worker, args=(there, shared))
        p.start()
        assert here.poll(60), "the worker did not get ready"
        assert here.recv() == "ready"
        s = pyarraypool.stats()
        assert s.processes == 2, s
        assert s.used_bytes >= with_shared + 4 * 800_000, s

        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        assert p.exitcode == -signal.SIGKILL, p.exitcode
        freed = pyarraypool.collect()
        assert freed >= 4 * 800_000, f"collect() freed {{freed}} bytes"
        s = pyarraypool.stats()
        assert s.used_bytes == with_shared, (s, with_shared)
        assert s.processes == 1 and s.pids == (os.getpid(),), s
        assert (shared == 7).all()          # the parent's array is untouched
        _core._verify()
        # The dead worker's hold on `shared` is gone too: dropping it frees it.
        del shared
        s = settle()
        assert s.used_bytes == start, (s, start)
        assert s.live_blocks == 0, s
        _core._verify()
        print("OK")
    ''')
    assert "OK" in out
    assert_left_nothing(out)


# --- (b) a process killed while it holds the pool lock -------------------------

LOCK_HOLDER_KILLED = '''
import multiprocessing as mp

def locker(conn, keep):
    held = pyarraypool.zeros(200_000)   # 1.6 MB only this process holds
    held[:] = 5
    assert keep[3] == 3
    _core._test_lock_forever()
    conn.send("locked")
    time.sleep(120)

if __name__ == "__main__":
    say_token()
    start = settle().used_bytes
    keep = pyarraypool.make_transferable(np.arange(1000.0))
    with_keep = settle().used_bytes
    if METHOD == "os.fork":
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                held = pyarraypool.zeros(200_000)
                held[:] = 5
                _core._test_lock_forever()
                os.write(w, b"L")
                time.sleep(120)
            finally:
                os._exit(0)
        os.close(w)
        assert read_byte(r) == b"L"
        kill = lambda: os.kill(pid, signal.SIGKILL)
        wait_dead = lambda: reap(pid)
    else:
        ctx = mp.get_context(METHOD)
        here, there = ctx.Pipe()
        p = ctx.Process(target=locker, args=(there, keep))
        p.start()
        assert here.poll(60), "the locker did not take the lock"
        assert here.recv() == "locked"
        kill = lambda: os.kill(p.pid, signal.SIGKILL)
        def wait_dead():
            p.join(10)
            assert p.exitcode == -signal.SIGKILL, p.exitcode

    # The lock really is held: an allocation waits for it.
    box = {}
    def waiter():
        box["arr"] = pyarraypool.zeros(1000)
    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    t.join(0.5)
    assert t.is_alive(), "an allocation went through while another process held the lock"

    kill()
    wait_dead()
    # The thread that was waiting when the owner died gets the lock ...
    t0 = time.monotonic()
    t.join(10)
    if t.is_alive():
        print("HANG: the waiter is still blocked 10 s after the lock owner died", flush=True)
        os._exit(3)
    waited = time.monotonic() - t0
    # ... and so does a new allocation.
    arr2, took = bounded(lambda: pyarraypool.make_transferable(np.ones(5000)))
    assert (box["arr"] == 0).all() and (arr2 == 1).all()
    _core._verify()
    s = pyarraypool.stats()
    assert s.processes == 1, s
    # What the dead process held (its 1.6 MB block, its hold on `keep`) is back.
    del box, arr2
    s = settle()
    assert s.used_bytes == with_keep, (s, with_keep)
    assert (keep == np.arange(1000.0)).all()
    del keep
    s = settle()
    assert s.used_bytes == start and s.live_blocks == 0, s
    _core._verify()
    print(f"OK waited {waited:.3f} s, next allocation {took:.3f} s")
'''


@pytest.mark.parametrize("method", ["os.fork", "fork", "spawn"])
def test_process_killed_holding_the_lock_does_not_block_the_pool(programs, method):
    out = programs.run(f"METHOD = {method!r}\n" + LOCK_HOLDER_KILLED)
    assert "OK" in out
    assert_left_nothing(out)


def test_processes_killed_at_random_instants_leave_a_consistent_pool(programs):
    """Workers churn (allocate, free, pickle, load) and are SIGKILLed at random
    instants, inside or outside the lock, while the parent churns too. The
    parent never hangs, the pool verifies, and every byte comes back."""
    out = programs.run('''
    pyarraypool.configure(transfer_timeout=0.5)
    SIZES = [0, 8, 1000, 40_000, 300_000]

    def churn(rng, stop=lambda: False, steps=None):
        held = []
        n = 0
        while not stop() and (steps is None or n < steps):
            n += 1
            op = rng.random()
            if op < 0.45 or not held:
                a = pyarraypool.empty(rng.choice(SIZES), transfer_required=rng.random() < 0.5)
                if a.size:
                    a[0] = 1.0
                held.append(a)
            elif op < 0.8:
                held.pop(rng.randrange(len(held)))
            else:
                b = pickle.loads(pickle.dumps(held[rng.randrange(len(held))][1:]))
                del b
            if len(held) > 16:
                held.pop(0)
        return n

    say_token()
    keep = pyarraypool.make_transferable(np.arange(100.0))
    start = settle().used_bytes
    stop_parent = threading.Event()
    parent_steps = []
    def parent_churn():
        parent_steps.append(churn(random.Random(1), stop_parent.is_set))
    pt = threading.Thread(target=parent_churn, daemon=True)
    pt.start()

    rng = random.Random(12345)
    kills = 0
    for round_ in range(25):
        pids = []
        for k in range(2):
            pid = os.fork()
            if pid == 0:
                try:
                    churn(random.Random(round_ * 10 + k))
                finally:
                    os._exit(0)
            pids.append(pid)
        time.sleep(rng.uniform(0.005, 0.06))
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for pid in pids:
            reap(pid)
            kills += 1
        # Between rounds the pool answers within a bounded time and verifies.
        _, took = bounded(lambda: _core._verify())
    stop_parent.set()
    pt.join(20)
    assert not pt.is_alive(), "the parent's churn thread hangs"
    assert parent_steps and parent_steps[0] > 0

    # Pickles the killed workers made but never loaded expire after 0.5 s.
    time.sleep(0.7)
    s = settle()
    assert s.processes == 1, s
    assert s.used_bytes == start, (s, start)
    assert s.pending_transfers == 0, s
    assert (keep == np.arange(100.0)).all()
    _core._verify()
    # Still usable: fill and drain.
    arrs = [pyarraypool.zeros(50_000) for _ in range(20)]
    del arrs
    assert settle().used_bytes == start
    print("OK", kills, "kills")
    ''', timeout=120)
    assert "OK" in out
    assert_left_nothing(out)


# --- (c) pickles whose sender is gone --------------------------------------------


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pickle_outlives_its_sender(programs, method):
    """A worker returns make_transferable(result) and exits before the parent
    loads the pickle: the block waits for the pickle (point 8)."""
    out = programs.run(f'''
    import multiprocessing as mp

    def produce(k):
        out = pyarraypool.make_transferable(np.full(50_000, float(k)))
        return os.getpid(), pickle.dumps(out)

    def produce_direct(k):
        return pyarraypool.make_transferable(np.full((100, 100), float(k)))

    def gone(pid):
        try:
            with open(f"/proc/{{pid}}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X", "x")
        except (FileNotFoundError, ProcessLookupError):  # gone before open, or before read
            return True

    if __name__ == "__main__":
        say_token()
        start = settle().used_bytes
        ctx = mp.get_context("{method}")
        with ctx.Pool(2, maxtasksperchild=1) as pool:
            results = pool.map(produce, range(4), chunksize=1)
            pids = [pid for pid, _ in results]
            assert len(set(pids)) == 4, pids       # one process per task
            deadline = time.monotonic() + 30
            while not all(gone(p) for p in pids):
                assert time.monotonic() < deadline, "the workers did not exit"
                time.sleep(0.02)
            # Every sender has exited; reclaiming after them keeps the blocks.
            pyarraypool.collect()
            s = pyarraypool.stats()
            assert s.pending_transfers == 4 and s.pending_blocks == 4, s
            assert s.used_bytes >= start + 4 * 400_000, s
            arrays = [pickle.loads(blob) for _, blob in results]
            for k, a in enumerate(arrays):
                assert isinstance(a, pyarraypool.TransferableArray)
                assert (a == k).all(), (k, a[:5])
            s = pyarraypool.stats()
            assert s.pending_transfers == 0, s

            # The usual way: the worker returns the array itself and exits.
            direct = pool.map(produce_direct, range(6), chunksize=1)
            for k, a in enumerate(direct):
                assert isinstance(a, pyarraypool.TransferableArray)
                assert a.shape == (100, 100) and (a == k).all(), k
        del results, arrays, direct, a
        s = settle()
        assert s.used_bytes == start and s.pending_transfers == 0, (s, start)
        _core._verify()
        print("OK")
    ''')
    assert "OK" in out
    assert_left_nothing(out)


def test_pickle_never_loaded_is_reclaimed_after_transfer_timeout(programs):
    out = programs.run('''
    pyarraypool.configure(transfer_timeout=1)
    say_token()
    start = settle().used_bytes

    # A pickle of an array nobody holds any more, never loaded.
    x = pyarraypool.make_transferable(np.arange(100_000.0))
    lost = pickle.dumps(x)
    # A pickle loaded in time.
    y = pyarraypool.make_transferable(np.arange(10.0))
    in_time = pickle.dumps(y)
    # A pickle made by a process that then exited, never loaded.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            z = pyarraypool.make_transferable(np.ones(50_000))
            os.write(w, pickle.dumps(z))
        finally:
            os._exit(0)
    os.close(w)
    orphan = b""
    while chunk := os.read(r, 65536):
        orphan += chunk
    assert os.waitpid(pid, 0)[1] == 0
    # A block still held here whose pickle expires.
    held = pyarraypool.make_transferable(np.arange(1000.0))
    held_blob = pickle.dumps(held)

    del x, y
    s = settle()
    assert s.pending_transfers == 4, s
    assert s.used_bytes >= start + 800_000 + 400_000, s
    # Before the timeout nothing is reclaimed.
    assert pyarraypool.collect() == 0
    assert pyarraypool.stats().pending_transfers == 4
    time.sleep(0.3)
    y2 = pickle.loads(in_time)
    assert (y2 == np.arange(10.0)).all()
    del y2

    time.sleep(1.5)
    freed = pyarraypool.collect()
    assert freed >= 800_000 + 400_000, freed
    s = pyarraypool.stats()
    assert s.pending_transfers == 0 and s.pending_blocks == 0, s
    # Only `held` remains, still valid.
    assert (held == np.arange(1000.0)).all()
    assert s.live_blocks == 1, s
    for blob in (lost, orphan):
        try:
            pickle.loads(blob)
        except pyarraypool.StaleHandleError:
            pass
        else:
            raise AssertionError("an expired pickle still loads")
    # The expired pickle of a block that is still held loads (the block exists).
    again = pickle.loads(held_blob)
    assert (again == held).all()
    del held, again
    s = settle()
    assert s.used_bytes == start and s.live_blocks == 0, (s, start)
    _core._verify()
    print("OK")
    ''')
    assert "OK" in out
    assert_left_nothing(out)


# --- (d) pid reuse -----------------------------------------------------------------

PID_REUSE = '''
say_token()
start = settle().used_bytes
keep = pyarraypool.make_transferable(np.arange(10.0))
with_keep = settle().used_bytes
token = _core._pool_token()
r, w = os.pipe()
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        held = pyarraypool.zeros(100_000)
        held[:] = 3
        os.write(w, b"R")
        read_byte(go_r)
        if HOLD_LOCK:
            _core._test_lock_forever()
        os.write(w, b"L")
        time.sleep(120)
    finally:
        os._exit(0)
os.close(w)
assert read_byte(r) == b"R"
child_start = start_time(pid)
s = pyarraypool.stats()
assert s.processes == 2 and pid in s.pids, s     # pid and start time match: alive
assert s.used_bytes >= with_keep + 800_000, s
os.write(go_w, b"g")
assert read_byte(r) == b"L"
os.kill(pid, signal.SIGKILL)
reap(pid)

# The kernel gives the dead child's pid to an unrelated process: simulate it
# by pointing the child's slot at a live process that started later.
time.sleep(0.05)   # start times have a 10 ms resolution
other = subprocess.Popen(["sleep", "60"])
try:
    assert start_time(other.pid) != child_start
    with open(f"/dev/shm/pyarraypool-{token}", "r+b") as f:
        import mmap
        with mmap.mmap(f.fileno(), 0) as m:
            # A slot: its id, then its hold list (nil: the slot's own page).
            slot = struct.pack("<QQ", (pid << 2) | 1, 2**64 - 1)
            at = m.find(slot)
            assert at >= 0 and at % 64 == 0 and m.find(slot, at + 1) == -1, at
            m[at:at + 8] = struct.pack("<Q", (other.pid << 2) | 1)

    arr, took = bounded(lambda: pyarraypool.zeros(10))
    del arr
    freed = pyarraypool.collect()
    s = pyarraypool.stats()
    assert other.pid not in s.pids and s.processes == 1, s
    assert s.used_bytes == with_keep, (s, with_keep, freed)
    _core._verify()
finally:
    other.kill()
    other.wait()
del keep
assert settle().used_bytes == start
print("OK")
'''


@pytest.mark.parametrize("hold_lock", [False, True], ids=["holding-blocks", "holding-lock"])
def test_slot_whose_pid_was_reused_counts_as_dead(programs, hold_lock):
    """A slot's owner is alive while the kernel holds its lock, whatever pid
    the slot names: a live process that has the slot's pid is somebody else,
    and the slot's owner is dead (its blocks and, if it held it, the lock are
    reclaimed)."""
    out = programs.run(f"HOLD_LOCK = {hold_lock}\n" + PID_REUSE)
    assert "OK" in out
    assert_left_nothing(out)


def test_child_killed_right_after_fork_is_reclaimed(programs):
    """A forked child killed before it has run any Python code (a pool's
    terminate() racing with a worker being replaced does this): what the
    parent reserved for it at fork time is reclaimed as soon as it is dead,
    and the program, ending normally, leaves nothing in /dev/shm."""
    out = programs.run('''
    say_token()
    keep = pyarraypool.make_transferable(np.arange(100_000.0))
    with_keep = settle().used_bytes
    for _ in range(10):
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        os.kill(pid, signal.SIGKILL)
        reap(pid)
    s = settle()
    assert s.processes == 1 and s.pids == (os.getpid(),), s
    del keep
    s = settle()
    assert s.used_bytes == with_keep - 800_064 and s.live_blocks == 0, s
    _core._verify()
    print("OK")
    ''')
    assert "OK" in out
    assert_left_nothing(out)


def test_pool_terminate_while_workers_are_replaced_leaves_a_balanced_pool(programs):
    """`with Pool(maxtasksperchild=1)` terminates the pool while it is
    forking replacement workers; afterwards the pool holds only what the
    parent holds and no phantom process."""
    out = programs.run('''
    import multiprocessing as mp

    def produce(k):
        return pyarraypool.make_transferable(np.full(1000, float(k)))

    if __name__ == "__main__":
        say_token()
        keep = pyarraypool.zeros(10)
        start = settle().used_bytes
        for round_ in range(30):
            with mp.get_context("fork").Pool(2, maxtasksperchild=1) as pool:
                out = pool.map(produce, range(6), chunksize=1)
            assert [int(a[0]) for a in out] == list(range(6))
            del out
            s = settle()
            assert s.processes == 1, (round_, s)
            assert s.used_bytes == start, (round_, s, start)
        print("OK")
    ''')
    assert "OK" in out
    assert_left_nothing(out)
