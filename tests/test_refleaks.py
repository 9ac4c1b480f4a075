"""Reference and memory leaks of the binding, cycle by cycle.

Each scenario repeats one operation (make_transferable, pickle.dumps/loads,
release, empty/zeros, views, failed loads of stale and malformed handles, the
TypeError for object dtypes) and checks, after a warm-up:

- refcounts: ``sys.getrefcount`` of its inputs (the source array, its dtype,
  the handle bytes, the pickle) is where it was after REF_CYCLES cycles, up to
  REF_SLACK (lazily filled caches); a reference leaked once per cycle moves it
  by REF_CYCLES.
- memory: the process's private resident memory, ``resident - shared`` from
  /proc/self/statm (RssAnon: the malloc and pymalloc heaps; not the pool's
  /dev/shm pages nor file-backed code pages, whose first touches are not
  leaks), grows by less than RSS_TOLERANCE over RSS_CYCLES cycles. That is
  RSS_TOLERANCE / RSS_CYCLES ~ 6.6 bytes a cycle, below the smallest leak
  possible (a malloc chunk is 32 bytes, a Python object at least 16), so one
  leaked object per cycle fails the test, while the allocators' noise (a
  fresh pymalloc pool or arena page now and then) stays far below it.
- the pool: used bytes, live blocks and pending pickles are where they were.

Under AddressSanitizer or ThreadSanitizer (``make asan``/``make tsan`` preload
their runtime) the memory check is skipped: their allocators quarantine freed
memory and keep shadow memory, so RSS grows without a leak. The refcount and
pool checks still run there.
"""

from __future__ import annotations

import gc
import os
import pickle
import sys
from collections.abc import Callable

import numpy as np
import pytest

import pyarraypool
from pyarraypool import InvalidHandleError, StaleHandleError, _core

WARMUP_CYCLES = 2_000
REF_CYCLES = 2_000
REF_SLACK = 2
RSS_CYCLES = 30_000
RSS_TOLERANCE = 192 * 1024  # bytes of private RSS growth allowed over RSS_CYCLES

PAGE = os.sysconf("SC_PAGE_SIZE")


def _sanitizer_runtime() -> str | None:
    """The name of an ASan/TSan runtime mapped into this process, if any."""
    with open("/proc/self/maps") as f:
        maps = f.read()
    for name in ("libasan", "libtsan"):
        if name in maps:
            return name
    return None


SANITIZER = _sanitizer_runtime()


