"""Processes of one pool in two pid namespaces that share /dev/shm.

Containers of one pod, or a container run with `--ipc=host`, share /dev/shm
but not a pid namespace: each sees the other's pids as absent (or as some
unrelated process of its own). Liveness must not depend on pids
(docs/design.md, "Liveness"): a process alive in the other namespace is
alive, one killed there is dead, and no live block is reclaimed or handed
out again.

The "container" is a process started through `unshare --pid --fork
--mount-proc` (root only): a pid namespace of its own, where the program is
pid 1 and /proc shows only that namespace, while /dev/shm is the mount of
the test (a private tmpfs when run as the CI runs it) and the environment,
`PYARRAYPOOL_POOL` included, is inherited, so it joins the same pool.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from test_faults import assert_left_nothing, programs  # noqa: F401  (fixture)

REQUIRE_ROOT_ENV = "PYARRAYPOOL_REQUIRE_ROOT_TESTS"
UNSHARE = shutil.which("unshare")


@pytest.fixture
def other_pid_namespace():
    """The command prefix that runs a program in a new pid namespace. Skips
    (with the reason) unless root with `unshare`; PYARRAYPOOL_REQUIRE_ROOT_TESTS=1
    (set by .ci/run) turns that skip into a failure."""
    why = None
    if os.geteuid() != 0:
        why = "needs root: processes in another pid namespace are started with unshare --pid"
    elif UNSHARE is None:
        why = "needs unshare (util-linux) to start processes in another pid namespace"
    if why:
        if os.environ.get(REQUIRE_ROOT_ENV) == "1":
            pytest.fail(f"{REQUIRE_ROOT_ENV}=1 but {why}")
        pytest.skip(why)
    prefix = [UNSHARE, "--pid", "--fork", "--mount-proc"]
    # Root without the capability (a container without CAP_SYS_ADMIN) fails
    # here, loudly: that is not a reason to skip.
    probe = subprocess.run(prefix + ["sh", "-c", "echo $$"], capture_output=True, text=True,
                           timeout=30)
    assert probe.returncode == 0 and probe.stdout.strip() == "1", (
        f"{prefix} does not start a pid namespace: exit {probe.returncode}, "
        f"stdout {probe.stdout!r}, stderr {probe.stderr!r}")
    return prefix


# Arrays carry a pattern derived from their name: any process can check any
# array it holds, whoever made it.
COMMON = r'''
import json, zlib
KB = 1024
# Sizes whose block is exactly the size plus its 64-byte header.
OWN_SIZES = (64 * KB, 256 * KB, 1024 * KB)

def pattern(name, n):
    return np.random.default_rng(zlib.crc32(name.encode())).integers(0, 256, n, dtype=np.uint8)

def filled(name, n):
    a = pyarraypool.empty(n, dtype=np.uint8)
    a[:] = pattern(name, n)
    return a

def bad_arrays(held):
    """Names of the arrays in `held` whose bytes are not their pattern."""
    return sorted(k for k, a in held.items() if not np.array_equal(a, pattern(k, a.size)))

def churn():
    """Allocations that take any free block of the sizes the killed processes
    held (and more), written all over; returned to be checked and dropped."""
    fresh = []
    for n in OWN_SIZES * 6 + (256 * KB + 64, 2048 * KB):
        a = pyarraypool.empty(n, dtype=np.uint8)
        a[:] = 0xEE
        fresh.append(a)
    return fresh

def stats_dict(s):
    return {"used_bytes": s.used_bytes, "live_blocks": s.live_blocks,
            "pending_transfers": s.pending_transfers, "processes": s.processes,
            "pids": sorted(s.pids)}

def send_blob(fd, obj):
    b = pickle.dumps(obj)
    os.write(fd, struct.pack("<I", len(b)) + b)  # below PIPE_BUF: one atomic write

def recv_blob(fd):
    head = read_exactly(fd, 4)
    return pickle.loads(read_exactly(fd, struct.unpack("<I", head)[0]))

def read_exactly(fd, n):
    buf = b""
    while len(buf) < n:
        ready, _, _ = select.select([fd], [], [], 60)
        assert ready, "no word from the worker within 60 s"
        chunk = os.read(fd, n - len(buf))
        assert chunk, "the worker closed its pipe"
        buf += chunk
    return buf

def worker(prefix, w):
    """A process of one side, killed later: arrays only it holds, and one it
    sends (twice pickled: one pickle for each side)."""
    own = [filled(f"{prefix}-own-{i}", n) for i, n in enumerate(OWN_SIZES)]
    sent = filled(f"{prefix}-sent", 128 * KB)
    send_blob(w, (os.getpid(), pickle.dumps(sent), pickle.dumps(sent)))
    while True:
        time.sleep(60)

def start_worker(prefix):
    """Forks worker(prefix); returns its pid and its two pickles."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        worker(prefix, w)
    os.close(w)
    got = recv_blob(r)
    os.close(r)
    assert got[0] == pid
    return got

def own_arrays(prefix, held):
    for i, n in enumerate(OWN_SIZES):
        held[f"{prefix}-own-{i}"] = filled(f"{prefix}-own-{i}", n)
