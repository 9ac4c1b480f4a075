#!/usr/bin/env python3
"""Chaos soak of pyarraypool: workers SIGKILLed at random instants, even
inside the pool lock, while arrays travel between them.

    python tests/soak_program.py --seconds 60 --workers 8 --kill-interval 0.5

Run it as a program of its own (its own pool: start it with an environment
that has no PYARRAYPOOL_* variables, e.g. tests/helpers.fresh_env()). It

- starts `--workers` processes (fork; now and then a replacement by spawn,
  and as root now and then one in a pid namespace of its own: LAUNCHER),
  each with an inbox (a multiprocessing Queue, one per worker slot). A worker
  loops: allocate an array of a random size and dtype in the pool and fill it
  with a pattern (its first 32 bytes say magic, seed, length and CRC-32 of the
  rest); send an array it holds (its own or one it received) to another
  worker's inbox, now and then to the driver; receive from its inbox and
  verify every byte; re-verify what it holds; drop arrays; with probability
  ~2% hold the pool lock for 5-20 ms (`_core._test_hold_lock`); with
  probability ~0.2% fork a child that execs a short-lived program (cat)
  while holding an array only it holds, and check that once the child has
  exec'd it holds nothing (no slot; the block held by the worker alone);
- meanwhile SIGKILLs a random worker every `--kill-interval` seconds (every
  4th kill targets a worker that owns the pool lock at that instant, if one
  does within 0.2 s) and starts a replacement;
- watches every worker's heartbeat: a worker without progress for
  `--hang-seconds` counts as hung (its stack is dumped with faulthandler);
- at the end stops the workers (half by SIGKILL, half asked to exit), drains
  every inbox, waits past transfer_timeout and calls collect(): the pool must
  be empty (used_bytes 0, no live block, no pending pickle, one process) and
  `_core._verify()` must pass;
- prints a summary, writes it as JSON (`--json`, default
  build/soak_result.json) and exits 1 on any violation (hang, corruption, a
  worker dying on its own, verify() failing, a leak, a premature
  StaleHandleError), 0 otherwise.

Queues and SIGKILL. A Queue's pipe carries length-prefixed pickles written by
a feeder thread. Two of multiprocessing's own properties would turn a kill
into a hang that has nothing to do with pyarraypool, so the soak sidesteps
them, and only them:
- a writer killed while holding the queue's write lock blocks every other
  writer of that queue forever: the queues here have no write lock (every
  message is far below PIPE_BUF, so each is written by one atomic write());
- a reader killed inside `recv_bytes` can leave the rest of a message in
  the pipe: before a slot's replacement starts, the driver reads the slot's
  pipe itself, finds the message boundaries again (a torn head counts as
  lost in transit), and loads and verifies every whole message it finds.
Readers read with `Connection.poll(timeout)` + `recv_bytes()`, so the queue's
read lock (which a killed reader would keep) is never taken. A message that
does not unpickle counts as lost in transit; one that loads must verify.
"""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import gc
import io
import json
import math
import mmap
import multiprocessing as mp
import os
import pickle
import random
import select
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import traceback
import zlib

import numpy as np

import pyarraypool
from pyarraypool import _core

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- the checksummed pattern -------------------------------------------------

HEADER = struct.Struct("<4sIQQQ")  # magic, pad, seed, nbytes, crc32 of the rest
MAGIC = b"SOAK"
MIN_BYTES = HEADER.size  # 32
MAX_BYTES = 2 << 20
DTYPES = [np.uint8, np.int16, np.int32, np.float32, np.float64, np.complex128]
TRANSFER_TIMEOUT = 2.0


def pattern(seed: int, n: int) -> np.ndarray:
    return np.frombuffer(np.random.Generator(np.random.PCG64(seed)).bytes(n), dtype=np.uint8)


