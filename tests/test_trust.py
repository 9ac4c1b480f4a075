"""Trust in the pool's view of its processes: fork hooks, exit, many
processes, exec, forks racing with threads, forks without a reservation,
and processes in another pid namespace.

Every scenario runs as a child program of its own (its own pool, its own
session; see test_faults.Programs), with bounded waits: a hang fails the
test instead of blocking the suite. Each checks the bytes of live arrays,
`stats()` and `_core._verify()`, and that the program leaves nothing in
/dev/shm.
"""

from __future__ import annotations

import shutil

import pytest
from test_faults import assert_left_nothing, programs  # noqa: F401  (fixture)

REQUIRE_ROOT_ENV = "PYARRAYPOOL_REQUIRE_ROOT_TESTS"


def _stderr_of_last(programs) -> str:  # noqa: F811
    return (programs.tmp_path / f"prog{programs.count}.err").read_text()


# --- fork hooks registered before the import (finding 3) -------------------------

FORK_HOOK_HEAD = '''
import gc, os
CACHE = {}
def _drop_cache_in_child():
    # A library's after-fork hook: the child starts with an empty cache.
    CACHE.clear()
    gc.collect()
os.register_at_fork(after_in_child=_drop_cache_in_child)
'''


def test_after_fork_hook_registered_before_import_drops_arrays_as_the_child(programs):  # noqa: F811
    """A user's after_in_child hook registered before `import pyarraypool`
    runs before pyarraypool's Python hook. If it drops the parent's pool
    arrays in the child, that must release the child's hold, never the
    parent's: the parent's array stays intact, held, and is not handed out
    again by later allocations."""
    out = programs.run('''
    say_token()
    start = settle().used_bytes
    size = 1 << 20
    live = pyarraypool.empty(size, dtype=np.uint8)
    live[:] = np.arange(size) % 251
    expected = live.copy()
    CACHE["x"] = live
    del live
    lo = CACHE["x"].__array_interface__["data"][0]
    for round_ in range(6):
        pid = os.fork()
        if pid == 0:
            os._exit(0 if not CACHE else 1)  # the hook emptied the cache
        assert os.waitstatus_to_exitcode(reap(pid)) == 0, round_
        s = settle()
        x = CACHE["x"]
        assert s.processes == 1 and s.pids == (os.getpid(),), (round_, s)
        assert s.live_blocks == 1 and s.used_bytes == start + size + 64, (round_, s, start)
        assert np.array_equal(x, expected), f"round {round_}: the parent's array changed"
        _core._verify()
        fresh = [pyarraypool.empty(size, dtype=np.uint8) for _ in range(4)]
        for f in fresh:
            a = f.__array_interface__["data"][0]
            assert a + size <= lo or a >= lo + size, (
                f"round {round_}: the parent's block was reused")
            f[:] = 0xEE
        assert np.array_equal(x, expected), f"round {round_}: the parent's array changed"
        del fresh, f, x
    del CACHE["x"]
    s = settle()
    assert s.used_bytes == start and s.live_blocks == 0, s
    _core._verify()
    print("OK")
    ''', head=FORK_HOOK_HEAD)
    assert "OK" in out
    assert_left_nothing(out)


# --- exit: threads and later exit handlers still write (finding 4) --------------

EXIT_WRITER = r"""
import atexit, sys, threading, time

def late_writer():
    # Registered before the import: runs after pyarraypool's exit hook.
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        for a in TARGETS:
            a[:] = 0x5A
        time.sleep(0.0005)

atexit.register(late_writer)
import numpy as np
import pyarraypool

TARGETS = [pyarraypool.empty(SIZE, dtype=np.uint8) for _ in range(4)]

def scribbler():
    while True:
        for a in TARGETS:
            a[:] = 0x5A
        time.sleep(0)

threading.Thread(target=scribbler, daemon=True).start()
print("up", flush=True)
sys.stdin.readline()
"""


