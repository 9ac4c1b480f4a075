"""Configuration: configure(), the PYARRAYPOOL_* variables, sizes, growth, PoolFullError.

Contract point 15 (see /work/shared/guide/contract.md) and the settings of
pyarraypool.configure. Settings only apply to a pool that does not run yet,
so most tests run a child program with a pool of its own; the pytest
process's pool (already running) serves for the errors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from helpers import REPO, fresh_env, run_python

import pyarraypool
from pyarraypool import _core

K, M, G = 1 << 10, 1 << 20, 1 << 30

PRELUDE = """
import gc, os, pickle, sys
import numpy as np
import pyarraypool
from pyarraypool import _core
def settle():
    gc.collect()
    pyarraypool.collect()
    return pyarraypool.stats()
"""


def run(code: str, tmp_path=None, **env: str) -> str:
    """Runs code in a new program; from a file if tmp_path is given (needed for
    spawn and forkserver workers that run functions of the program)."""
    code = PRELUDE + textwrap.dedent(code)
    if tmp_path is None:
        proc = run_python(code, env=fresh_env(**env), timeout=60)
    else:
        script = tmp_path / "prog.py"
        script.write_text(code)
        proc = subprocess.run([sys.executable, str(script)], env=fresh_env(**env),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout


# --- configure() before first use ------------------------------------------------


def test_configure_before_first_use_sets_the_pool():
    run("""
    import multiprocessing as mp
    pyarraypool.configure(max_bytes="96M", segment_bytes="4M", transfer_timeout=7.5)
    a = pyarraypool.zeros(1000)
    s = pyarraypool.stats()
    assert s.max_bytes == 96 << 20, s
    assert s.segment_bytes == 4 << 20, s
    assert s.transfer_timeout == 7.5, s
    assert s.capacity_bytes == 4 << 20, s      # one segment of segment_bytes
    # Every process of the program sees the same settings.
    for method in ("fork", "spawn"):
        with mp.get_context(method).Pool(1) as pool:
            w = pool.apply(pyarraypool.stats)
        assert (w.max_bytes, w.segment_bytes, w.transfer_timeout) == (96 << 20, 4 << 20, 7.5), w
        assert w.pool == s.pool
    print("OK")
    """)


SIZES = [
    (4096, 4096),
    ("4096", 4096),
    ("64K", 64 * K),
    ("512M", 512 * M),
    ("512m", 512 * M),
    ("2G", 2 * G),
    ("1.5G", int(1.5 * G)),
    ("1.5GiB", int(1.5 * G)),
    ("3 MB", 3 * M),
    (" 2G ", 2 * G),
    ("1T", 1 << 40),
    (2 * G + 4096, 2 * G + 4096),
]


def test_size_strings_set_the_pool_of_a_new_program():
    sizes = [(v, e) for v, e in SIZES if e >= 64 * K]
    run(f"""
    sizes = {sizes!r}
    # Before first use a program may configure as often as it likes; the
    # last settings create the pool.
    for value, expected in sizes:
        pyarraypool.configure(max_bytes=value, segment_bytes=value)
        c = _core._config()
        assert c["max_bytes"] == expected and c["segment_bytes"] == expected, (value, c)
    pyarraypool.configure(max_bytes="1.5G", segment_bytes="1.5M")
    a = pyarraypool.zeros(10)
    s = pyarraypool.stats()
    assert s.max_bytes == int(1.5 * 2**30) and s.segment_bytes == int(1.5 * 2**20), s
    print("OK")
    """)


BAD_SIZES = [
    ("abc", ValueError),
    ("", ValueError),
    ("12X", ValueError),
    ("1e9", ValueError),
    ("-1", ValueError),
    ("-1G", ValueError),
    ("0", ValueError),
    ("0.0001K", ValueError),    # rounds to 0 bytes
    (0, ValueError),
    (-4096, ValueError),
    (1.5, TypeError),
    (True, TypeError),
    ([4096], TypeError),
    (b"512M", TypeError),
]


@pytest.mark.parametrize("key", ["max_bytes", "segment_bytes"])
@pytest.mark.parametrize("value,error", BAD_SIZES, ids=[repr(v) for v, _ in BAD_SIZES])
def test_bad_sizes_are_refused(key, value, error):
    before = _core._config()
    with pytest.raises(error):
        pyarraypool.configure(**{key: value})
    assert _core._config() == before


@pytest.mark.parametrize("key", ["max_bytes", "segment_bytes"])
@pytest.mark.parametrize("value", [2**64, "16777216T", 2**64 + 1],
                         ids=["2**64", "16777216T", "2**64+1"])
def test_sizes_beyond_64_bits_are_refused(key, value):
    """A size that does not fit the pool's 64-bit settings is an error, not
    silently wrapped around (2**64 + n would become n)."""
    before = _core._config()
    with pytest.raises((ValueError, OverflowError)):
        pyarraypool.configure(**{key: value})
    assert _core._config() == before


def test_wrapped_size_equal_to_the_running_setting_is_still_refused():
    # 2**64 + max_bytes wraps around to exactly the running setting: it must
    # not pass as "the same settings".
    cur = pyarraypool.stats()
    with pytest.raises((ValueError, OverflowError)):
        pyarraypool.configure(max_bytes=2**64 + cur.max_bytes)


@pytest.mark.parametrize("value", [0, -1, float("nan"), "abc", float("-inf")])
def test_bad_transfer_timeouts_are_refused(value):
    before = _core._config()
    with pytest.raises((ValueError, TypeError)):
        pyarraypool.configure(transfer_timeout=value)
    assert _core._config() == before


# --- configure() once the pool runs ----------------------------------------------


def test_configure_with_other_settings_once_the_pool_runs_raises():
    cur = pyarraypool.stats()
    for kwargs in ({"max_bytes": cur.max_bytes + 4096},
                   {"segment_bytes": cur.segment_bytes * 2},
                   {"transfer_timeout": cur.transfer_timeout + 1}):
        with pytest.raises(pyarraypool.PoolError) as info:
            pyarraypool.configure(**kwargs)
        assert not isinstance(info.value, (pyarraypool.PoolFullError,
                                           pyarraypool.StaleHandleError,
                                           pyarraypool.InvalidHandleError))
        msg = str(info.value)
        assert str(cur.max_bytes) in msg and str(cur.segment_bytes) in msg, msg
        assert "configure" in msg, msg
    after = pyarraypool.stats()
    assert (after.max_bytes, after.segment_bytes, after.transfer_timeout) == (
        cur.max_bytes, cur.segment_bytes, cur.transfer_timeout)


def test_configure_with_the_same_settings_once_the_pool_runs_is_fine():
    cur = pyarraypool.stats()
    pyarraypool.configure()
    pyarraypool.configure(max_bytes=cur.max_bytes)
    pyarraypool.configure(max_bytes=cur.max_bytes, segment_bytes=cur.segment_bytes,
                          transfer_timeout=cur.transfer_timeout)
    if cur.segment_bytes % M == 0:
        pyarraypool.configure(segment_bytes=f"{cur.segment_bytes // M}M")
    x = pyarraypool.zeros(10)
    assert pyarraypool.stats().pool == cur.pool
    del x


def test_configure_in_a_worker_of_a_running_program(tmp_path):
    run("""
    import multiprocessing as mp

    def worker(settings):
        # This process has not used the pool yet, but its program's pool runs.
        pyarraypool.configure(**settings)          # the same: fine
        try:
            pyarraypool.configure(max_bytes="8M")
        except pyarraypool.PoolError as e:
            return str(e)
        return None

    if __name__ == "__main__":
        pyarraypool.configure(max_bytes="64M", segment_bytes="2M")
        x = pyarraypool.zeros(10)
        s = pyarraypool.stats()
        settings = dict(max_bytes=s.max_bytes, segment_bytes=s.segment_bytes,
                        transfer_timeout=s.transfer_timeout)
        for method in ("fork", "forkserver"):
            with mp.get_context(method).Pool(1) as pool:
                msg = pool.apply(worker, (settings,))
            assert msg is not None and "67108864" in msg, (method, msg)
        try:
            pyarraypool.configure(segment_bytes="4M")
        except pyarraypool.PoolError:
            pass
        else:
            raise AssertionError("configure() changed a running pool")
        print("OK")
    """, tmp_path=tmp_path)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_configure_applies_to_workers_that_use_the_pool_first(method):
    """The settings are the program's: a worker that allocates before the
    parent has used the pool creates it with the parent's settings."""
    run(f"""
    import multiprocessing as mp
    pyarraypool.configure(max_bytes="48M", segment_bytes="2M", transfer_timeout=9)
    with mp.get_context({method!r}).Pool(1) as pool:
        a = pool.apply(pyarraypool.zeros, (10,))   # the worker creates the pool
        s = pyarraypool.stats()
    assert (s.max_bytes, s.segment_bytes, s.transfer_timeout) == (48 << 20, 2 << 20, 9.0), s
    print("OK")
    """)


