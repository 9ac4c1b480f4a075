"""Exhaustion: a full pool, a full /dev/shm, and fragmentation over a long run.

Contract point 15 (see /work/shared/guide/contract.md). Covered elsewhere,
not repeated here:

- the pool at ``max_bytes`` raises PoolFullError naming the sizes, and
  serves the same requests again once arrays are freed:
  ``test_config.py::test_pool_full_error_names_the_sizes_and_the_setting``,
  ``test_config.py::test_pool_recovers_after_it_was_full`` and
  ``test_config.py::test_emptied_pool_serves_a_large_request_within_max_bytes``;
- a 16 MiB /dev/shm filled with 1 MiB arrays gives PoolFullError, not
  SIGBUS, and two more arrays fit after half are freed:
  ``test_config.py::test_full_dev_shm_gives_pool_full_error_not_sigbus``.

Added here: a /dev/shm that is full to the last page (other files take room
in it, requests of every size, two processes), written in full, refilled
after frees and after the other files go, and left empty at exit; a
/dev/shm too full for even the control segment; and the pool's capacity
after 10**6 random allocations and frees (the figure goes to
build/fragmentation.json).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from helpers import REPO, fresh_env, pool_files, run_python
from test_config import needs_private_shm  # root + unshare -m, or a skip with the reason

PRELUDE = """
import gc, json, math, os, random, sys
import numpy as np
import pyarraypool
from pyarraypool import _core
def settle():
    gc.collect()
    pyarraypool.collect()
    return pyarraypool.stats()
def shm_free():
    st = os.statvfs("/dev/shm")
    return st.f_bavail * st.f_frsize
