"""Cleanup: what a program leaves in /dev/shm, and how leftovers are removed.

Contract points 16 and 17 (see /work/shared/guide/contract.md). That the
whole suite leaves /dev/shm as it found it is checked by `make test`.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import (
    REPO,
    fresh_env,
    group_alive,
    kill_keeper,
    my_pool_token,
    pool_files,
    remove_pool_files,
    run_python,
)

# Control segment, or data segment <index>-<64-bit random part>.
NAME = re.compile(r"^pyarraypool-[0-9a-f]{32}(-\d+-[0-9a-f]{16})?$")
TOKEN_LINE = re.compile(r"^TOKEN ([0-9a-f]{32})$", re.M)


def token_of(stdout: str) -> str:
    m = TOKEN_LINE.search(stdout)
    assert m, f"the child did not print its token:\n{stdout}"
    return m.group(1)


def kill_group(pgid: int, timeout: float = 10) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        assert time.monotonic() < deadline, f"group {pgid} still alive: {group_alive(pgid)}"
        time.sleep(0.01)


class Live:
    """A child program in its own session, running until its stdin closes."""

    def __init__(self, code: str, tmp_path, name: str):
        script = tmp_path / f"{name}.py"
        script.write_text(textwrap.dedent(code))
        self.out_path = tmp_path / f"{name}.out"
        self.err_path = tmp_path / f"{name}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, str(script)], env=fresh_env(),
                                         stdin=subprocess.PIPE, stdout=out, stderr=err,
                                         start_new_session=True)

    def output(self) -> str:
        return self.out_path.read_text() + "\n--- stderr:\n" + self.err_path.read_text()

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.out_path.read_text(), re.M)
            if m:
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"the child exited ({self.proc.returncode}):\n"
                                     + self.output())
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} from the child in {timeout} s:\n"
                                     + self.output())
            time.sleep(0.02)

    def finish(self, timeout: float = 30) -> int:
        """Closes its stdin (the program's cue to exit) and waits for the group."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(self.proc.pid)
            raise AssertionError("the child did not exit:\n" + self.output()) from None
        deadline = time.monotonic() + timeout
        while group_alive(self.proc.pid):  # workers still leaving
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.01)
        return self.proc.returncode

    def kill(self) -> None:
        kill_group(self.proc.pid)
        self.proc.wait()


@pytest.fixture
def programs(tmp_path):
    """Starts Live programs; kills them and removes their pools at teardown."""
    started: list[Live] = []
    tokens: set[str] = set()

    def start(code: str) -> Live:
        p = Live(code, tmp_path, f"prog{len(started)}")
        started.append(p)
        return p

    start.tokens = tokens  # type: ignore[attr-defined]
    yield start
    for p in started:
        p.kill()
        tokens.update(TOKEN_LINE.findall(p.out_path.read_text()))
    for t in tokens:
        remove_pool_files(t)


def describe(token: str) -> str:
    """What `stats` says about a pool (for failure messages)."""
    r = run_cli("stats", "--pool", token, "--json")
    return r.stdout + r.stderr


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyarraypool", *args], env=fresh_env(),
                          capture_output=True, text=True, timeout=60, cwd=REPO)


# --- point 16: a program that ends normally leaves nothing --------------------

NORMAL_EXITS = {
    "plain": """
        import pickle, numpy as np, pyarraypool
        x = pyarraypool.make_transferable(np.arange(1000.0))
        big = pyarraypool.empty(80_000_000, dtype=np.uint8)     # a second segment
        never_loaded = pickle.dumps(x)                          # pending at exit
        print("TOKEN", pyarraypool._core._pool_token(), flush=True)
        # x and big are still alive when the program ends
    """,
    "fork-pool": """
        import multiprocessing as mp, numpy as np, pyarraypool

        def work(k):
            return pyarraypool.make_transferable(np.full(1000, k))

        if __name__ == "__main__":
            x = pyarraypool.zeros(10)
            print("TOKEN", pyarraypool._core._pool_token(), flush=True)
            with mp.get_context("fork").Pool(2) as pool:
                out = pool.map(work, range(8))
                queued = pool.map_async(work, range(100))   # terminated with the pool
            assert [int(a[0]) for a in out] == list(range(8))
    """,
    "spawn-process": """
        import multiprocessing as mp, numpy as np, pyarraypool

        def work(arr):
            arr[:] = 3
            keep = pyarraypool.zeros(1000)   # alive when the worker exits

        if __name__ == "__main__":
            x = pyarraypool.zeros(10)
            print("TOKEN", pyarraypool._core._pool_token(), flush=True)
            p = mp.get_context("spawn").Process(target=work, args=(x,))
            p.start()
            p.join(60)
            assert p.exitcode == 0 and (x == 3).all()
    """,
    "forked-child-outlives-parent": """
        import os, sys, time, numpy as np, pyarraypool
        x = pyarraypool.make_transferable(np.ones(1000))
        print("TOKEN", pyarraypool._core._pool_token(), flush=True)
        if os.fork() == 0:
            time.sleep(0.5)     # the parent has left; this child is the last
            assert (x == 1).all()
            y = pyarraypool.zeros(100)
            sys.exit(0)
    """,
    # The only process on the pool sends a pickle and exits; the program's
    # root never attached and never loads it: its exit removes the pool.
    "worker-pickle-never-loaded": """
        import multiprocessing as mp, os, pickle, pyarraypool

        def work(q):
            q.put(pickle.dumps(pyarraypool.zeros(1000)))

        if __name__ == "__main__":
            print("TOKEN", os.environ["PYARRAYPOOL_POOL"], flush=True)
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            p = ctx.Process(target=work, args=(q,))
            p.start()
            blob = q.get(timeout=60)
            p.join(60)
            assert p.exitcode == 0 and len(blob) < 1000
    """,
}