# --- environment variables -------------------------------------------------------


def test_environment_variables_set_the_pool():
    run("""
    import multiprocessing as mp
    a = pyarraypool.zeros(10)
    s = pyarraypool.stats()
    assert s.max_bytes == 48 << 20, s
    assert s.segment_bytes == 3 << 20, s
    assert s.transfer_timeout == 2.5, s
    assert s.capacity_bytes <= 4 << 20, s
    with mp.get_context("spawn").Pool(1) as pool:
        w = pool.apply(pyarraypool.stats)
    assert (w.max_bytes, w.segment_bytes, w.transfer_timeout) == (48 << 20, 3 << 20, 2.5), w
    print("OK")
    """, PYARRAYPOOL_MAX_BYTES="48M", PYARRAYPOOL_SEGMENT_BYTES="3M",
        PYARRAYPOOL_TRANSFER_TIMEOUT="2.5")


def test_environment_max_bytes_is_enforced():
    run("""
    try:
        pyarraypool.empty(5 << 20, dtype=np.uint8)
    except pyarraypool.PoolFullError as e:
        assert "4194304" in str(e), e
    else:
        raise AssertionError("PYARRAYPOOL_MAX_BYTES=4M allowed a 5 MiB array")
    print("OK")
    """, PYARRAYPOOL_MAX_BYTES="4194304", PYARRAYPOOL_SEGMENT_BYTES="1M")