"""


def run_in_private_shm(size: str, code: str,
                       timeout: float = 60) -> tuple[int, str, str, list[str]]:
    """Runs code with /dev/shm a private tmpfs of `size` (the host's is
    untouched); returns (exit status, stdout, stderr, what the program left
    in that /dev/shm after it exited)."""
    script = PRELUDE + textwrap.dedent(code)
    shell = (f'mount -t tmpfs -o size={size} tmpfs /dev/shm || exit 90; '
             '"$0" -c "$1"; rc=$?; echo "LEFT:$(ls -A /dev/shm | tr "\\n" " ")" >&2; exit $rc')
    proc = subprocess.run(["unshare", "-m", "sh", "-c", shell, sys.executable, script],
                          env=fresh_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    left_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("LEFT:")]
    assert left_lines, f"the shell did not list /dev/shm (exit {proc.returncode})\n{proc.stderr}"
    left = left_lines[-1][len("LEFT:"):].split()
    return proc.returncode, proc.stdout, proc.stderr, left


@needs_private_shm
def test_full_dev_shm_shared_with_other_files_never_sigbus_and_recovers():
    """A 16 MiB /dev/shm where 3 MiB belong to another file: the pool takes
    what is left until PoolFullError, in requests of every size from 1 KiB
    to 3 MiB and with segments smaller than segment_bytes; every byte of
    every array it got is written (a page the pool did not reserve would
    kill the process with SIGBUS here) and read back; a second process gets
    PoolFullError too; half is freed and the pool fills again; once the
    other file is removed the pool grows again. At exit /dev/shm is empty."""
    status, out, err, left = run_in_private_shm("16M", """
    pyarraypool.configure(max_bytes="1G", segment_bytes="4M")
    with open("/dev/shm/ballast", "wb") as f:          # another user of /dev/shm
        f.write(b"\\xff" * (3 << 20))
    total = 16 << 20
    rng = random.Random(20240601)
    MIN_REQ = 1024

    def fill(arrays, label):
        # Requests of log-uniform sizes; after a PoolFullError, smaller and
        # smaller ones, until even 1 KiB does not fit: /dev/shm is full.
        failures = 0
        req = None
        while True:
            if req is None:
                req = int(math.exp(rng.uniform(math.log(MIN_REQ), math.log(3 << 20))))
            try:
                a = pyarraypool.empty(req, dtype=np.uint8)
            except pyarraypool.PoolFullError as e:
                assert isinstance(e, MemoryError), e
                msg = str(e)
                assert str(req) in msg, (req, msg)
                failures += 1
                if req == MIN_REQ:
                    break
                req = max(MIN_REQ, req // 2)
                continue
            a[:] = len(arrays) % 253 + 1              # every byte written
            arrays.append(a)
            req = None
        assert failures > 0
        return arrays

    arrays = fill([], "first")
    n_first = len(arrays)
    got = sum(a.nbytes for a in arrays)
    s = pyarraypool.stats()
    print("first fill:", n_first, "arrays,", got, "bytes;", s, "free in /dev/shm:", shm_free())
    # The pool took nearly all of what the other file left: at most 1 MiB
    # (the smallest segment it could not make, and headers) unused.
    assert got >= total - (3 << 20) - (1 << 20) - s.segments * 64 * 1024, (got, s)
    # What the pool holds of /dev/shm (its segments are reserved page by
    # page: their size, capacity_bytes, is address space).
    assert s.reserved_bytes + (3 << 20) <= total, s
    assert s.segments >= 3, s                       # grew, in smaller and smaller segments
    for i, a in enumerate(arrays):                  # the bytes are all there
        v = i % 253 + 1
        assert a.min() == v and a.max() == v, i

    # Another process of the program gets PoolFullError as well, not SIGBUS.
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            b = pyarraypool.empty(2 << 20, dtype=np.uint8)
            code = 4
        except pyarraypool.PoolFullError:
            code = 0
        except BaseException:
            code = 5
        os._exit(code)
    _, wstatus = os.waitpid(pid, 0)
    assert os.WIFEXITED(wstatus) and os.WEXITSTATUS(wstatus) == 0, wstatus

    # Free every other array: their room is served again.
    freed = sum(a.nbytes for a in arrays[::2])
    del arrays[::2], a
    kept = list(arrays)
    again = fill([], "refill")
    got_again = sum(a.nbytes for a in again)
    print("refill:", len(again), "arrays,", got_again, "bytes of", freed, "freed")
    assert got_again >= freed // 2, (got_again, freed)
    for i, a in enumerate(again):
        v = i % 253 + 1
        assert a.min() == v and a.max() == v, i
    for a in kept:                                  # the survivors were not touched
        assert a.min() == a.max() and a[0] != 0

    # The other file goes: the pool can grow into its room.
    before = pyarraypool.stats().reserved_bytes
    os.unlink("/dev/shm/ballast")
    big = pyarraypool.empty(2 << 20, dtype=np.uint8)
    big[:] = 7
    assert big.min() == 7 == big.max()
    assert pyarraypool.stats().reserved_bytes > before
    del big, again, kept, arrays, a
    s = settle()
    assert s.used_bytes == 0 and s.live_blocks == 0, s
    _core._verify()
    print("OK")
    """)
    print(out)
    assert status == 0 and "OK" in out, (
        f"exit {status} (SIGBUS would be -7 or 135)\nstdout:\n{out}\nstderr:\n{err}")
    assert left == [], f"the program left {left} in its /dev/shm"


@needs_private_shm
def test_dev_shm_too_full_for_the_control_segment_gives_pool_full_error():
    """Not even the pool's control segment fits: the first use raises
    PoolFullError (no SIGBUS, no half-made files), and the same process
    uses the pool normally once there is room."""
    status, out, err, left = run_in_private_shm("4M", """
    chunk = b"\\0" * 4096
    fd = os.open("/dev/shm/ballast", os.O_WRONLY | os.O_CREAT, 0o600)
    try:                                            # fill /dev/shm to the last page
        while True:
            os.write(fd, chunk)
    except OSError as e:
        assert e.errno == 28, e                     # ENOSPC
    os.close(fd)
    assert shm_free() < 64 << 10, shm_free()
    for attempt in range(3):
        try:
            pyarraypool.zeros(10)
        except pyarraypool.PoolFullError as e:
            assert isinstance(e, MemoryError)
            assert "/dev/shm" in str(e), str(e)
        else:
            raise AssertionError("the pool was created in a full /dev/shm")
    names = sorted(os.listdir("/dev/shm"))
    assert names == ["ballast"], names               # nothing half-made left behind
    os.unlink("/dev/shm/ballast")
    a = pyarraypool.zeros(1000)
    a[:] = 3
    assert a.sum() == 3000
    del a
    assert settle().used_bytes == 0
    print("OK")
    """)
    assert status == 0 and "OK" in out, (
        f"exit {status} (SIGBUS would be -7 or 135)\nstdout:\n{out}\nstderr:\n{err}")
    assert left == [], f"the program left {left} in its /dev/shm"


# --- fragmentation over 10**6 random operations -------------------------------------------

FRAG_OPS = 1_000_000
FRAG_MAX_LIVE = 2_000
FRAG_SEGMENT = 8 << 20
FRAG_MIN, FRAG_MAX = 64, 256 << 10


def test_fragmentation_after_a_million_random_operations_stays_bounded():
    """10**6 random pyarraypool.empty / del operations (each, with p = 1/2,
    allocates an array of a log-uniform size between 64 B and 256 KiB, or
    frees a random live one; at most 2,000 live; the probability of
    allocating alternates between 0.55 and 0.45 every 20,000 operations, so
    the live set repeatedly sweeps from few arrays to the cap and back) in a pool of 8 MiB
    segments. Bound: at every checkpoint, capacity_bytes <= 2 * the peak of
    live requested bytes so far + one segment. The figure goes to
    build/fragmentation.json."""
    proc = run_python(f"""
    import json, math, time
    import numpy as np
    import pyarraypool
    from pyarraypool import _core

    N, MAX_LIVE, SEG = {FRAG_OPS}, {FRAG_MAX_LIVE}, {FRAG_SEGMENT}
    pyarraypool.configure(segment_bytes=SEG, max_bytes="4G")
    rng = np.random.default_rng(20240601)
    sizes = np.exp(rng.uniform(math.log({FRAG_MIN}), math.log({FRAG_MAX}), N))
    sizes = sizes.astype(np.int64).tolist()
    # P(allocate) alternates between 0.55 and 0.45 every 20,000 operations:
    # the live set sweeps up to the cap and back down, again and again.
    p_alloc = np.where((np.arange(N) // 20_000) % 2 == 0, 0.55, 0.45)
    coins = (rng.random(N) < p_alloc).tolist()
    picks = rng.random(N).tolist()
    empty, u1 = pyarraypool.empty, np.uint8
    live, nbytes = [], []
    cur = peak = peak_n = 0
    checkpoints = []
    t0 = time.perf_counter()
    for start in range(0, N, 100_000):
        for i in range(start, start + 100_000):
            n = len(live)
            if n == 0 or (coins[i] and n < MAX_LIVE):
                s = sizes[i]
                live.append(empty(s, u1))
                nbytes.append(s)
                cur += s
                if cur > peak:
                    peak = cur
                if n + 1 > peak_n:
                    peak_n = n + 1
            else:
                j = int(picks[i] * n)
                cur -= nbytes[j]
                live[j] = live[-1]
                live.pop()
                nbytes[j] = nbytes[-1]
                nbytes.pop()
        st = pyarraypool.stats()        # also returns the local cache to the pool
        checkpoints.append(dict(ops=start + 100_000, live_arrays=len(live), live_bytes=cur,
                                peak_live_bytes=peak, used_bytes=st.used_bytes,
                                capacity_bytes=st.capacity_bytes, free_bytes=st.free_bytes,
                                largest_free_block=st.largest_free_block,
                                segments=st.segments))
    seconds = time.perf_counter() - t0
    end = checkpoints[-1]
    _core._verify()
    del live[:]
    st = pyarraypool.stats()
    report = dict(
        ops=N, seed=20240601, max_live_arrays=MAX_LIVE,
        sizes="log-uniform {FRAG_MIN} B - {FRAG_MAX} B",
        segment_bytes=SEG, seconds=round(seconds, 2), peak_live_arrays=peak_n,
        peak_live_bytes=peak, capacity_bytes=end["capacity_bytes"],
        capacity_over_peak_live=round(end["capacity_bytes"] / peak, 4),
        used_bytes_at_end=end["used_bytes"], live_bytes_at_end=end["live_bytes"],
        free_bytes_at_end=end["free_bytes"], largest_free_block_at_end=end["largest_free_block"],
        segments_at_end=end["segments"],
        after_freeing_all=dict(used_bytes=st.used_bytes, capacity_bytes=st.capacity_bytes,
                               largest_free_block=st.largest_free_block, segments=st.segments),
        checkpoints=checkpoints)
    print("REPORT", json.dumps(report))
    """, timeout=300)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT "))
    report = json.loads(line[len("REPORT "):])
    os.makedirs(os.path.join(REPO, "build"), exist_ok=True)
    with open(os.path.join(REPO, "build", "fragmentation.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nfragmentation after {report['ops']} ops ({report['seconds']} s): "
          f"capacity {report['capacity_bytes']} B = {report['capacity_over_peak_live']} x the peak "
          f"live {report['peak_live_bytes']} B; largest free block "
          f"{report['largest_free_block_at_end']} B; {report['segments_at_end']} segments")

    assert report["peak_live_arrays"] == FRAG_MAX_LIVE, report["peak_live_arrays"]
    for cp in report["checkpoints"]:
        bound = 2 * cp["peak_live_bytes"] + FRAG_SEGMENT
        assert cp["capacity_bytes"] <= bound, (
            f"after {cp['ops']} ops the pool holds {cp['capacity_bytes']} bytes for a peak of "
            f"{cp['peak_live_bytes']} live bytes (bound {bound})", cp)
        assert cp["used_bytes"] >= cp["live_bytes"], cp
        assert cp["used_bytes"] + cp["free_bytes"] == cp["capacity_bytes"], cp
        assert 0 < cp["largest_free_block"] <= cp["free_bytes"], cp
    # Everything freed: every segment coalesces back into one free block.
    done = report["after_freeing_all"]
    assert done["used_bytes"] == 0, done
    assert done["largest_free_block"] == FRAG_SEGMENT, done


# --- segment numbers under max_bytes --------------------------------------------------------

def test_segment_numbers_are_reused_so_max_bytes_never_fails_for_good():
    """Under a max_bytes of 1 MiB, arrays of 300, 600 and 900 KB, each
    dropped before the next, and a 1.5 MB one that does not fit
    (PoolFullError, which gives back every empty segment): three segments
    are made and given back per round, over 4,096 in all, more than there
    are segment numbers. Every allocation that fits max_bytes must still
    succeed. A forked process of the pool loads a handle now and then,
    keeping its mappings of retired segments in between: it gets the bytes
    of the live block, never those of an older segment with the same
    number. Handles of blocks in given-back segments give StaleHandleError,
    in both processes."""
    proc = run_python("""
    import os, pickle, struct
    import numpy as np
    import pyarraypool
    from pyarraypool import _core

    pyarraypool.configure(max_bytes=1 << 20)
    sizes = [300_000, 600_000, 900_000, 1_500_000]
    first = pyarraypool.empty(300_000, np.uint8, transfer_required=False)
    token = _core._pool_token()
    print("TOKEN", token)
    prefix = "pyarraypool-" + token + "-"
    stale = pickle.dumps(first)
    del first

    def send(fd, data):
        os.write(fd, struct.pack("<I", len(data)) + data)

    def recv(fd):
        n = struct.unpack("<I", os.read(fd, 4))[0]
        buf = b""
        while len(buf) < n:
            buf += os.read(fd, n - len(buf))
        return buf

    from_parent, to_child = os.pipe()
    from_child, to_parent = os.pipe()
    pid = os.fork()
    if pid == 0:
        # Between two loads this process does nothing with the pool: it
        # keeps whatever segments it mapped, retired or not.
        status = 0
        while True:
            data = recv(from_parent)
            if data == b"stop":
                break
            want, payload = data[0], data[1:]
            try:
                b = pickle.loads(payload)
                reply = b"ok" if b[0] == want and b[-1] == want else b"wrong bytes"
                del b
            except pyarraypool.StaleHandleError:
                reply = b"stale"
            except BaseException as e:
                reply = repr(e).encode()
            send(to_parent, reply)
        os._exit(status)

    def main():
        seen = set()
        made = fails = 0
        for i in range(6000):
            size = sizes[i % len(sizes)]
            try:
                a = pyarraypool.empty(size, np.uint8)
            except pyarraypool.PoolFullError as e:
                assert size > 1 << 20, (i, size, str(e))
                fails += 1
                continue
            made += 1
            v = i % 251
            a[:4096] = v
            a[-4096:] = v
            seen.update(n for n in os.listdir("/dev/shm") if n.startswith(prefix))
            if i % 37 == 0:
                send(to_child, bytes([v]) + pickle.dumps(a))
                reply = recv(from_child)
                assert reply == b"ok", (i, reply)
            del a
        print("made", made, "fails", fails, "segment files made", len(seen),
              "segments", pyarraypool.stats().segments)
        assert len(seen) > 4096, len(seen)
        assert made == 4500 and fails == 1500, (made, fails)
        # Segment numbers are few: retired ones are used again.
        assert pyarraypool.stats().segments <= 8, pyarraypool.stats()
        try:
            pickle.loads(stale)
        except pyarraypool.StaleHandleError:
            pass
        else:
            raise AssertionError("a handle of a given-back segment loaded")
        send(to_child, bytes([0]) + stale)
        assert recv(from_child) == b"stale"
        stop_child()

    def stop_child():
        send(to_child, b"stop")
        _, wstatus = os.waitpid(pid, 0)
        assert os.WIFEXITED(wstatus) and os.WEXITSTATUS(wstatus) == 0, wstatus

    try:
        main()
    except BaseException:
        try:
            os.kill(pid, 9)                         # never outlive a failure
            os.waitpid(pid, 0)
        except OSError:
            pass
        raise
    _core._verify()
    print("OK")
    """, timeout=120)
    assert "OK" in proc.stdout, proc.stdout
    token = next(ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("TOKEN "))
    assert pool_files(token) == [], pool_files(token)