def test_exiting_process_that_still_writes_never_reaches_other_processes_arrays(programs):  # noqa: F811
    """A process exits normally while a daemon thread, and an exit handler
    that runs after pyarraypool's, keep writing into its pool arrays. Meanwhile
    another process of the program allocates and checks arrays of the same
    size: none of them ever receives those writes (the exiting process's
    blocks are reused only once it is gone)."""
    out = programs.run('''
    SIZE = 256 * 1024
    WRITER = "SIZE = %d\\n" % SIZE + ''' + repr(EXIT_WRITER) + '''
    say_token()
    start = settle().used_bytes
    bad = checked = 0
    for round_ in range(5):
        w = subprocess.Popen([sys.executable, "-c", WRITER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        assert w.stdout.readline() == "up\\n"
        w.stdin.write("\\n")
        w.stdin.flush()
        mine = []
        k = 0
        end = None
        while end is None or time.monotonic() < end:
            if end is None and w.poll() is not None:
                end = time.monotonic() + 0.2
            k += 1
            a = pyarraypool.empty(SIZE, dtype=np.uint8)
            a[:] = k % 200
            mine.append((k % 200, a))
            for v, b in mine:
                checked += 1
                if not (b == v).all():
                    bad += 1
            if len(mine) >= 24:
                mine.clear()
        assert w.wait() == 0
        mine.clear()
        del a, b
        s = settle()
        assert s.processes == 1 and s.used_bytes == start, (round_, s)
        _core._verify()
    print("CHECKED", checked)
    assert bad == 0, f"{bad} of {checked} checks saw another process's writes"
    print("OK")
    ''', timeout=120)
    assert "OK" in out
    assert_left_nothing(out)


# --- more than 128 processes (finding 6) -----------------------------------------


def test_256_forked_processes_attached_at_once(programs):  # noqa: F811
    """256 forked processes are attached at once: each reads every byte of
    what it inherited, allocates and sends an array back, and waits until
    all are up. Nothing is refused, nothing is printed as an ignored
    exception at their exit, and the pool ends balanced."""
    out = programs.run('''
    import traceback
    N = 256
    say_token()
    start = settle().used_bytes
    rng = np.random.default_rng(7)
    inherited = [pyarraypool.make_transferable(rng.integers(0, 256, n, dtype=np.uint8))
                 for n in (10, 5000, 300_000)]
    expected = [a.copy() for a in inherited]
    up_r, up_w = os.pipe()
    go_r, go_w = os.pipe()
    pids = []
    t0 = time.monotonic()
    for i in range(N):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(up_r)
                os.close(go_w)
                ok = all(np.array_equal(a, e) for a, e in zip(inherited, expected))
                mine = pyarraypool.empty(1000, dtype=np.uint8)
                mine[:] = i % 251
                msg = pickle.dumps((i, ok, mine))
                del mine
                assert len(msg) < 4000
                os.write(up_w, struct.pack("<I", len(msg)) + msg)  # one atomic write
                assert os.read(go_r, 1) == b""  # EOF: every child is up
                code = 0
            except BaseException:
                traceback.print_exc()
            sys.exit(code)  # a normal exit, through the exit hooks
        pids.append(pid)
    os.close(up_w)
    os.close(go_r)
    buf = b""
    got = {}
    while len(got) < N:
        buf += read_byte(up_r, 60) + os.read(up_r, 1 << 16)
        while len(buf) >= 4 and len(buf) >= 4 + struct.unpack("<I", buf[:4])[0]:
            n = struct.unpack("<I", buf[:4])[0]
            i, ok, arr = pickle.loads(buf[4:4 + n])
            buf = buf[4 + n:]
            assert ok, f"child {i} read wrong bytes in its inherited arrays"
            got[i] = arr
    s = pyarraypool.stats()
    assert s.processes == N + 1 and set(s.pids) == set(pids) | {os.getpid()}, s.processes
    print("ALL UP after %.1f s" % (time.monotonic() - t0))
    os.close(go_w)
    for i, arr in got.items():
        assert (arr == i % 251).all(), i
    codes = [os.waitstatus_to_exitcode(reap(pid, 60)) for pid in pids]
    assert codes == [0] * N, [c for c in codes if c]
    s = settle()
    assert s.processes == 1, s
    assert all(np.array_equal(a, e) for a, e in zip(inherited, expected))
    del got, arr, inherited
    s = settle()
    assert s.used_bytes == start and s.live_blocks == 0 and s.pending_transfers == 0, s
    _core._verify()
    print("OK")
    ''', timeout=120)
    assert "OK" in out
    err = _stderr_of_last(programs)
    assert "ignored" not in err.lower() and "Traceback" not in err, err[-5000:]
    assert_left_nothing(out)