'''

# The container side: its own pid namespace; pid 1 there. Answers one JSON
# line per command read from stdin.
NS_PROGRAM = r'''
import os, pickle, select, signal, struct, sys, time, traceback
import numpy as np
import pyarraypool
from pyarraypool import _core
''' + COMMON + r'''

def reply(**kw):
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()

nk, nk_for_me, nk_for_host = start_worker("nk")
held = {"nk-sent": pickle.loads(nk_for_me)}
own_arrays("n", held)
held["n-shared"] = filled("n-shared", 512 * KB)
to_host = filled("n-to-host", 192 * KB)
token = _core._pool_token()
reply(pid=os.getpid(), nk=nk, token=token, pidns=os.readlink("/proc/self/ns/pid"),
      control_ino=os.stat(f"/dev/shm/pyarraypool-{token}").st_ino,
      send={"n-shared": pickle.dumps(held["n-shared"]).hex(),
            "n-to-host": pickle.dumps(to_host).hex(), "nk-sent": nk_for_host.hex()})
del to_host  # only the host holds it now (once it has loaded it)

for line in sys.stdin:
    cmd = json.loads(line)
    try:
        what = cmd["cmd"]
        if what == "load":
            for name, blob in cmd["arrays"].items():
                held[name] = pickle.loads(bytes.fromhex(blob))
            reply(bad=bad_arrays(held), names=sorted(held))
        elif what == "kill":
            os.kill(nk, signal.SIGKILL)
            _, status = os.waitpid(nk, 0)
            reply(signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None)
        elif what == "collect":
            freed = pyarraypool.collect()
            reply(freed=freed, stats=stats_dict(pyarraypool.stats()), bad=bad_arrays(held))
        elif what == "churn":
            fresh = churn()
            bad = bad_arrays(held)
            spoiled = sum(1 for a in fresh if not (a == 0xEE).all())
            del fresh
            reply(bad=bad, spoiled=spoiled)
        elif what == "check":
            reply(bad=bad_arrays(held), stats=stats_dict(pyarraypool.stats()))
        elif what == "exit":
            bad = bad_arrays(held)
            held.clear()
            _core._verify()
            reply(bad=bad)
            break
    except BaseException:
        reply(error=traceback.format_exc())
        break
'''


# The host side: the program of the test (its own pool, its own session).
HOST_PROGRAM = r'''
say_token()
start = settle()
assert start.used_bytes == 0 and start.live_blocks == 0, start
me = os.getpid()

# The host's worker, killed later.
hk, hk_for_me, hk_for_ns = start_worker("hk")
held = {"hk-sent": pickle.loads(hk_for_me)}
own_arrays("h", held)
held["h-shared"] = filled("h-shared", 384 * KB)
to_ns = filled("h-to-ns", 320 * KB)

# The container: inherits the environment (the pool's name) and /dev/shm.
ns = subprocess.Popen(NS_PREFIX + [sys.executable, "-c", NS_PROGRAM], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, text=True)

def answer():
    ready, _, _ = select.select([ns.stdout], [], [], 60)
    assert ready, "no answer from the container within 60 s"
    line = ns.stdout.readline()
    assert line, f"the container ended (exit {ns.wait()})"
    got = json.loads(line)
    assert "error" not in got, "the container failed:\n" + got["error"]
    return got

def ask(cmd, **kw):
    ns.stdin.write(json.dumps(dict(cmd=cmd, **kw)) + "\n")
    ns.stdin.flush()
    return answer()

def churn_both():
    """Allocations on both sides that take the freed blocks and more: every
    live array stays as it was."""
    got = ask("churn")
    assert got["bad"] == [] and got["spoiled"] == 0, got
    fresh = churn()
    assert bad_arrays(held) == [] and all((a == 0xEE).all() for a in fresh)
    del fresh
    _core._verify()