# Programs whose parent imports pyarraypool but only pool workers use it.
WORKERS_ONLY = """
    import multiprocessing as mp, os, pyarraypool

    def work(_):
        a = pyarraypool.zeros(1000)
        return float(a.sum())

    if __name__ == "__main__":
        print("TOKEN", os.environ["PYARRAYPOOL_POOL"], flush=True)
        pool = mp.get_context(METHOD).Pool(2)
        assert pool.map(work, range(4)) == [0.0] * 4
        if HOW == "close":
            pool.close()
            pool.join()
        else:
            pool.terminate()
"""
for method, how in (("fork", "terminate"), ("forkserver", "close"), ("spawn", "close")):
    NORMAL_EXITS[f"only-{method}-workers-use-pool-{how}"] = (
        f"METHOD, HOW = {method!r}, {how!r}\n" + textwrap.dedent(WORKERS_ONLY))


@pytest.mark.parametrize("case", list(NORMAL_EXITS))
def test_program_that_exits_normally_leaves_nothing(programs, case):
    p = programs(NORMAL_EXITS[case])
    token = token_of(p.wait_for(r"^TOKEN [0-9a-f]{32}$").group(0))
    assert p.finish() == 0, p.output()
    assert pool_files(token) == [], f"left behind: {pool_files(token)}\n{p.output()}"


# --- point 16: killed programs, `clean` and the next start ---------------------

KILLED = """
    import multiprocessing as mp, os, pickle, signal, time
    import numpy as np, pyarraypool

    held = []
    def hold(_):
        held.append(pyarraypool.zeros(100_000))
        return os.getpid()

    if __name__ == "__main__":
        x = pyarraypool.make_transferable(np.arange(1000.0))
        blob = pickle.dumps(x)
        pool = mp.get_context("fork").Pool(2)
        pids = set(pool.map(hold, range(8), chunksize=1))
        print("TOKEN", pyarraypool._core._pool_token(), flush=True)
        print("READY", flush=True)
        time.sleep(120)
"""


def killed_program(programs) -> str:
    """A program (a parent and its workers, all holding arrays) killed with
    SIGKILL; returns its pool's token."""
    p = programs(KILLED)
    p.wait_for("^READY$")
    token = token_of(p.out_path.read_text())
    # Every process of the program, its pool's keeper included (as killing
    # a whole cgroup does): only then do its files stay (test_keeper.py).
    kill_keeper(token)
    p.kill()
    programs.tokens.add(token)
    files = pool_files(token)
    assert f"pyarraypool-{token}" in files, files
    assert any(n.startswith(f"pyarraypool-{token}-0-") for n in files), files
    return token


