"""A stopped program's files go with it: the pool's keeper (docs/design.md, "Keeper").

A batch scheduler cancelling a job sends SIGTERM to its whole process group;
the OOM killer SIGKILLs one process, often the last one. Neither lets the
program's processes leave the pool, so before the keeper their files stayed
in /dev/shm until the next pyarraypool start or `python -m pyarraypool clean`.
The keeper, a process outside the program's session that ignores SIGTERM,
removes them within a second. Each test runs a program in its own session
(`start_new_session=True`, so its pgid is its pid) and leaves /dev/shm as it
found it.
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
from helpers import (
    KEEPER_COMM,
    build_preload_shim,
    fresh_env,
    group_alive,
    keeper_pids,
    kill_keeper,
    my_pool_token,
    pool_files,
    remove_pool_files,
    running,
)
from test_cleanup import KILLED, Live, kill_group, run_cli, token_of

import pyarraypool

# KILLED (test_cleanup.py): a parent and the workers of a fork Pool, all
# holding pool arrays, with a pickle in flight; it runs until it is killed.

# How long after the last process of a program dies its files may stay
# (the keeper looks every 150 ms), and how long its processes may take to go.
FILES_GONE_WITHIN = 1.0
PROCESSES_GONE_WITHIN = 3.0

# The workers have exited (they left the pool); the parent alone holds
# arrays, and a pickle of a worker's is in flight to it.
LAST_ONE_LEFT = """
    import multiprocessing as mp, os, pickle, time
    import numpy as np, pyarraypool

    def make(k):
        return pickle.dumps(pyarraypool.make_transferable(np.full(1000, float(k))))

    if __name__ == "__main__":
        x = pyarraypool.zeros(100_000)
        with mp.get_context("fork").Pool(2) as pool:
            blobs = pool.map(make, range(4))
            pool.close()
            pool.join()
        mine = [pickle.loads(b) for b in blobs[:2]]   # two loaded, two in flight
        assert pyarraypool.stats().processes == 1
        print("TOKEN", pyarraypool._core._pool_token(), flush=True)
        print("READY", flush=True)
        time.sleep(120)