def private_rss() -> int:
    """Resident minus shared pages (RssAnon), in bytes, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * PAGE


def pool_state() -> tuple[int, int, int]:
    s = pyarraypool.stats()
    return s.used_bytes, s.live_blocks, s.pending_transfers


def assert_no_leak(cycle: Callable[[], None], inputs: dict[str, object]) -> None:
    """Runs `cycle` many times; fails if it leaks references to `inputs`,
    process memory, or pool memory."""
    for _ in range(WARMUP_CYCLES):
        cycle()
    gc.collect()
    pool_before = pool_state()
    refs_before = {k: sys.getrefcount(v) for k, v in inputs.items()}
    for _ in range(REF_CYCLES):
        cycle()
    gc.collect()
    refs_after = {k: sys.getrefcount(v) for k, v in inputs.items()}
    moved = {k: (refs_before[k], refs_after[k]) for k in inputs
             if abs(refs_after[k] - refs_before[k]) > REF_SLACK}
    assert not moved, f"refcounts moved over {REF_CYCLES} cycles (before, after): {moved}"

    if SANITIZER is None:
        rss_before = private_rss()
        for _ in range(RSS_CYCLES):
            cycle()
        gc.collect()
        growth = private_rss() - rss_before
        assert growth < RSS_TOLERANCE, (
            f"private RSS grew by {growth} bytes over {RSS_CYCLES} cycles "
            f"({growth / RSS_CYCLES:.1f} bytes a cycle; tolerance {RSS_TOLERANCE} bytes)"
        )
    pyarraypool.collect()
    assert pool_state() == pool_before, "the cycles leaked pool memory"


def handle_of(arr) -> tuple[bytes, np.dtype]:
    """The handle bytes and dtype a pickle of `arr` carries (transfer_required=False:
    asking adds no pending pickle)."""
    fn, (handle, dtype) = arr.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    assert fn is _core._rebuild and isinstance(handle, bytes)
    return handle, dtype


STRUCT = np.dtype([("a", "<f8"), ("b", "<i4"), ("c", "S3")])  # not a builtin singleton


@pytest.mark.parametrize("transfer_required", [True, False])
def test_make_transferable_and_release(transfer_required):
    src = np.arange(64.0).reshape(8, 8)
    fsrc = np.asfortranarray(src)
    ssrc = np.zeros(5, dtype=STRUCT)

    def cycle():
        x = pyarraypool.make_transferable(src, transfer_required=transfer_required)
        y = pyarraypool.make_transferable(fsrc[::2], transfer_required=transfer_required)
        z = pyarraypool.make_transferable(ssrc, transfer_required=transfer_required)
        assert pyarraypool.make_transferable(x) is x  # already in the pool
        del x, y, z

    assert_no_leak(cycle, {"src": src, "fsrc": fsrc, "ssrc": ssrc,
                           "dtype": src.dtype, "struct dtype": ssrc.dtype})


@pytest.mark.parametrize("transfer_required", [True, False])
def test_pickle_round_trip(transfer_required):
    src = np.arange(64.0).reshape(8, 8)
    ssrc = np.zeros(5, dtype=STRUCT)

    def cycle():
        x = pyarraypool.make_transferable(src, transfer_required=transfer_required)
        z = pyarraypool.make_transferable(ssrc, transfer_required=transfer_required)
        y = pickle.loads(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL))
        w = pickle.loads(pickle.dumps(z, protocol=2))
        assert y.shape == (8, 8) and w.dtype == STRUCT
        del x, y, z, w

    assert_no_leak(cycle, {"src": src, "ssrc": ssrc, "dtype": src.dtype,
                           "struct dtype": ssrc.dtype})


def test_loading_the_same_handle_again_and_again():
    x = pyarraypool.make_transferable(np.arange(64.0).reshape(8, 8), transfer_required=False)
    h, dt = handle_of(x)
    blob = pickle.dumps(x)
    sx = pyarraypool.make_transferable(np.zeros(4, dtype=STRUCT), transfer_required=False)
    sh, sdt = handle_of(sx)

    def cycle():
        y = pickle.loads(blob)
        z = _core._rebuild(h, dt)
        w = _core._rebuild(sh, sdt)
        v = x.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
        del y, z, w, v

    assert_no_leak(cycle, {"array": x, "handle": h, "dtype": dt, "pickle": blob,
                           "struct array": sx, "struct handle": sh, "struct dtype": sdt})


def test_empty_and_zeros():
    proto = np.ones((3, 5), order="F")

    def cycle():
        a = pyarraypool.empty((8, 8))
        b = pyarraypool.zeros(100, dtype=STRUCT)
        c = pyarraypool.empty_like(proto)
        d = pyarraypool.zeros_like(proto, dtype=np.int32)
        e = pyarraypool.empty(0)
        f = pyarraypool.zeros((0, 3), transfer_required=False)
        del a, b, c, d, e, f

    assert_no_leak(cycle, {"prototype": proto, "struct dtype": STRUCT,
                           "f8": np.dtype(np.float64), "i4": np.dtype(np.int32)})


def test_views():
    x = pyarraypool.make_transferable(np.arange(120.0).reshape(4, 5, 6))

    def cycle():
        v = x[1:3, ::2]
        t = x.T
        e = x[..., 0]
        m = memoryview(x)
        a = np.asarray(x)
        r = pickle.loads(pickle.dumps(v))
        s = pickle.loads(pickle.dumps(t[::-1]))
        p = x * 2  # not in the pool: a plain ndarray
        del v, t, e, m, a, r, s, p

    assert_no_leak(cycle, {"array": x, "dtype": x.dtype})


def test_loading_a_stale_handle():
    x = pyarraypool.make_transferable(np.arange(100.0), transfer_required=False)
    h, dt = handle_of(x)
    blob = pickle.dumps(x)
    del x  # the block is gone: every load below is stale

    def cycle():
        try:
            pickle.loads(blob)
        except StaleHandleError:
            pass
        else:
            raise AssertionError("no StaleHandleError")
        try:
            _core._rebuild(h, dt)
        except StaleHandleError:
            pass
        else:
            raise AssertionError("no StaleHandleError")

    assert_no_leak(cycle, {"handle": h, "dtype": dt, "pickle": blob})


def test_object_dtypes_raise_type_error():
    obj = np.array([None, 1, "a"], dtype=object)
    sobj = np.zeros(3, dtype=[("a", "<f8"), ("b", "O")])

    def cycle():
        for arr in (obj, sobj):
            try:
                pyarraypool.make_transferable(arr)
            except TypeError:
                pass
            else:
                raise AssertionError("no TypeError")
        try:
            pyarraypool.empty(3, dtype=object)
        except TypeError:
            pass
        else:
            raise AssertionError("no TypeError")

    assert_no_leak(cycle, {"object array": obj, "object dtype": obj.dtype,
                           "struct array": sobj, "struct dtype": sobj.dtype})


def test_malformed_handles_raise_invalid_handle_error():
    x = pyarraypool.make_transferable(np.arange(64.0).reshape(8, 8), transfer_required=False)
    h, dt = handle_of(x)
    bad = [h[:-1], h + b"\0", b"PAPX" + h[4:], h[:40], b""]
    wrong_dtype = np.dtype("<f4")  # the handle says itemsize 8
    as_bytearray = bytearray(h)

    def cycle():
        for b in bad:
            try:
                _core._rebuild(b, dt)
            except InvalidHandleError:
                pass
            else:
                raise AssertionError("no InvalidHandleError")
        try:
            _core._rebuild(h, wrong_dtype)
        except InvalidHandleError:
            pass
        else:
            raise AssertionError("no InvalidHandleError")
        try:
            _core._rebuild(as_bytearray, dt)
        except (InvalidHandleError, TypeError):
            pass
        else:
            raise AssertionError("no error")

    inputs = {f"bad handle {i}": b for i, b in enumerate(bad) if len(b) > 1}
    inputs.update({"array": x, "handle": h, "dtype": dt, "wrong dtype": wrong_dtype,
                   "bytearray": as_bytearray})
    assert_no_leak(cycle, inputs)