def test_configure_overrides_the_environment():
    run("""
    pyarraypool.configure(max_bytes="80M", transfer_timeout=4)
    a = pyarraypool.zeros(10)
    s = pyarraypool.stats()
    assert s.max_bytes == 80 << 20 and s.transfer_timeout == 4.0, s
    assert s.segment_bytes == 3 << 20, s   # not configured: from the environment
    print("OK")
    """, PYARRAYPOOL_MAX_BYTES="48M", PYARRAYPOOL_SEGMENT_BYTES="3M",
        PYARRAYPOOL_TRANSFER_TIMEOUT="2.5")


@pytest.mark.parametrize("var,value", [
    ("PYARRAYPOOL_MAX_BYTES", "lots"),
    ("PYARRAYPOOL_SEGMENT_BYTES", "-2M"),
    ("PYARRAYPOOL_TRANSFER_TIMEOUT", "0"),
    ("PYARRAYPOOL_TRANSFER_TIMEOUT", "soon"),
])
def test_bad_environment_values_fail_loudly(var, value):
    proc = run_python("import pyarraypool; pyarraypool.zeros(1); print('OK')",
                      env=fresh_env(**{var: value}), check=False)
    assert proc.returncode != 0 and "OK" not in proc.stdout, proc.stdout
    assert "ValueError" in proc.stderr, proc.stderr
    assert "Segmentation" not in proc.stderr and proc.returncode > 0, proc.stderr


# --- PoolFullError ------------------------------------------------------------------