# --- fork + exec (finding 7) -------------------------------------------------------


def test_child_that_execs_does_not_pin_the_parents_blocks(programs):  # noqa: F811
    """A child made by os.fork() + os.execv(), or by subprocess with a
    preexec_fn (which forks through the hooks), that runs another program:
    once the parent drops its array, the block is freed while that program
    still runs. The program is cat: its echo of a byte says it runs (the
    kernel lets go of a child's descriptors, and of its slot's lock, on the
    way back to the new program, so the child's name in /proc can show
    before that)."""
    out = programs.run(f'''
    CAT = {shutil.which("cat")!r}
    say_token()
    start = settle().used_bytes

    def wait_exec(stdin_w, stdout_r):
        os.write(stdin_w, b"x")
        ready = select.select([stdout_r], [], [], 10)[0]
        assert ready and os.read(stdout_r, 1) == b"x", "the child did not exec"

    for how in ("fork+execv", "Popen(preexec_fn)"):
        a = pyarraypool.make_transferable(np.arange(100_000.0))
        child = None
        if how == "fork+execv":
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    os.dup2(in_r, 0)
                    os.dup2(out_w, 1)
                    os.execv(CAT, ["cat"])
                finally:
                    os._exit(127)
            os.close(in_r)
            os.close(out_w)
        else:
            child = subprocess.Popen([CAT], preexec_fn=lambda: None, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
            pid = child.pid
            in_w, out_r = child.stdin.fileno(), child.stdout.fileno()
        try:
            wait_exec(in_w, out_r)
            del a
            s = settle()
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), "cat is still running"
            assert pid not in s.pids and s.processes == 1, (how, s)
            assert s.used_bytes == start and s.live_blocks == 0, (how, s)
            _core._verify()
        finally:
            os.kill(pid, signal.SIGKILL)
            if child is not None:
                child.wait()
                child.stdin.close()
                child.stdout.close()
            else:
                reap(pid)
                os.close(in_w)
                os.close(out_r)
    print("OK")
    ''')
    assert "OK" in out
    assert_left_nothing(out)


# --- forks racing with threads, failed reservations, dead reservations (12a/c/d) --


def test_forks_while_threads_change_their_holds(programs):  # noqa: F811
    """The main thread forks again and again while threads allocate, load
    and release arrays (with the GIL released on their slow paths). Every
    child reads correct bytes in every array it inherited and can use the
    pool; the pool stays consistent and balanced."""
    out = programs.run('''
    say_token()
    start = settle().used_bytes
    stable = [pyarraypool.make_transferable(np.full(n, k, dtype=np.int64))
              for k, n in enumerate((1, 4000, 70_000), 1)]
    stop = threading.Event()
    lists = [[] for _ in range(3)]
    problems = []

    def churn(t):
        rng = random.Random(t)
        mine = lists[t]
        try:
            while not stop.is_set():
                v = rng.randrange(1, 1 << 40)
                a = pyarraypool.empty(rng.choice((10, 9000, 100_000)), dtype=np.int64)
                a[:] = v
                mine.append(pickle.loads(pickle.dumps(a)))  # a second hold, by a load
                del a
                if len(mine) > 6:
                    mine.pop(0)
        except BaseException as e:  # noqa: B036
            problems.append(repr(e))

    threads = [threading.Thread(target=churn, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    codes = []
    try:
        for i in range(80):
            pid = os.fork()
            if pid == 0:
                ok = all((a == k).all() for k, a in enumerate(stable, 1))
                ok = ok and all((a == a.flat[0]).all() for lst in lists for a in list(lst))
                b = pyarraypool.zeros(1000)
                del b
                if i % 8 == 0:
                    _core._verify()
                os._exit(0 if ok else 1)
            codes.append(os.waitstatus_to_exitcode(reap(pid, 30)))
            time.sleep(0.002)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert problems == [], problems
    assert codes == [0] * len(codes), codes
    for lst in lists:
        lst.clear()
    s = settle()
    assert s.processes == 1, s
    assert s.live_blocks == 3, s
    _core._verify()
    del stable
    s = settle()
    assert s.used_bytes == start and s.live_blocks == 0, s
    print("OK")
    ''', timeout=120)
    assert "OK" in out
    assert_left_nothing(out)


