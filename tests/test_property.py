"""Property tests: random dtypes, shapes, orders and slicings travel exactly.

Contract points 1, 2, 3 and 6 under hypothesis: an array made by
make_transferable, or any basic-indexing view of it (steps, negative steps,
new axes, integer indices, transposes), pickles to another process as a view
on the same memory, with the same dtype, shape, strides and bytes; a write
made there is seen here. After each example the pool is back where it was.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import time

import numpy as np
import pytest
from helpers import stress
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import pyarraypool
from pyarraypool import _core

SETTINGS = settings(
    max_examples=stress(60, 20),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)

# Every dtype of point 6, both byte orders where they exist, longdouble
# (float128 on x86-64) included, and structured dtypes nested with subarrays.
SCALAR_DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?", sizes=(16, 32, 64, 8 * np.dtype(np.longdouble).itemsize)),
    hnp.complex_number_dtypes(endianness="?"),
    hnp.datetime64_dtypes(endianness="?"),
    hnp.timedelta64_dtypes(endianness="?"),
    hnp.byte_string_dtypes(endianness="?", min_len=1, max_len=8),
    hnp.unicode_string_dtypes(endianness="?", min_len=1, max_len=4),
)
DTYPES = st.one_of(SCALAR_DTYPES, hnp.nested_dtypes(SCALAR_DTYPES, max_leaves=5, max_itemsize=64))
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


@st.composite
def source_arrays(draw):
    dtype = draw(DTYPES)
    shape = draw(SHAPES)
    arr = draw(hnp.arrays(dtype, shape))
    order = draw(st.sampled_from("CF"))
    if order == "F":
        arr = np.asfortranarray(arr)
    return arr


@st.composite
def views(draw, shape):
    """A basic index for `shape` (slices with any step, integers, new axes)
    and an optional transposition of the result."""
    index = []
    for n in shape:
        if n > 0 and draw(st.booleans()) and draw(st.booleans()):
            index.append(draw(st.integers(-n, n - 1)))
        else:
            index.append(draw(st.slices(n)))
        if draw(st.integers(0, 9)) == 0:
            index.append(None)
    index.append(Ellipsis)  # keeps 0-d results arrays, not scalars
    ndim = sum(1 for i in index if i is None or isinstance(i, slice))
    perm = draw(st.none() | st.permutations(range(ndim)))
    return tuple(index), perm


def apply_view(x, view):
    index, perm = view
    v = x[index]
    if perm is not None:
        v = v.transpose(perm)
    return v


def first_leaf(dtype: np.dtype, offset: int = 0):
    """(byte offset, scalar dtype) of the first scalar inside an item."""
    if dtype.subdtype is not None:
        return first_leaf(dtype.subdtype[0], offset)
    if dtype.names:
        sub, off = min((dtype.fields[n][:2] for n in dtype.names), key=lambda f: f[1])
        return first_leaf(sub, offset + off)
    return offset, dtype


def marker_for(item_bytes: bytes, dtype: np.dtype) -> np.ndarray:
    """A 0-d plain array of `dtype` that differs from `item_bytes` in one bit:
    the lowest bit of the first scalar of the item (valid for every kind)."""
    offset, leaf = first_leaf(dtype)
    unit = {"U": 4, "c": leaf.itemsize // 2}.get(leaf.kind, leaf.itemsize)
    low = offset + (unit - 1 if leaf.byteorder == ">" else 0)
    raw = bytearray(item_bytes)
    raw[low] ^= 1
    return np.frombuffer(bytes(raw), dtype=dtype).reshape(())


def first_item(arr):
    return arr[(slice(0, 1),) * arr.ndim + (Ellipsis,)]


def echo_and_mark(arr, marker):
    """Runs in a worker: describes what it received, then writes a marker into
    its first element."""
    out = (type(arr).__name__, arr.tobytes(), arr.dtype, arr.dtype.str, arr.dtype.descr,
           arr.shape, arr.strides, os.getpid())
    if arr.size:
        first_item(arr)[...] = marker
    return out


def contiguous_bytes(arr):
    """A uint8 view of all the bytes of a C- or F-contiguous array."""
    order = "C" if arr.flags.c_contiguous else "F"
    flat = arr.reshape(-1, order=order)
    assert flat.size == 0 or np.shares_memory(flat, arr)
    return flat.view(np.uint8)


def fill_and_describe(arr):
    out = (type(arr).__name__, arr.tobytes(), arr.dtype, arr.shape, arr.strides,
           arr.flags.c_contiguous, arr.flags.f_contiguous, arr.ctypes.data % 64)
    contiguous_bytes(arr)[...] = 0x5A
    return out


@pytest.fixture(scope="module")
def workers():
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(2)
    yield pool
    pool.close()
    pool.join()
    gc.collect()
    pyarraypool.collect()


def start_stats() -> pyarraypool.PoolStats:
    # A previous example's arrays may still be referenced by the traceback
    # of an exception hypothesis caught (a rejected or failing example).
    gc.collect()
    return pyarraypool.stats()


def wait_until_used(expected: int, timeout: float = 10.0) -> int:
    """A worker drops the arguments of a task just after it has sent the
    result, so its hold may end a moment after we got the answer."""
    deadline = time.monotonic() + timeout
    while True:
        used = pyarraypool.stats().used_bytes
        if used == expected or time.monotonic() > deadline:
            return used
        time.sleep(0.002)


@SETTINGS
@given(data=st.data())
def test_any_view_round_trips_to_another_process(workers, data):
    start = start_stats().used_bytes
    src = data.draw(source_arrays(), label="source")
    try:
        x = pyarraypool.make_transferable(src)
        assert isinstance(x, pyarraypool.TransferableArray)
        assert x.dtype == src.dtype and x.shape == src.shape
        assert x.tobytes() == src.tobytes()
        view = data.draw(views(x.shape), label="view")
        v = apply_view(x, view)
        assert isinstance(v, pyarraypool.TransferableArray)
        expected = np.array(v, copy=True)  # plain copy of what v shows now
        marker = marker_for(first_item(expected).tobytes(), v.dtype) if v.size else None
        if v.size:
            first_item(expected)[...] = marker

        answer = workers.apply(echo_and_mark, (v, marker))
        tname, raw, dtype, dstr, descr, shape, strides, pid = answer

        assert pid != os.getpid()
        assert tname == "TransferableArray"
        assert dtype == v.dtype and dstr == v.dtype.str and descr == v.dtype.descr
        assert shape == v.shape and strides == v.strides
        assert raw == apply_view(src, view).tobytes()
        # The worker's write landed in our memory, in the element it wrote, and
        # nowhere else.
        assert v.tobytes() == expected.tobytes()
        outside = np.ones(x.shape, dtype=bool)
        apply_view(outside, view)[...] = False
        assert x[outside].tobytes() == src[outside].tobytes()
        del x, v
        assert wait_until_used(start) == start
    finally:
        # A failing example must not leave pool arrays in its traceback: drop
        # them, and refresh the snapshot of this frame's locals that was taken
        # while the failure was reported (it would keep them alive).
        x = v = None  # noqa: F841
        locals()


@SETTINGS
@given(data=st.data())
def test_any_view_round_trips_through_pickle_in_process(data):
    start = start_stats()
    src = data.draw(source_arrays(), label="source")
    try:
        x = pyarraypool.make_transferable(src, transfer_required=data.draw(st.booleans()))
        view = data.draw(views(x.shape), label="view")
        v = apply_view(x, view)
        protocol = data.draw(st.integers(2, pickle.HIGHEST_PROTOCOL), label="protocol")
        s = pickle.dumps(v, protocol=protocol)
        assert len(s) < 2048  # a handle: the dtype and 16 bytes per dimension
        y = pickle.loads(s)
        assert isinstance(y, pyarraypool.TransferableArray)
        assert y.dtype == v.dtype and y.dtype.descr == v.dtype.descr
        assert y.shape == v.shape and y.strides == v.strides
        assert y.tobytes() == v.tobytes()
        if v.size:
            assert y.ctypes.data == v.ctypes.data
            assert np.shares_memory(y, x)
        # Loaded: no longer pending.
        assert pyarraypool.stats().pending_transfers == start.pending_transfers
        del x, v, y
        assert pyarraypool.stats().used_bytes == start.used_bytes
    finally:
        # A failing example must not leave pool arrays in its traceback: drop
        # them, and refresh the snapshot of this frame's locals that was taken
        # while the failure was reported (it would keep them alive).
        x = v = y = None  # noqa: F841
        locals()


@SETTINGS
@given(dtype=DTYPES, shape=SHAPES, order=st.sampled_from("CF"),
       func=st.sampled_from(["zeros", "empty", "zeros_like", "empty_like"]))
def test_allocations_reach_another_process(workers, dtype, shape, order, func):
    start = start_stats().used_bytes
    if func in ("zeros", "empty"):
        a = getattr(pyarraypool, func)(shape, dtype=dtype, order=order)
    else:
        proto = np.empty(shape, dtype=dtype, order=order)
        a = getattr(pyarraypool, func)(proto)
    assert isinstance(a, pyarraypool.TransferableArray) and _core._block_of(a) is not None
    assert a.dtype == dtype and a.shape == shape
    assert a.flags.f_contiguous if order == "F" else a.flags.c_contiguous
    if func.startswith("zeros"):
        assert not contiguous_bytes(a).any()
    if a.size:
        assert a.ctypes.data % 64 == 0
    before = a.tobytes()
    tname, raw, dt, shp, strides, c, f, align = workers.apply(fill_and_describe, (a,))
    assert tname == "TransferableArray"
    assert raw == before and dt == a.dtype and shp == a.shape and strides == a.strides
    assert (c, f) == (a.flags.c_contiguous, a.flags.f_contiguous)
    assert align == a.ctypes.data % 64
    assert a.tobytes() == b"\x5a" * a.nbytes
    del a
    assert wait_until_used(start) == start