try:
    hello = answer()
    # It is another pid namespace (pid 1 there), in the same pool, on the same files.
    assert hello["pid"] == 1 and hello["nk"] > 1, hello
    assert hello["pidns"] != os.readlink("/proc/self/ns/pid"), hello
    assert hello["token"] == _core._pool_token(), hello
    assert hello["control_ino"] == os.stat(f"/dev/shm/pyarraypool-{hello['token']}").st_ino
    for name, blob in hello["send"].items():
        held[name] = pickle.loads(bytes.fromhex(blob))
    got = ask("load", arrays={"h-shared": pickle.dumps(held["h-shared"]).hex(),
                               "h-to-ns": pickle.dumps(to_ns).hex(),
                               "hk-sent": hk_for_ns.hex()})
    del to_ns  # only the container holds it now
    assert got["bad"] == [] and bad_arrays(held) == [], (got, bad_arrays(held))

    # Every array of both sides and both workers is live: 4 processes, 18 blocks.
    live = {"h-own-0": 64 * KB, "h-own-1": 256 * KB, "h-own-2": 1024 * KB,
             "h-shared": 384 * KB, "h-to-ns": 320 * KB, "hk-sent": 128 * KB,
             "n-own-0": 64 * KB, "n-own-1": 256 * KB, "n-own-2": 1024 * KB,
             "n-shared": 512 * KB, "n-to-host": 192 * KB, "nk-sent": 128 * KB}
    killed = 2 * sum(n + 64 for n in OWN_SIZES)   # hk-own-*, nk-own-*
    expected_used = sum(n + 64 for n in live.values())
    for _ in range(3):  # each side collects: nobody is reclaimed
        got = ask("collect")
        assert got["bad"] == [], got
        pyarraypool.collect()
        s = pyarraypool.stats()
        assert s.processes == 4 and sorted(s.pids) == sorted([me, hk, 1, hello["nk"]]), s
        assert s.live_blocks == 18 and s.used_bytes == expected_used + killed, s
        assert got["stats"] == stats_dict(s), (got, s)
        assert bad_arrays(held) == []
    churn_both()

    # One process killed on each side; the survivors reclaim what only it held.
    os.kill(hk, signal.SIGKILL)
    assert os.waitstatus_to_exitcode(reap(hk)) == -signal.SIGKILL
    got = ask("kill")
    assert got["signal"] == signal.SIGKILL, got
    assert bad_arrays(held) == [], bad_arrays(held)
    got = ask("collect")  # the container reclaims first: both dead workers
    assert got["bad"] == [], got
    pyarraypool.collect()
    for _ in range(2):
        # Each side's stats() first empties its own cache of freed blocks
        # (other processes' caches count as used): the container's first.
        got = ask("check")
        s = pyarraypool.stats()
        assert s.processes == 2 and sorted(s.pids) == sorted([me, 1]), s
        assert s.live_blocks == 12 and s.used_bytes == expected_used, (s, expected_used)
        assert s.pending_transfers == 0, s
        assert got["bad"] == [] and got["stats"] == stats_dict(s), (got, s)
        assert bad_arrays(held) == []
        churn_both()
        pyarraypool.collect()

    got = ask("exit")
    assert got["bad"] == [], got
    ns.stdin.close()
    assert ns.wait(timeout=30) == 0
finally:
    if ns.poll() is None:
        ns.kill()
        ns.wait()
assert bad_arrays(held) == []
s = settle()
# The container's pid-1 process left; what only it held is freed.
only_ns = live["n-own-0"] + live["n-own-1"] + live["n-own-2"] + live["h-to-ns"] + 4 * 64
assert s.processes == 1 and s.pids == (me,), s
assert s.live_blocks == 8 and s.used_bytes == expected_used - only_ns, s
held.clear()
s = settle()
assert s.used_bytes == 0 and s.live_blocks == 0 and s.pending_transfers == 0, s
_core._verify()
print("OK")
'''


def test_processes_in_two_pid_namespaces_share_one_pool(programs, other_pid_namespace):  # noqa: F811
    """A host process and a container (another pid namespace, the same
    /dev/shm, the same PYARRAYPOOL_POOL) exchange arrays both ways as
    pickled handles; each side has a worker of its own that holds arrays
    and is SIGKILLed. The survivors reclaim exactly the killed workers'
    blocks, each sees the other alive, and no live array on either side
    changes: not at the kills, not after collect(), not after allocations
    that take every freed block."""
    out = programs.run(f"NS_PREFIX = {other_pid_namespace!r}\nNS_PROGRAM = {NS_PROGRAM!r}\n"
                       + COMMON + HOST_PROGRAM, timeout=120)
    assert "OK" in out
    assert_left_nothing(out)


# The program's root (the process whose import named the pool) runs on the
# host and never touches the pool itself; its only worker runs in another pid
# namespace, sends it an array and ends, the last process of the pool, with
# its pickle still in flight. The root's pid means nothing over there: the
# worker must not take the root for dead and remove the pool. Afterwards the
# root loads the array whole.
ROOT_ELSEWHERE = r'''
import os, pickle, subprocess, sys, time
import numpy as np
import pyarraypool
from pyarraypool import _core
WORKER = """
import os, pickle, sys, numpy as np, pyarraypool
a = pyarraypool.make_transferable(np.arange(100_000, dtype=np.float64) * 3)
sys.stdout.buffer.write(pickle.dumps(a))
"""
done = subprocess.run(NS_PREFIX + [sys.executable, "-c", WORKER], capture_output=True, timeout=60)
assert done.returncode == 0, done.stderr.decode()
time.sleep(0.6)    # a keeper would have removed an abandoned pool by now
b = pickle.loads(done.stdout)
assert (b == np.arange(100_000, dtype=np.float64) * 3).all()
say_token()
s = pyarraypool.stats()
assert s.pending_transfers == 0 and s.live_blocks == 1, s
del b
print("OK")
'''


def test_root_in_another_pid_namespace_keeps_its_pickles(programs, other_pid_namespace):  # noqa: F811
    out = programs.run(f"NS_PREFIX = {other_pid_namespace!r}\n" + ROOT_ELSEWHERE)
    assert "OK" in out
    assert_left_nothing(out)