def test_killed_program_leaves_segments_that_clean_removes(programs):
    token = killed_program(programs)
    files = pool_files(token)

    dry = run_cli("clean", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    for name in files:
        assert name in dry.stdout, (dry.stdout, pool_files(token), describe(token))
    assert pool_files(token) == files, "clean --dry-run removed something"

    done = run_cli("clean")
    assert done.returncode == 0, done.stderr
    for name in files:
        assert name in done.stdout, done.stdout
    assert pool_files(token) == []


def test_killed_program_is_cleaned_by_the_next_start(programs):
    token = killed_program(programs)
    run_python("import pyarraypool; pyarraypool.empty(1)")
    assert pool_files(token) == []


def test_clean_keeps_pools_of_live_programs(programs):
    # A running program, and a program whose parent was killed but one of
    # whose workers still runs: both pools are in use.
    live = programs("""
        import sys, numpy as np, pyarraypool
        x = pyarraypool.zeros(1000)
        print("TOKEN", pyarraypool._core._pool_token(), flush=True)
        sys.stdin.read()
        assert (x == 0).all()
    """)
    orphan = programs("""
        import os, signal, time, numpy as np, pyarraypool
        x = pyarraypool.make_transferable(np.arange(100.0))
        print("TOKEN", pyarraypool._core._pool_token(), flush=True)
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)   # out of the group, so that only the parent dies
            print("WORKER", os.getpid(), flush=True)
            time.sleep(60)
            os._exit(0)
        time.sleep(120)
    """)
    live_token = token_of(live.wait_for(r"^TOKEN [0-9a-f]{32}$").group(0))
    worker = int(orphan.wait_for(r"^WORKER (\d+)$").group(1))
    orphan_token = token_of(orphan.out_path.read_text())
    try:
        kill_group(orphan.proc.pid)          # the parent only
        orphan.proc.wait()
        assert os.path.exists(f"/proc/{worker}")

        for args in (("clean", "--dry-run"), ("clean",)):
            r = run_cli(*args)
            assert r.returncode == 0, r.stderr
            assert live_token not in r.stdout and orphan_token not in r.stdout, r.stdout
        run_python("import pyarraypool; pyarraypool.empty(1)")   # a start sweeps too
        assert f"pyarraypool-{live_token}" in pool_files(live_token)
        assert f"pyarraypool-{orphan_token}" in pool_files(orphan_token)
        assert live.finish() == 0, live.output()
        assert pool_files(live_token) == []
    finally:
        kill_keeper(orphan_token, expect=False)   # else it removes the pool at once
        kill_group(worker)
    # The last process of the orphaned pool is dead now: it is a leftover.
    r = run_cli("clean")
    assert f"pyarraypool-{orphan_token}" in r.stdout, r.stdout
    assert pool_files(orphan_token) == []


# --- point 8: a pickle outlives its sender, even the last process attached ----

# The root imports pyarraypool and waits; a spawned worker, the only process
# ever attached to the pool, sends a pool array and exits. The pickle is in
# flight with nobody attached.
ROOT_LOADS_LATER = """
    import multiprocessing as mp, os, sys, pyarraypool

    def work(conn):
        a = pyarraypool.zeros(1000)
        a[:] = 5
        conn.send(a)

    if __name__ == "__main__":
        print("TOKEN", os.environ["PYARRAYPOOL_POOL"], flush=True)
        ctx = mp.get_context("spawn")
        # A Pipe, not a Queue: a Queue's semaphores would outlive the kill
        # of this program (its resource tracker dies with it) in /dev/shm.
        receiver, sender = ctx.Pipe(duplex=False)
        p = ctx.Process(target=work, args=(sender,))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        print("SENT", flush=True)
        sys.stdin.read()
        assert receiver.poll(60)
        a = receiver.recv()
        assert isinstance(a, pyarraypool.TransferableArray) and (a == 5).all()
        print("LOADED", flush=True)
"""


def sent_by_a_worker_that_left(programs) -> tuple[Live, str]:
    p = programs(ROOT_LOADS_LATER)
    p.wait_for("^SENT$")
    token = token_of(p.out_path.read_text())
    programs.tokens.add(token)
    assert f"pyarraypool-{token}" in pool_files(token), p.output()
    return p, token


def test_pool_with_a_pickle_in_flight_waits_for_the_programs_root(programs):
    p, token = sent_by_a_worker_that_left(programs)
    # Nobody is attached, but the root lives: neither a cleaner nor another
    # program's start may remove the pool.
    dry = run_cli("clean", "--dry-run")
    assert token not in dry.stdout, dry.stdout
    run_python("import pyarraypool; pyarraypool.empty(1)")
    assert f"pyarraypool-{token}" in pool_files(token)
    assert p.finish() == 0, p.output()
    assert "LOADED" in p.out_path.read_text()
    assert pool_files(token) == [], pool_files(token)


def test_pool_kept_for_a_root_that_was_killed_is_cleaned(programs):
    p, token = sent_by_a_worker_that_left(programs)
    kill_keeper(token)   # with the root: else the keeper removes the pool at once
    p.kill()
    files = pool_files(token)
    assert f"pyarraypool-{token}" in files
    done = run_cli("clean")
    assert done.returncode == 0, done.stderr
    assert f"pyarraypool-{token}" in done.stdout, done.stdout
    assert pool_files(token) == []


# --- point 17: permissions and names ---------------------------------------------


def test_segments_are_private_and_unguessable(programs):
    # The second program runs with umask 0: the mode must not come from it.
    progs = [programs(f"""
        import os, sys, numpy as np, pyarraypool
        os.umask({umask:#o})
        a = pyarraypool.empty(1000)
        b = pyarraypool.empty(80_000_000, dtype=np.uint8)   # larger than a segment
        print("TOKEN", pyarraypool._core._pool_token(), flush=True)
        sys.stdin.read()
    """) for umask in (0o022, 0)]
    tokens = [token_of(p.wait_for(r"^TOKEN [0-9a-f]{32}$").group(0)) for p in progs]
    mine = my_pool_token()
    assert len({*tokens, mine}) == 3, "two programs share a pool name"
    for token in tokens:
        files = pool_files(token)
        assert len(files) >= 3, files           # control and two data segments
        for name in files:
            assert NAME.match(name), name
            st = os.stat("/dev/shm/" + name)
            assert stat.S_IMODE(st.st_mode) == 0o600, (name, oct(st.st_mode))
            assert st.st_uid == os.geteuid()
    for p, token in zip(progs, tokens, strict=True):
        assert p.finish() == 0, p.output()
        assert pool_files(token) == []


def test_my_own_pool_segments_are_private():
    token = my_pool_token()
    import pyarraypool

    a = pyarraypool.zeros(10)
    files = pool_files(token)
    assert files
    for name in files:
        assert NAME.match(name), name
        assert stat.S_IMODE(os.stat("/dev/shm/" + name).st_mode) == 0o600, name
    del a