def test_pool_full_error_names_the_sizes_and_the_setting():
    run("""
    pyarraypool.configure(max_bytes="8M", segment_bytes="1M")
    try:
        pyarraypool.empty(9_000_001, dtype=np.uint8)
    except pyarraypool.PoolFullError as e:
        err = e
    else:
        raise AssertionError("a 9 MB array in an 8 MiB pool")
    assert isinstance(err, MemoryError) and isinstance(err, pyarraypool.PoolError)
    msg = str(err)
    assert "9000001" in msg, msg                 # the request
    assert str(8 << 20) in msg, msg              # the limit
    assert "max_bytes" in msg, msg               # the setting to raise
    assert "PYARRAYPOOL_MAX_BYTES" in msg or "configure" in msg, msg
    # make_transferable and zeros_like fail the same way.
    for make in (lambda: pyarraypool.make_transferable(np.zeros(9 << 20, np.uint8)),
                 lambda: pyarraypool.zeros_like(np.zeros((3, 3 << 20), np.uint8))):
        try:
            make()
        except MemoryError:
            pass
        else:
            raise AssertionError("no PoolFullError")
    # A request that does not fit what is left names its own size too.
    arrs = [pyarraypool.empty(3 << 20, dtype=np.uint8) for _ in range(2)]
    try:
        pyarraypool.empty(1_500_001, dtype=np.uint8)
    except pyarraypool.PoolFullError as e:
        assert "1500001" in str(e), e
    else:
        pass  # it fitted after all: nothing to check
    del arrs
    assert settle().used_bytes == 0
    print("OK")
    """)


def test_pool_recovers_after_it_was_full():
    run("""
    pyarraypool.configure(max_bytes="8M", segment_bytes="1M")
    start = settle()
    def fill():
        arrs = []
        for _ in range(100):
            try:
                a = pyarraypool.empty(500_000, dtype=np.uint8)
            except pyarraypool.PoolFullError:
                return arrs
            a[:] = len(arrs) % 251
            arrs.append(a)
            assert pyarraypool.stats().capacity_bytes <= 8 << 20
        raise AssertionError("100 arrays of 500 kB in an 8 MiB pool")
    first = fill()
    n = len(first)
    assert n >= 12, n            # 8 MiB holds at least 12 of them
    s = pyarraypool.stats()
    assert s.capacity_bytes <= 8 << 20 and s.used_bytes <= s.capacity_bytes, s
    # The arrays that fitted are intact.
    for i, a in enumerate(first):
        assert (a == i % 251).all()
    del a
    # Free every other one: the pool serves the same requests again.
    del first[::2]
    again = [pyarraypool.empty(500_000, dtype=np.uint8) for _ in range((n + 1) // 2)]
    del first, again
    s = settle()
    assert s.used_bytes == start.used_bytes and s.live_blocks == 0, s
    second = fill()
    assert len(second) == n, (len(second), n)
    del second
    assert settle().used_bytes == start.used_bytes
    _core._verify()
    print("OK")
    """)


def test_emptied_pool_serves_a_large_request_within_max_bytes():
    """Small arrays filled the pool (in segments of segment_bytes) and were all
    freed: the pool is empty again, and a request well below max_bytes,
    which a new pool serves, must not raise PoolFullError."""
    run("""
    pyarraypool.configure(max_bytes="8M", segment_bytes="2M")
    arrs = []
    try:
        for _ in range(100):
            arrs.append(pyarraypool.empty(500_000, dtype=np.uint8))
    except pyarraypool.PoolFullError:
        pass
    assert len(arrs) >= 12, len(arrs)
    del arrs
    s = settle()
    assert s.used_bytes == 0, s
    try:
        a = pyarraypool.empty(3 << 20, dtype=np.uint8)
    except pyarraypool.PoolFullError as e:
        raise AssertionError(f"an empty pool refused 3 MiB of max_bytes=8 MiB: {e}; {s}")
    a[:] = 1
    del a
    print("OK")
    """)


# --- growth by segments -------------------------------------------------------------


def test_pool_grows_by_segments():
    run("""
    pyarraypool.configure(segment_bytes="1M", max_bytes="64M")
    assert pyarraypool.stats().segments == 0
    arrs = [pyarraypool.empty(700 * 1024, dtype=np.uint8) for _ in range(6)]
    for i, a in enumerate(arrs):
        a[:] = i
    s = pyarraypool.stats()
    assert s.segments > 1, s
    assert s.used_bytes >= 6 * 700 * 1024 and s.capacity_bytes >= s.used_bytes, s
    for i, a in enumerate(arrs):
        assert (a == i).all()
    # An array larger than segment_bytes gets a segment of its own.
    big = pyarraypool.zeros(5 << 20, dtype=np.uint8)
    s2 = pyarraypool.stats()
    assert s2.segments == s.segments + 1, (s, s2)
    assert s2.capacity_bytes - s.capacity_bytes >= 5 << 20, (s, s2)
    seg = _core._block_of(big).segment
    assert seg == s2.segments - 1
    assert all(_core._block_of(a).segment != seg for a in arrs)
    big[-1] = 9
    assert big[-1] == 9 and big[0] == 0
    # Freed, its segment serves the next large array: no growth.
    del big
    big = pyarraypool.zeros(5 << 20, dtype=np.uint8)
    assert pyarraypool.stats().segments == s2.segments
    del big, arrs, a
    assert settle().used_bytes == 0
    _core._verify()
    print("OK")
    """)