def make_array(rng: random.Random, seed: int):
    dtype = np.dtype(rng.choice(DTYPES))
    nbytes = int(math.exp(rng.uniform(math.log(MIN_BYTES), math.log(MAX_BYTES))))
    n = max(-(-MIN_BYTES // dtype.itemsize), nbytes // dtype.itemsize)
    arr = pyarraypool.empty(n, dtype, transfer_required=rng.random() < 0.9)
    raw = arr.view(np.uint8)  # the pool memory itself (1-D, C-contiguous)
    body = pattern(seed, raw.size - MIN_BYTES)
    raw[MIN_BYTES:] = body
    raw[:MIN_BYTES] = np.frombuffer(
        HEADER.pack(MAGIC, 0, seed, raw.size, zlib.crc32(body)), dtype=np.uint8)
    return arr


def check_array(arr) -> str | None:
    """None if `arr` holds exactly what its header says; else what is wrong."""
    if not isinstance(arr, pyarraypool.TransferableArray):
        return f"not a pool array: {type(arr).__name__}"
    if not arr.flags.c_contiguous:
        return "not C-contiguous"
    raw = np.frombuffer(arr, dtype=np.uint8)
    if raw.size < MIN_BYTES:
        return f"only {raw.size} bytes"
    magic, _, seed, nbytes, crc = HEADER.unpack(raw[:MIN_BYTES].tobytes())
    if magic != MAGIC:
        return f"bad magic {magic!r} (first bytes {raw[:16].tobytes().hex()})"
    if nbytes != raw.size:
        return f"header says {nbytes} bytes, the array has {raw.size}"
    body = raw[MIN_BYTES:]
    if zlib.crc32(body) != crc:
        expected = pattern(seed, nbytes - MIN_BYTES)
        bad = np.flatnonzero(body != expected)
        return (f"checksum mismatch (seed {seed:#x}, {nbytes} bytes): {bad.size} bytes differ, "
                f"first at {int(bad[0]) + MIN_BYTES if bad.size else None}")
    if not np.array_equal(body, pattern(seed, nbytes - MIN_BYTES)):
        return f"content differs from the pattern although the CRC matches (seed {seed:#x})"
    return None


# --- messages ----------------------------------------------------------------

# A message is (sent_monotonic, sender_slot, seq, kind, transfer_required,
# array); `kind` says how to get the whole C-contiguous array back from what
# travelled. A pickle of a block made with transfer_required=False does not
# keep it alive, so StaleHandleError is expected for those once the sender has
# dropped it; for the others, only after transfer_timeout.
WHOLE, RESHAPED, TRANSPOSED = 0, 1, 2


def as_sent(arr, kind: int):
    n = arr.shape[0]
    if kind != WHOLE and n % 4 == 0 and n >= 8:
        two = arr.reshape(4, n // 4)
        return (two, RESHAPED) if kind == RESHAPED else (two.T, TRANSPOSED)
    return arr, WHOLE


def as_whole(x, kind: int):
    if kind == TRANSPOSED:
        x = x.T
    if kind in (RESHAPED, TRANSPOSED):
        x = x.reshape(-1)  # a view: the original array was C-contiguous
    return x


class NoLock:
    """Stands in for a Queue's write lock (see the module docstring)."""

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        return True

    def release(self) -> None:
        pass


class _MetaOnly(pickle.Unpickler):
    """Loads a message without loading its array: for messages whose array
    does not load, to learn when it was sent."""

    def find_class(self, module, name):
        obj = super().find_class(module, name)
        if obj is _core._rebuild:
            return lambda *args: None
        return obj


def message_meta(raw: bytes):
    try:
        meta = _MetaOnly(io.BytesIO(raw)).load()
        return meta if isinstance(meta, tuple) and len(meta) == 6 else None
    except Exception:
        return None


# --- shared status (one row per worker slot, written only by its worker) ---------

F_HEARTBEAT, F_OPS, F_ALLOCS, F_SENT, F_SENT_DRIVER, F_RECEIVED, F_VERIFIED, F_VERIFIED_BYTES, \
    F_LOST_TORN, F_LOST_STALE, F_HOLDS, F_PHASE, F_CORRUPT, F_PREMATURE, F_POOL_FULL, \
    F_POOL_SLOT, F_STOP, F_STATS_CALLS, F_STALE_UNTRACKED, F_EXECS, F_EXEC_PINNED = range(21)
NFIELDS = 21
COUNTERS = {
    "ops": F_OPS, "allocs": F_ALLOCS, "sent_to_workers": F_SENT, "sent_to_driver": F_SENT_DRIVER,
    "received": F_RECEIVED, "verified": F_VERIFIED, "verified_bytes": F_VERIFIED_BYTES,
    "lost_torn": F_LOST_TORN, "lost_stale": F_LOST_STALE, "hold_lock_calls": F_HOLDS,
    "corruptions": F_CORRUPT, "premature_stale": F_PREMATURE, "pool_full": F_POOL_FULL,
    "stats_or_collect_calls": F_STATS_CALLS, "stale_untracked": F_STALE_UNTRACKED,
    "exec_children": F_EXECS, "exec_pinned": F_EXEC_PINNED,
}
PHASES = ["start", "alloc", "send", "recv", "verify", "hold_lock", "drop", "stats", "exit", "exec"]
P_START, P_ALLOC, P_SEND, P_RECV, P_VERIFY, P_HOLD, P_DROP, P_STATS, P_EXIT, P_EXEC = range(10)
CAT = "/bin/cat"


def exec_child_pins(arr, status, row: int) -> str | None:
    """Forks a child that execs a short-lived program (cat, until its stdin
    closes) while this worker holds `arr`, which nobody else holds. Once the
    child has exec'd it has no slot (its lock went with the exec): after a
    collect(), `arr` is held by this process alone and the child is not among
    the pool's processes. None if so; else what is wrong.

    "Exec'd" means cat answers: it echoes a byte. EOF on a close-on-exec pipe
    is too early a sign: the kernel closes the child's descriptors at exec
    but lets go of each one's file (and of the lock on it) only on the way
    back to the new program, one by one, the highest-numbered first; a pipe
    numbered above the child's slot descriptor reads EOF while the slot is
    still locked. A descriptor freed just before the fork puts the slot's
    descriptor below the pipes, so every run meets that order."""
    spare = os.open(os.devnull, os.O_RDONLY)  # a number below the pipes'
    r, w = os.pipe()    # the child's stdin: cat ends at EOF
    out_r, out_w = os.pipe()  # the child's stdout: cat's echo
    os.close(spare)  # the child's slot descriptor, opened by os.fork(), takes it
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(r, 0)
            os.dup2(out_w, 1)
            os.execv(CAT, [CAT])
        finally:
            os._exit(127)
    os.close(r)
    os.close(out_w)
    try:
        os.write(w, b"x")
        if not select.select([out_r], [], [], 10)[0] or os.read(out_r, 1) != b"x":
            return "the child did not exec within 10 s"
        status[row + F_EXECS] += 1
        pyarraypool.collect()
        info = _core._test_block_info(arr)
        pids = pyarraypool.stats().pids
        if info["holders"] != 1 << info["my_slot"] or info["holder_count"] != 1 or pid in pids:
            return (f"a child that exec'd still holds the parent's block: holders "
                    f"{info['holders']:#x} (count {info['holder_count']}), my slot "
                    f"{info['my_slot']}, child {pid}, pool pids {pids}")
        return None
    finally:
        os.close(out_r)
        os.close(w)
        deadline = time.monotonic() + 10
        while os.waitpid(pid, os.WNOHANG)[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)


class Violations:
    """Appends one JSON line per violation to a file shared by all processes."""

    def __init__(self, path: str):
        self.path = path
        self.printed = 0

    def add(self, kind: str, **detail) -> None:
        line = json.dumps({"kind": kind, "pid": os.getpid(), "t": time.monotonic(), **detail})
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
        if self.printed < 5:  # all of them are in the file
            self.printed += 1
            print(f"VIOLATION {line}", file=sys.stderr, flush=True)

    def read(self) -> list[dict]:
        try:
            with open(self.path) as f:
                return [json.loads(x) for x in f if x.strip()]
        except FileNotFoundError:
            return []


def handle_message(raw: bytes, status, row: int, violations: Violations, who: str,
                   counters: dict | None = None):
    """Loads and verifies one message; returns the array (or None)."""
    def bump(field: int, key: str, by: float = 1) -> None:
        if status is not None:
            status[row + field] += by
        if counters is not None:
            counters[key] = counters.get(key, 0) + by

    try:
        msg = pickle.loads(raw)
    except pyarraypool.StaleHandleError as e:
        meta = message_meta(raw)
        age = time.monotonic() - meta[0] if meta else None
        if meta is not None and not meta[4]:
            bump(F_STALE_UNTRACKED, "stale_untracked")
        elif age is not None and age < TRANSFER_TIMEOUT - 0.05:
            bump(F_PREMATURE, "premature_stale")
            violations.add("premature_stale", who=who, age=age, error=str(e), meta=repr(meta))
        else:
            bump(F_LOST_STALE, "lost_stale")
        return None
    except Exception:  # a torn or garbled message: lost in transit
        bump(F_LOST_TORN, "lost_torn")
        return None
    if not (isinstance(msg, tuple) and len(msg) == 6):
        bump(F_CORRUPT, "corruptions")
        violations.add("corruption", who=who, what=f"a message loaded as {type(msg).__name__}")
        return None
    sent, sender, seq, kind, _, x = msg
    bump(F_RECEIVED, "received")
    try:
        arr = as_whole(x, kind)
        problem = check_array(arr)
    except Exception as e:
        problem = f"{type(e).__name__}: {e}"
        arr = None
    if problem is not None:
        bump(F_CORRUPT, "corruptions")
        info = None
        try:
            info = _core._test_block_info(x)
        except Exception as e:  # noqa: BLE001
            info = repr(e)
        violations.add("corruption", who=who, what=problem, sender=sender, seq=seq, kind=kind,
                       age=time.monotonic() - sent, block=repr(info))
        return None
    bump(F_VERIFIED, "verified")
    bump(F_VERIFIED_BYTES, "verified_bytes", arr.nbytes)
    return arr


# --- the worker --------------------------------------------------------------------


def worker_main(slot: int, inboxes, driver_q, status, violations_path: str, seed: int) -> None:
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    violations = Violations(violations_path)
    row = slot * NFIELDS
    rng = random.Random(seed)
    for q in inboxes + [driver_q]:
        q.cancel_join_thread()  # exiting must not wait for a dead reader's pipe
    inbox = inboxes[slot]
    reader = inbox._reader
    others = [i for i in range(len(inboxes)) if i != slot]
    held: list = []
    seq = 0

    def beat() -> None:
        status[row + F_OPS] += 1
        status[row + F_HEARTBEAT] = time.monotonic()

    def phase(p: int) -> None:
        status[row + F_PHASE] = p

    try:
        probe = pyarraypool.empty(8)
        status[row + F_POOL_SLOT] = _core._test_block_info(probe)["my_slot"]
        del probe
        beat()
        while status[row + F_STOP] == 0:
            # Receive what has come (bounded: poll with a timeout).
            phase(P_RECV)
            for _ in range(4):
                if not reader.poll(0.0 if held else 0.01):
                    break
                raw = reader.recv_bytes()
                arr = handle_message(raw, status, row, violations, f"worker {slot}")
                if arr is not None and rng.random() < 0.7:
                    held.append(arr)
                del arr
                beat()
            op = rng.random()
            if op < 0.02:
                phase(P_HOLD)
                status[row + F_HOLDS] += 1
                _core._test_hold_lock(rng.uniform(0.005, 0.020))
            elif op < 0.35 or not held:
                phase(P_ALLOC)
                try:
                    held.append(make_array(rng, rng.getrandbits(63)))
                    status[row + F_ALLOCS] += 1
                except pyarraypool.PoolFullError:
                    status[row + F_POOL_FULL] += 1
                    held.clear()
            elif op < 0.70:
                phase(P_SEND)
                i = rng.randrange(len(held))
                arr = held[i]
                x, kind = as_sent(arr, rng.choice((WHOLE, WHOLE, RESHAPED, TRANSPOSED)))
                seq += 1
                tracked = _core._block_of(arr).transfer_required
                msg = (time.monotonic(), slot, seq, kind, tracked, x)
                if rng.random() < 0.08:
                    driver_q.put(msg)
                    status[row + F_SENT_DRIVER] += 1
                else:
                    inboxes[rng.choice(others)].put(msg)
                    status[row + F_SENT] += 1
                del msg, x, arr
                if rng.random() < 0.6:
                    held.pop(i)
            elif op < 0.88:
                phase(P_VERIFY)
                arr = held[rng.randrange(len(held))]
                problem = check_array(arr)
                if problem is not None:
                    status[row + F_CORRUPT] += 1
                    violations.add("corruption", who=f"worker {slot}",
                                   what="held array: " + problem)
                else:
                    status[row + F_VERIFIED] += 1
                    status[row + F_VERIFIED_BYTES] += arr.nbytes
                del arr
            elif op < 0.99:
                phase(P_DROP)
                held.pop(rng.randrange(len(held)))
            elif op < 0.992:
                phase(P_EXEC)
                try:
                    mine = make_array(rng, rng.getrandbits(63))  # never sent
                except pyarraypool.PoolFullError:
                    status[row + F_POOL_FULL] += 1
                    held.clear()
                    continue
                status[row + F_ALLOCS] += 1
                problem = exec_child_pins(mine, status, row)
                if problem is not None:
                    status[row + F_EXEC_PINNED] += 1
                    violations.add("exec_pinned", who=f"worker {slot}", what=problem)
                del mine
            else:
                phase(P_STATS)
                status[row + F_STATS_CALLS] += 1
                if rng.random() < 0.5:
                    pyarraypool.stats()
                else:
                    pyarraypool.collect()
            while len(held) > 6:
                held.pop(0)
            beat()
        phase(P_EXIT)
        held.clear()
    except BaseException:
        violations.add("worker_error", who=f"worker {slot}", error=traceback.format_exc())
        sys.stderr.flush()
        os._exit(70)


# --- the driver's view of the pool lock ---------------------------------------------


class LockWatch:
    """Reads the pool's lock word (owner = process slot + 1) from the control
    segment, to tell whether a kill landed inside the lock. The word's offset
    is found at start: while a thread of this process holds the lock, the
    one 64-byte-aligned word naming this process's slot, and 0 afterwards."""

    def __init__(self, token: str):
        self.offset = None
        self.error = None
        try:
            with open(f"/dev/shm/pyarraypool-{token}", "rb") as f:
                self.map = mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ)
            probe = pyarraypool.empty(8)
            me = _core._test_block_info(probe)["my_slot"] + 1
            del probe
            t = threading.Thread(target=_core._test_hold_lock, args=(0.3,))
            t.start()
            time.sleep(0.1)
            during = self.words()
            t.join(10)
            after = self.words()
            found = [off for off, w in during.items()
                     if (w & 0x7FFFFFFF) == me and after[off] == 0]
            if len(found) == 1:
                self.offset = found[0]
            else:
                self.error = f"lock word not found (candidates {found})"
        except Exception as e:  # reported; the test fails on it
            self.error = f"{type(e).__name__}: {e}"

    def words(self) -> dict[int, int]:
        return {off: struct.unpack_from("<I", self.map, off)[0] for off in range(0, 4096, 64)}

    def owner_slot(self) -> int | None:
        """The pool slot that owns the lock now, or None."""
        if self.offset is None:
            return None
        w = struct.unpack_from("<I", self.map, self.offset)[0] & 0x7FFFFFFF
        return w - 1 if w else None


# --- the driver ----------------------------------------------------------------------


def read_frames(fd: int, limit_s: float = 1.0) -> bytes:
    """Everything in the pipe now (a read of 1 MiB takes all that a pipe holds)."""
    buf = b""
    deadline = time.monotonic() + limit_s
    p = select.poll()
    p.register(fd, select.POLLIN)
    while time.monotonic() < deadline and p.poll(0):
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        buf += chunk
    return buf


def _chain(buf: bytes, pos: int) -> list[bytes] | None:
    frames = []
    while pos < len(buf):
        if pos + 4 > len(buf):
            return None
        (n,) = struct.unpack_from("!i", buf, pos)
        end = pos + 4 + n
        if not (2 <= n <= 16384) or end > len(buf) or buf[pos + 4] != 0x80 or buf[end - 1] != 0x2E:
            return None
        frames.append(buf[pos + 4:end])
        pos = end
    return frames


def split_frames(buf: bytes) -> tuple[list[bytes], int]:
    """Whole messages in `buf` and how many bytes before them were a torn
    message (its head read by a reader that was then killed)."""
    for start in range(len(buf) + 1):
        frames = _chain(buf, start)
        if frames is not None:
            return frames, start
    return [], len(buf)  # unreachable: the empty chain at len(buf) parses


# Root can start workers in another pid namespace that shares /dev/shm (a
# container of the same pod): their pids mean nothing here, and liveness must
# not need them (docs/design.md, "Liveness").
CAN_UNSHARE_PID = os.geteuid() == 0


LAUNCHER = """\
import ctypes, os, signal, sys
# Started by multiprocessing's spawn in place of the interpreter: the worker
# runs as pid 1 of a new pid namespace, with this launcher's mounts (the
# same /dev/shm) and descriptors, and dies with it (PR_SET_PDEATHSIG). Its
# end is reported as the launcher's own: a worker killed by a signal makes
# the launcher die of that signal, as the driver's checks expect.
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x20000000) != 0:  # CLONE_NEWPID: for the next child
    sys.exit("unshare(CLONE_NEWPID): " + os.strerror(ctypes.get_errno()))
pid = os.fork()
if pid == 0:
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    os.execv(PYTHON, [PYTHON] + sys.argv[1:])
while True:
    try:
        _, status = os.waitpid(pid, 0)
        break
    except ChildProcessError:
        sys.exit(1)
    except InterruptedError:
        continue
if os.WIFSIGNALED(status):
    try:
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    except OSError:
        pass  # SIGKILL has no handler to reset
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.WEXITSTATUS(status))
"""


def pid_namespace_launcher() -> str:
    """A stand-in for the Python executable that multiprocessing's spawn
    runs, which starts the worker in a pid namespace of its own (LAUNCHER).
    Not `unshare --fork`: util-linux 2.38's exits with status 1 ("sigprocmask
    unblock failed") when its child is killed, which would read as a worker
    that died on its own."""
    where = tempfile.mkdtemp(prefix="pap-soak-")
    atexit.register(shutil.rmtree, where, True)
    path = os.path.join(where, "python-in-a-pid-namespace")
    with open(path, "w") as f:
        f.write(f"#!{sys.executable} -I\nPYTHON = {sys.executable!r}\n" + LAUNCHER)
    os.chmod(path, 0o755)
    return path


class Driver:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.fork = mp.get_context("fork")
        self.spawn = mp.get_context("spawn")
        self.violations = Violations(args.violations)
        # Queues from the spawn context: their semaphores have names, so a
        # spawned replacement can open them too (fork-context ones are unlinked).
        self.inboxes = [self.spawn.Queue() for _ in range(args.workers)]
        self.driver_q = self.spawn.Queue()
        self.semaphores = []
        for q in self.inboxes + [self.driver_q]:
            self.semaphores += [q._rlock._semlock.name, q._sem._semlock.name,
                                q._wlock._semlock.name]
            q._wlock = NoLock()
        gc.collect()  # the replaced write locks go (and unlink their names) now
        self.status = self.fork.RawArray("d", args.workers * NFIELDS)
        self.procs: list = [None] * args.workers
        self.in_ns = [False] * args.workers  # started in another pid namespace
        self.ns_launcher = (pid_namespace_launcher() if CAN_UNSHARE_PID and args.ns_every > 0
                            else None)
        self.started_at = [0.0] * args.workers
        self.counters: dict = {}  # the driver's own receive counters
        self.held: list = []
        self.result = {
            "kills": 0, "kills_in_lock": 0, "kills_in_lock_confirmed": 0,
            "kills_by_phase": {}, "fork_starts": 0, "spawn_starts": 0, "pid_ns_starts": 0,
            "hangs": 0, "workers_died_on_their_own": 0, "verify_failures": 0,
            "verify_calls": 0, "rescued_messages": 0, "torn_heads": 0,
            "slowest_kill_reap_s": 0.0,
        }
        self.incarnation = 0

    # workers
    def start(self, slot: int, ctx=None, in_ns: bool = False) -> None:
        ctx = ctx or self.fork
        in_ns = in_ns and ctx is self.spawn and self.ns_launcher is not None
        row = slot * NFIELDS
        self.status[row + F_PHASE] = P_START
        self.status[row + F_POOL_SLOT] = -1
        self.status[row + F_STOP] = 0
        self.status[row + F_HEARTBEAT] = time.monotonic()
        self.incarnation += 1
        seed = (self.args.seed << 32) ^ (self.incarnation << 8) ^ slot
        p = ctx.Process(target=worker_main, daemon=True,
                        args=(slot, self.inboxes, self.driver_q, self.status,
                              self.args.violations, seed))
        if in_ns:
            # spawn runs "the executable"; for this one start, the launcher.
            python = mp.spawn.get_executable()
            mp.spawn.set_executable(self.ns_launcher)
            try:
                p.start()
            finally:
                mp.spawn.set_executable(python)
            self.result["pid_ns_starts"] += 1
        else:
            p.start()
            self.result["spawn_starts" if ctx is self.spawn else "fork_starts"] += 1
        self.procs[slot] = p
        self.in_ns[slot] = in_ns
        self.started_at[slot] = time.monotonic()

    def signal_worker(self, slot: int, sig: int) -> None:
        """Sends `sig` to the worker itself: in another pid namespace, that is
        the launcher's child (its pid as seen here), whose death the launcher
        reports as its own (unshare re-raises the signal)."""
        p = self.procs[slot]
        pid = p.pid
        if self.in_ns[slot]:
            try:
                with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
                    children = f.read().split()
                if children:
                    pid = int(children[0])
            except OSError:
                pass  # gone already, or not started: then the launcher is all there is
        os.kill(pid, sig)

    def reap(self, slot: int, timeout: float = 10.0) -> int | None:
        p = self.procs[slot]
        p.join(timeout)
        if p.exitcode is None:
            self.violations.add("unkillable", slot=slot, pid=p.pid)
            return None
        code = p.exitcode
        p.close()
        self.procs[slot] = None
        return code

    def rescue(self, slot: int) -> None:
        """The slot's reader is dead: take what is in its pipe (see the docstring)."""
        frames, torn = split_frames(read_frames(self.inboxes[slot]._reader.fileno()))
        if torn:
            self.result["torn_heads"] += 1
            self.counters["lost_torn"] = self.counters.get("lost_torn", 0) + 1
        for raw in frames:
            self.result["rescued_messages"] += 1
            arr = handle_message(raw, None, 0, self.violations, f"driver (rescue {slot})",
                                 self.counters)
            del arr

    def drain_own(self, timeout: float) -> None:
        reader = self.driver_q._reader
        t_end = time.monotonic() + timeout
        while True:
            left = t_end - time.monotonic()
            if not reader.poll(max(0.0, left)):
                return
            arr = handle_message(reader.recv_bytes(), None, 0, self.violations, "driver",
                                 self.counters)
            if arr is not None:
                self.held.append(arr)
                if len(self.held) > 4:
                    self.held.pop(0)
            del arr
            if left <= 0:
                return

    def kill(self, slot: int, lock: LockWatch) -> None:
        row = slot * NFIELDS
        pool_slot = int(self.status[row + F_POOL_SLOT])
        ph = PHASES[int(self.status[row + F_PHASE])]
        owner_before = lock.owner_slot()
        t0 = time.monotonic()
        self.signal_worker(slot, signal.SIGKILL)
        code = self.reap(slot)
        took = time.monotonic() - t0
        self.result["slowest_kill_reap_s"] = max(self.result["slowest_kill_reap_s"], took)
        owner_after = lock.owner_slot()
        if code is not None and code != -signal.SIGKILL:
            # It had ended before the signal: on its own.
            self.result["workers_died_on_their_own"] += 1
            self.violations.add("worker_died", slot=slot, exitcode=code)
        self.result["kills"] += 1
        if pool_slot >= 0 and owner_before == pool_slot:
            self.result["kills_in_lock"] += 1
            if owner_after == pool_slot:
                self.result["kills_in_lock_confirmed"] += 1
            ph += "+lock"
        self.result["kills_by_phase"][ph] = self.result["kills_by_phase"].get(ph, 0) + 1
        if code is None:
            return  # not dead: reported; leave the slot empty
        self.rescue(slot)
        # Every `spawn_every`-th replacement is started by spawn, the others by fork.
        spawn = self.args.spawn_every > 0 and self.result["kills"] % self.args.spawn_every == 0
        # Every `ns_every`-th replacement (when root) is spawned in a pid
        # namespace of its own; counted from half-way, so that these and the
        # plain spawns above are not the same replacements.
        n = self.args.ns_every
        in_ns = n > 0 and (self.result["kills"] + n // 2) % n == 0
        self.start(slot, self.spawn if spawn or in_ns else self.fork, in_ns=in_ns)

    def pick_victim(self, lock: LockWatch) -> int:
        live = [i for i, p in enumerate(self.procs) if p is not None]
        if self.result["kills"] % 4 == 3:
            # Aim inside the lock: a worker that owns it now.
            deadline = time.monotonic() + 0.2
            while time.monotonic() < deadline:
                owner = lock.owner_slot()
                for i in live:
                    if owner is not None and int(self.status[i * NFIELDS + F_POOL_SLOT]) == owner:
                        return i
                time.sleep(0.0005)
        return self.rng.choice(live)

    def watchdog(self) -> None:
        now = time.monotonic()
        for slot, p in enumerate(self.procs):
            if p is None:
                continue
            if p.exitcode is not None:
                code = self.reap(slot)
                self.result["workers_died_on_their_own"] += 1
                self.violations.add("worker_died", slot=slot, exitcode=code)
                self.rescue(slot)
                self.start(slot)
                continue
            beat = self.status[slot * NFIELDS + F_HEARTBEAT]
            if now - beat > self.args.hang_seconds:
                self.result["hangs"] += 1
                self.violations.add(
                    "hang", slot=slot, pid=p.pid, seconds=now - beat,
                    phase=PHASES[int(self.status[slot * NFIELDS + F_PHASE])])
                self.signal_worker(slot, signal.SIGUSR1)  # faulthandler: its stacks to stderr
                time.sleep(0.5)
                self.signal_worker(slot, signal.SIGKILL)
                if self.reap(slot) is not None:
                    self.rescue(slot)
                    self.start(slot)

    def verify_pool(self) -> None:
        self.result["verify_calls"] += 1
        try:
            _core._verify()
        except Exception as e:
            self.result["verify_failures"] += 1
            self.violations.add("verify", error=f"{type(e).__name__}: {e}")

    def run(self) -> dict:
        a = self.args
        pyarraypool.stats()  # attach (creates the pool with our settings)
        token = _core._pool_token()
        print("TOKEN", token, flush=True)
        self.result["token"] = token
        lock = LockWatch(token)
        if lock.error:
            self.violations.add("lock_watch", error=lock.error)
        for slot in range(a.workers):
            self.start(slot)
        t_start = time.monotonic()
        t_end = t_start + a.seconds
        next_kill = t_start + a.kill_interval
        next_verify = t_start + 1.0
        next_report = t_start + 10.0
        while time.monotonic() < t_end:
            self.drain_own(min(0.02, max(0.0, next_kill - time.monotonic())))
            self.watchdog()
            now = time.monotonic()
            if now >= next_kill:
                self.kill(self.pick_victim(lock), lock)
                next_kill += a.kill_interval
                if next_kill < time.monotonic():  # never let kills pile up
                    next_kill = time.monotonic() + a.kill_interval
            if now >= next_verify:
                self.verify_pool()
                next_verify = now + 1.0
            if now >= next_report:
                ops = sum(self.status[i * NFIELDS + F_OPS] for i in range(a.workers))
                print(f"[{now - t_start:6.1f} s] ops {int(ops)}  kills {self.result['kills']}"
                      f" (in lock {self.result['kills_in_lock']})  hangs {self.result['hangs']}"
                      f"  used {pyarraypool.stats().used_bytes}", flush=True)
                next_report = now + 10.0
        self.result["soak_seconds"] = time.monotonic() - t_start

        # Stop: half by SIGKILL, the others asked to leave (bounded waits).
        for slot, p in enumerate(self.procs):
            if p is not None and slot % 2 == 0:
                self.kill_final(slot)
        for slot, p in enumerate(self.procs):
            if p is not None:
                self.status[slot * NFIELDS + F_STOP] = 1
        deadline = time.monotonic() + a.hang_seconds
        for slot, p in enumerate(self.procs):
            if p is None:
                continue
            p.join(max(0.1, deadline - time.monotonic()))
            if p.exitcode is None:
                self.result["hangs"] += 1
                self.violations.add("hang", slot=slot, pid=p.pid, when="asked to stop",
                                    phase=PHASES[int(self.status[slot * NFIELDS + F_PHASE])])
                self.signal_worker(slot, signal.SIGUSR1)
                time.sleep(0.5)
                self.signal_worker(slot, signal.SIGKILL)
                self.reap(slot)
            else:
                code = self.reap(slot)
                if code != 0:
                    self.result["workers_died_on_their_own"] += 1
                    self.violations.add("worker_died", slot=slot, exitcode=code, when="stopping")
        t_last_worker = time.monotonic()
        # Every worker is dead: drain every queue, verifying what loads.
        for slot in range(a.workers):
            self.rescue(slot)
        self.drain_own(0.0)
        for raw in split_frames(read_frames(self.driver_q._reader.fileno()))[0]:
            arr = handle_message(raw, None, 0, self.violations, "driver (end)", self.counters)
            del arr
        self.verify_pool()
        self.held.clear()
        gc.collect()
        # Pickles that were made but never loaded (lost with a killed process)
        # count until transfer_timeout: wait past it, then collect.
        time.sleep(max(0.0, t_last_worker + TRANSFER_TIMEOUT + 0.5 - time.monotonic()))
        freed = pyarraypool.collect()
        s = pyarraypool.stats()
        self.verify_pool()
        files = sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"pyarraypool-{token}"))

        r = self.result
        totals = {k: int(sum(self.status[i * NFIELDS + f] for i in range(a.workers)))
                  for k, f in COUNTERS.items()}
        for k, v in self.counters.items():
            totals["driver_" + k] = int(v)
        r.update({
            "seconds": a.seconds, "workers": a.workers, "kill_interval": a.kill_interval,
            "transfer_timeout": TRANSFER_TIMEOUT, "hang_seconds": a.hang_seconds,
            **totals,
            "corruptions": totals["corruptions"] + totals.get("driver_corruptions", 0),
            "premature_stale": totals["premature_stale"] + totals.get("driver_premature_stale", 0),
            "lost_in_transit": (totals["lost_torn"] + totals["lost_stale"]
                                + totals.get("driver_lost_torn", 0)
                                + totals.get("driver_lost_stale", 0)),
            "collected_at_end": freed,
            "leaked_bytes": s.used_bytes,
            "final_stats": {"used_bytes": s.used_bytes, "live_blocks": s.live_blocks,
                            "pending_transfers": s.pending_transfers, "processes": s.processes,
                            "pids": list(s.pids), "segments": s.segments,
                            "returned_bytes": s.returned_bytes},
            "pool_files_at_end": files,
            "semaphores": self.semaphores,
            "lock_word_offset": lock.offset,
            "python": sys.version.split()[0], "numpy": np.__version__,
        })
        if s.used_bytes != 0 or s.live_blocks != 0 or s.pending_transfers != 0:
            self.violations.add("leak", stats=r["final_stats"])
        if s.processes != 1 or s.pids != (os.getpid(),):
            self.violations.add("phantom_process", stats=r["final_stats"])
        r["violations"] = self.violations.read()
        r["ok"] = not r["violations"]
        return r

    def kill_final(self, slot: int) -> None:
        self.signal_worker(slot, signal.SIGKILL)
        code = self.reap(slot)
        if code is not None and code != -signal.SIGKILL:
            self.result["workers_died_on_their_own"] += 1
            self.violations.add("worker_died", slot=slot, exitcode=code, when="final kill")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--kill-interval", type=float, default=0.5)
    ap.add_argument("--hang-seconds", type=float, default=10.0,
                    help="a worker without progress for this long counts as hung")
    ap.add_argument("--spawn-every", type=int, default=20,
                    help="start every n-th replacement by spawn instead of fork (0: never)")
    ap.add_argument("--ns-every", type=int, default=10,
                    help="as root, spawn every n-th replacement in a pid namespace of its own "
                         "(0: never)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", default=os.path.join(REPO, "build", "soak_result.json"))
    args = ap.parse_args()
    if any(k.startswith("PYARRAYPOOL_") and k != "PYARRAYPOOL_POOL" for k in os.environ):
        print("note: PYARRAYPOOL_* settings in the environment are overridden", file=sys.stderr)
    if args.seed is None:
        args.seed = random.SystemRandom().getrandbits(31)
    faulthandler.enable()
    # A short decay: memory is given back (by the keeper, collect() and stats())
    # all the time, also while workers are killed.
    pyarraypool.configure(transfer_timeout=TRANSFER_TIMEOUT, max_bytes="2G", decay=0.05)
    args.violations = os.path.abspath(args.json) + ".violations"
    os.makedirs(os.path.dirname(args.violations), exist_ok=True)
    if os.path.exists(args.violations):
        os.unlink(args.violations)
    print(f"soak: {args.seconds:g} s, {args.workers} workers, "
          f"a kill every {args.kill_interval:g} s, seed {args.seed}", flush=True)
    result = Driver(args).run()
    result["seed"] = args.seed
    if os.path.exists(args.violations):
        os.unlink(args.violations)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    keys = ["ops", "allocs", "sent_to_workers", "sent_to_driver", "received", "verified",
            "verified_bytes", "kills", "kills_in_lock", "kills_in_lock_confirmed",
            "fork_starts", "spawn_starts", "pid_ns_starts", "hangs", "corruptions",
            "premature_stale",
            "lost_in_transit", "stale_untracked", "rescued_messages", "workers_died_on_their_own",
            "verify_calls", "verify_failures", "pool_full", "exec_children", "exec_pinned",
            "leaked_bytes"]
    print("SOAK " + "  ".join(f"{k}={result[k]}" for k in keys), flush=True)
    print(f"kills by phase: {result['kills_by_phase']}", flush=True)
    for v in result["violations"][:20]:
        print("VIOLATION", json.dumps(v)[:2000], flush=True)
    print("SOAK OK" if result["ok"] else "SOAK FAILED", flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