"""


def wait_until(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


@pytest.fixture
def programs(tmp_path):
    """Starts Live programs; at teardown kills their groups and removes their
    files, so that a failed test leaves nothing (a keeper still watching one
    of them then ends by itself)."""
    started: list[Live] = []

    def start(code: str) -> Live:
        p = Live(code, tmp_path, f"prog{len(started)}")
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
        for token in re.findall(r"^TOKEN ([0-9a-f]{32})$", p.out_path.read_text(), re.M):
            remove_pool_files(token)


def started(programs, code: str) -> tuple[Live, str]:
    """A program, once it is READY, and its pool's token. Its keeper starts
    with the pool; give it the moment a Python start takes to watch it, so
    that the times below count from the kill, not from the keeper's start
    (without a keeper this only waits)."""
    p = programs(code)
    p.wait_for("^READY$")
    token = token_of(p.out_path.read_text())
    assert f"pyarraypool-{token}" in pool_files(token), p.output()
    wait_until(lambda: keeper_pids(token, watching=True), 5)
    return p, token


def assert_all_gone(p: Live, token: str, killed_at: float) -> None:
    """The files within FILES_GONE_WITHIN of the kill, then every process."""
    gone = wait_until(lambda: pool_files(token) == [], FILES_GONE_WITHIN)
    took = time.monotonic() - killed_at
    assert gone, (f"{took:.2f} s after the kill the program's files are still in /dev/shm: "
                  f"{pool_files(token)}\n{p.output()}")
    assert wait_until(lambda: not group_alive(p.proc.pid) and not keeper_pids(token),
                      PROCESSES_GONE_WITHIN), (
        f"left running: group {group_alive(p.proc.pid)}, keeper {keeper_pids(token)}")
    p.proc.wait()


def test_sigterm_to_the_program_group_removes_its_files(programs):
    """What a batch scheduler does when it cancels a job: SIGTERM to the
    group. Every process dies at once without leaving the pool."""
    p, token = started(programs, KILLED)
    os.killpg(p.proc.pid, signal.SIGTERM)
    killed_at = time.monotonic()
    assert_all_gone(p, token, killed_at)
    assert p.proc.returncode == -signal.SIGTERM, p.output()


def test_oom_kill_of_the_last_process_removes_its_files(programs):
    """The workers have exited; the OOM killer SIGKILLs the parent, the last
    process on the pool, which still holds arrays and has pickles in flight."""
    p, token = started(programs, LAST_ONE_LEFT)
    os.kill(p.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert_all_gone(p, token, killed_at)


def test_sigkill_to_the_program_group_removes_its_files(programs):
    """SIGKILL to the whole group at once: the keeper has its own session,
    so the signal does not reach it, and it removes the files as for
    SIGTERM. (Only a SIGKILL that reaches the keeper too, such as killing
    every process of a cgroup, leaves the files to the next start or to
    `clean`: see test_cleanup.py and docs/faq.md.)"""
    p, token = started(programs, KILLED)
    keepers = keeper_pids(token)
    assert keepers, "the pool has no keeper"
    for pid in keepers:
        assert os.getpgid(pid) != p.proc.pid and os.getsid(pid) != os.getsid(p.proc.pid)
    os.killpg(p.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert_all_gone(p, token, killed_at)


# A program that uses its pool for a while: processes come and go (a fork
# Pool per round, whose workers leave), arrays are made, checked and dropped
# all the time, and one array lives throughout. It prints its pool's identity
# at the start and at the end: the same instance means the pool was never
# removed and made again under it.
LONG_RUNNING = """
    import multiprocessing as mp, os, sys, time
    import numpy as np, pyarraypool

    def square(a):
        return pyarraypool.make_transferable(a * a)

    if __name__ == "__main__":
        keep = pyarraypool.make_transferable(np.arange(10_000.0))
        print("TOKEN", pyarraypool._core._pool_token(), flush=True)
        print("INSTANCE", pyarraypool.pool_identity()["instance"], flush=True)
        print("READY", flush=True)
        sys.stdin.readline()           # the test has found the keeper
        end = time.monotonic() + 4.0
        rounds = 0
        while time.monotonic() < end:
            with mp.get_context("fork").Pool(2) as pool:
                args = [pyarraypool.make_transferable(np.full(1000, float(k))) for k in range(4)]
                out = pool.map(square, args)
                pool.close()        # the workers leave (terminate() would kill them)
                pool.join()
            assert [float(o[0]) for o in out] == [float(k * k) for k in range(4)]
            del args, out
            for _ in range(5):
                t = pyarraypool.empty(50_000)
                t[:] = rounds
                assert (t == rounds).all()
                del t
                time.sleep(0.05)
            rounds += 1
        assert (keep == np.arange(10_000.0)).all()
        s = pyarraypool.stats()
        print("PIDS", *s.pids, flush=True)
        print("INSTANCE", pyarraypool.pool_identity()["instance"], flush=True)
        print("ROUNDS", rounds, flush=True)