@pytest.mark.parametrize("segment", ["1M", "4M"])
def test_pool_grows_in_steps_of_segment_bytes(segment):
    """Arrays smaller than segment_bytes make the pool grow by segment_bytes
    at a time, as configure() documents."""
    seg = int(segment[:-1]) << 20
    run(f"""
    pyarraypool.configure(segment_bytes={segment!r}, max_bytes="64M")
    arrs = []
    for i in range(8):
        arrs.append(pyarraypool.empty({seg} * 7 // 10, dtype=np.uint8))
        s = pyarraypool.stats()
        assert s.capacity_bytes == s.segments * {seg}, (i, s)
    assert s.segments >= 4, s
    print("OK")
    """)


# --- a small or full /dev/shm (a private tmpfs in a mount namespace) --------------


def _private_shm_works() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        r = subprocess.run(["unshare", "-m", "sh", "-c",
                            "mount -t tmpfs -o size=1M tmpfs /dev/shm"],
                           capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


needs_private_shm = pytest.mark.skipif(
    not _private_shm_works(),
    reason="needs root and mount namespaces (unshare -m) to give the child a small /dev/shm")


def run_with_shm(size: str, code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs code with /dev/shm a private tmpfs of `size` (the host's is untouched)."""
    script = PRELUDE + textwrap.dedent(code)
    return subprocess.run(
        ["unshare", "-m", "sh", "-c",
         f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$0" -c "$1"',
         sys.executable, script],
        env=fresh_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


@needs_private_shm
def test_full_dev_shm_gives_pool_full_error_not_sigbus():
    proc = run_with_shm("16M", """
    pyarraypool.configure(max_bytes="1G", segment_bytes="2M")
    arrs = []
    err = None
    for _ in range(64):
        try:
            a = pyarraypool.empty(1 << 20, dtype=np.uint8)
        except pyarraypool.PoolFullError as e:
            err = e
            break
        a[:] = 1                     # every page is touched: no SIGBUS
        arrs.append(a)
    assert err is not None, "64 MiB of arrays in a 16 MiB /dev/shm"
    assert isinstance(err, MemoryError)
    assert len(arrs) >= 4, len(arrs)
    # A segment that does not fit fails the same way.
    try:
        pyarraypool.empty(32 << 20, dtype=np.uint8)
    except pyarraypool.PoolFullError:
        pass
    else:
        raise AssertionError("a 32 MiB array in a 16 MiB /dev/shm")
    # The pool still works.
    del arrs[::2]
    more = [pyarraypool.empty(1 << 20, dtype=np.uint8) for _ in range(2)]
    for a in more:
        a[:] = 2
    del arrs, more, a
    assert settle().used_bytes == 0
    _core._verify()
    print("OK")
    """)
    assert proc.returncode == 0 and "OK" in proc.stdout, (
        f"exit {proc.returncode} (SIGBUS is -{int(__import__('signal').SIGBUS)})\n"
        f"{proc.stdout}\n{proc.stderr}")


@needs_private_shm
def test_default_settings_work_with_a_64_mib_dev_shm():
    """Docker gives containers a 64 MiB /dev/shm: with the default settings
    (max_bytes = the size of /dev/shm) a small array must fit."""
    proc = run_with_shm("64M", """
    s = pyarraypool.stats()
    assert s.max_bytes <= 64 << 20, s
    a = pyarraypool.zeros(1000)
    b = pyarraypool.make_transferable(np.ones(2 << 20, np.uint8))   # 2 MiB
    assert a.sum() == 0 and b.sum() == 2 << 20
    print("OK")
    """)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