FORK_WITHOUT_RESERVATION = '''
import ctypes, resource
say_token()
start = settle().used_bytes
size = 1 << 20
x = pyarraypool.empty(size, dtype=np.uint8)
x[:] = 0x3C
up_r, up_w = os.pipe()
go_r, go_w = os.pipe()
import tempfile
err_fd, err_path = tempfile.mkstemp(prefix="pap-child-stderr-")
saved_err = os.dup(2)
saved_limit = resource.getrlimit(resource.RLIMIT_NOFILE)
fillers = []
os.dup2(err_fd, 2)
if HOW == "emfile":
    # Every descriptor in use: before_fork cannot open the control file again.
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, saved_limit[1]))
    try:
        while True:
            fillers.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as e:
        assert e.errno == errno.EMFILE, e
    pid = os.fork()
else:
    # fork() called from C (an extension, ctypes): no Python hook runs, so
    # there is no reservation.
    libc = ctypes.CDLL(None, use_errno=True)
    pid = libc.fork()
if pid == 0:
    os.write(up_w, b"u")
    os.read(go_r, 1)
    ok = bool((x == 0x3C).all())
    os._exit(0 if ok else 1)
os.dup2(saved_err, 2)
for fd in fillers:
    os.close(fd)
resource.setrlimit(resource.RLIMIT_NOFILE, saved_limit)
assert pid > 0
read_byte(up_r, 30)
held_by_child = pid in pyarraypool.stats().pids
del x
s = settle()
if held_by_child:
    assert s.live_blocks == 1, ("an attached child's inherited block was freed", s)
# Reuse whatever was freed.
fresh = [pyarraypool.empty(size, dtype=np.uint8) for _ in range(4)]
for f in fresh:
    f[:] = 0xC3
os.write(go_w, b"g")
code = os.waitstatus_to_exitcode(reap(pid, 30))
with open(err_path) as f:
    child_err = f.read()
os.unlink(err_path)
print("CHILD", code, held_by_child, repr(child_err))
assert code != 1, "the child read another array's bytes through its inherited array"
if code != 0:
    assert code == -signal.SIGSEGV, code
    assert "could not attach to its pool" in child_err, child_err
    assert not held_by_child
del fresh
s = settle()
assert s.processes == 1 and s.used_bytes == start and s.live_blocks == 0, s
_core._verify()
print("OK")
'''


@pytest.mark.parametrize("how", ["emfile", "fork-from-C"])
def test_child_without_reservation_holds_what_it_inherited_or_is_detached(programs, how):  # noqa: F811
    """A fork child for which the parent could reserve nothing (the parent
    was out of file descriptors, or fork() was called from C, without the
    Python hooks) either holds every block it inherited before any of its
    code reads them, or is detached loudly (its inherited pool memory made
    inaccessible, a message on stderr). It never reads memory that the pool
    handed to another array meanwhile."""
    out = programs.run(f"import errno\nHOW = {how!r}\n" + FORK_WITHOUT_RESERVATION)
    assert "OK" in out
    assert_left_nothing(out)


def test_dead_childs_reservation_is_reclaimed_while_a_later_child_lives(programs):  # noqa: F811
    """A child killed at once after fork, then a later child that stays
    alive (one that execs, so it never registers anywhere): what the dead
    child was given at fork is reclaimed as soon as it is dead."""
    out = programs.run(f'''
    SLEEP = {shutil.which("sleep")!r}
    say_token()
    start = settle().used_bytes
    a = pyarraypool.make_transferable(np.arange(100_000.0))
    dead = os.fork()
    if dead == 0:
        time.sleep(30)
        os._exit(0)
    os.kill(dead, signal.SIGKILL)
    reap(dead)
    del a
    later = []
    for how in ("fork", "exec"):
        pid = os.fork()
        if pid == 0:
            if how == "exec":
                try:
                    os.execv(SLEEP, ["sleep", "30"])
                finally:
                    os._exit(127)
            time.sleep(30)
            os._exit(0)
        later.append(pid)
    try:
        s = settle()
        assert dead not in s.pids, s
        assert s.used_bytes == start and s.live_blocks == 0, s
        _core._verify()
    finally:
        for pid in later:
            os.kill(pid, signal.SIGKILL)
            reap(pid)
    print("OK")
    ''')
    assert "OK" in out
    assert_left_nothing(out)