"""


def test_keeper_never_removes_the_pool_of_a_live_program(programs):
    p = programs(LONG_RUNNING)
    p.wait_for("^READY$")
    token = token_of(p.out_path.read_text())
    assert wait_until(lambda: keeper_pids(token, watching=True), 10), "the pool has no keeper"
    (keeper,) = keeper_pids(token)
    # Outside the program's session, so that a signal to its group or
    # session does not reach it.
    assert os.getsid(keeper) != os.getsid(p.proc.pid) and os.getpgid(keeper) != p.proc.pid
    assert p.proc.stdin is not None
    p.proc.stdin.write(b"go\n")
    p.proc.stdin.flush()
    control = f"/dev/shm/pyarraypool-{token}"
    inode = os.stat(control).st_ino
    # Never removed while the program runs (it prints ROUNDS last, before
    # its exit removes the pool).
    while "ROUNDS" not in p.out_path.read_text():
        assert p.proc.poll() is None, p.output()
        assert os.stat(control).st_ino == inode, p.output()
        assert running(keeper)
        time.sleep(0.05)
    assert p.proc.wait(30) == 0, p.output()
    out = p.out_path.read_text()
    instances = re.findall(r"^INSTANCE ([0-9a-f]{32})$", out, re.M)
    assert len(instances) == 2 and instances[0] == instances[1], out
    assert int(re.search(r"^ROUNDS (\d+)$", out, re.M).group(1)) >= 3, out
    pids = [int(x) for x in re.search(r"^PIDS(.*)$", out, re.M).group(1).split()]
    assert pids == [p.proc.pid], out          # the keeper is none of the pool's processes
    assert p.err_path.read_text() == "", "a correct program printed on stderr:\n" + p.output()
    # The program ended normally: it removed its pool, and the keeper went.
    assert pool_files(token) == [], pool_files(token)
    assert wait_until(lambda: not running(keeper), PROCESSES_GONE_WITHIN), "the keeper stayed"
    assert not group_alive(p.proc.pid)


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_keeper_is_small_silent_and_holds_nothing_of_ours():
    """This test process's own pool has a keeper: it ignores SIGINT, SIGTERM
    and SIGHUP, has its own session, has /dev/null as stdin, stdout and
    stderr and no other file open, maps no data segment and no NumPy, and
    is small."""
    token = my_pool_token()
    assert wait_until(lambda: keeper_pids(token, watching=True), 10), "this pool has no keeper"
    (keeper,) = keeper_pids(token)
    st = _status(keeper)
    assert st["Name"] == KEEPER_COMM
    ignored = int(st["SigIgn"], 16)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        assert ignored & (1 << (sig - 1)), (sig, st["SigIgn"])
    assert os.getsid(keeper) == keeper and os.getsid(keeper) != os.getsid(0)
    fd_dir = f"/proc/{keeper}/fd"
    fds = {int(fd): os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir)}
    assert fds == {0: "/dev/null", 1: "/dev/null", 2: "/dev/null"}, fds
    with open(f"/proc/{keeper}/maps") as f:
        maps = f.read()
    assert "numpy" not in maps
    assert f"pyarraypool-{token}-" not in maps, "the keeper maps a data segment"
    rss_kib = int(st["VmRSS"].split()[0])
    assert rss_kib < 24 * 1024, f"the keeper's RSS is {rss_kib} KiB"
    assert keeper not in pyarraypool.stats().pids


def test_a_killed_keeper_leaves_the_pool_working_and_clean_still_removes_it(programs):
    """If the keeper itself is SIGKILLed with the program (every process of
    a cgroup at once), the files stay until the next start or `clean`, as
    they did before there was a keeper: nothing else breaks."""
    p, token = started(programs, KILLED)
    assert kill_keeper(token), "the pool has no keeper"
    kill_group(p.proc.pid)
    p.proc.wait()
    time.sleep(0.5)
    assert f"pyarraypool-{token}" in pool_files(token)
    r = run_cli("clean")
    assert r.returncode == 0 and f"pyarraypool-{token}" in r.stdout, r.stdout + r.stderr
    assert pool_files(token) == []


# LD_PRELOAD shim: posix_spawn (only the keeper's start calls it) waits 200 ms
# before spawning, so the thread that spawns the keeper is surely still
# there when the program forks. Only the race window grows.
SLOW_SPAWN_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <spawn.h>
#include <time.h>
int posix_spawn(pid_t* pid, const char* path, const posix_spawn_file_actions_t* actions,
                const posix_spawnattr_t* attr, char* const argv[], char* const envp[]) {
  static int (*real)(pid_t*, const char*, const posix_spawn_file_actions_t*,
                     const posix_spawnattr_t*, char* const[], char* const[]);
  if (!real) real = dlsym(RTLD_NEXT, "posix_spawn");
  struct timespec ts = {0, 200 * 1000 * 1000};
  nanosleep(&ts, 0);
  return real(pid, path, actions, attr, argv, envp);
}
"""

# A program that forks the moment its pool exists, by os.fork() and by a
# fork Pool, and prints OK.
FORKS_AT_ONCE = """
    import multiprocessing as mp, os
    import numpy as np, pyarraypool

    def fill(k):
        x = pyarraypool.zeros(1000)
        x[:] = k
        return x

    if __name__ == "__main__":
        x = pyarraypool.make_transferable(np.arange(1000.0))   # makes the pool
        pid = os.fork()
        if pid == 0:
            os._exit(0 if x[999] == 999.0 else 1)
        assert os.waitpid(pid, 0)[1] == 0
        with mp.get_context("fork").Pool(2) as pool:
            assert [float(r[0]) for r in pool.map(fill, range(4))] == [0.0, 1.0, 2.0, 3.0]
        print("OK", flush=True)
"""


def test_a_program_forking_as_its_pool_starts_gets_no_warning(tmp_path):
    """The keeper is spawned by a short-lived thread of the program (creating
    the pool does not wait for the exec). No fork may see that thread: Python
    3.12+ warns from os.fork() when the process has another thread ("This
    process is multi-threaded, use of fork() may lead to deadlocks in the
    child"), and a correct program prints no warning (contract point 23).
    -W always::DeprecationWarning prints every such warning (-W error would
    not show it: os.fork() drops this warning silently when it is an error)."""
    lib = build_preload_shim(tmp_path, "slowspawn", SLOW_SPAWN_C)
    proc = subprocess.run(
        [sys.executable, "-W", "always::DeprecationWarning", "-c", textwrap.dedent(FORKS_AT_ONCE)],
        env=fresh_env(LD_PRELOAD=lib), capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "OK\n", ""), proc.stderr
