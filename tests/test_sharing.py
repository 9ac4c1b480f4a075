"""Sharing: what a TransferableArray is, how it pickles, and which dtypes travel.

Contract points 1-6 (see /work/shared/guide/contract.md).
"""

from __future__ import annotations

import copy
import gc
import multiprocessing
import pickle

import numpy as np
import pytest
from numpy.lib.recfunctions import repack_fields

import pyarraypool
from pyarraypool import _core

MiB = 1 << 20


def block_of(arr):
    return _core._block_of(arr)


def settle() -> pyarraypool.PoolStats:
    gc.collect()
    pyarraypool.collect()
    return pyarraypool.stats()


def roundtrip(arr, protocol=pickle.HIGHEST_PROTOCOL):
    return pickle.loads(pickle.dumps(arr, protocol=protocol))


# --- point 1: the type, the size of a pickle, alignment ---------------------


def test_make_transferable_returns_ndarray_subclass_with_the_same_values():
    src = np.arange(24, dtype=np.int64).reshape(4, 6)
    x = pyarraypool.make_transferable(src)
    assert isinstance(x, pyarraypool.TransferableArray)
    assert isinstance(x, np.ndarray)
    assert issubclass(pyarraypool.TransferableArray, np.ndarray)
    assert x.dtype == src.dtype and x.shape == src.shape
    np.testing.assert_array_equal(x, src)
    assert block_of(x) is not None
    # A copy: the source is not aliased.
    assert not np.shares_memory(x, src)
    src[0, 0] = 99
    assert x[0, 0] == 0


def test_transferable_array_cannot_be_constructed_directly():
    with pytest.raises(TypeError):
        pyarraypool.TransferableArray((3,))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_is_a_small_handle_whatever_the_size(protocol):
    small = pyarraypool.make_transferable(np.ones(1024 // 8))  # 1 KiB
    big = pyarraypool.make_transferable(np.ones(16 * MiB // 8))  # 16 MiB
    assert big.nbytes == 16 * MiB
    s_small = pickle.dumps(small, protocol=protocol)
    s_big = pickle.dumps(big, protocol=protocol)
    try:
        assert len(s_big) < 1024, f"a 16 MiB array pickled to {len(s_big)} bytes"
        assert len(s_small) < 1024
        if protocol >= 3:
            # Protocols < 3 escape bytes objects, so the length depends on the
            # bytes of the handle; from 3 on the handle is fixed-width.
            assert len(s_big) == len(s_small)
    finally:
        # Load both so that no pickle stays pending.
        a, b = pickle.loads(s_small), pickle.loads(s_big)
    assert b.shape == big.shape and a.shape == small.shape
    assert b.ctypes.data == big.ctypes.data
    assert b[-1] == 1.0 and a[0] == 1.0


def test_pickle_with_out_of_band_buffers_still_sends_a_handle():
    big = pyarraypool.make_transferable(np.ones(16 * MiB // 8))
    buffers = []
    s = pickle.dumps(big, protocol=5, buffer_callback=buffers.append)
    y = pickle.loads(s, buffers=buffers)
    assert len(s) < 1024
    assert sum(memoryview(b).nbytes for b in buffers) < 1024
    assert y.ctypes.data == big.ctypes.data


@pytest.mark.parametrize("nbytes", [1, 3, 7, 63, 64, 65, 100, 1000, 4095, 4097, 65537])
def test_every_block_is_64_byte_aligned(nbytes):
    arrays = []
    # Several in a row, so that blocks follow each other in the pool.
    for i in range(4):
        a = pyarraypool.empty(nbytes + i, dtype=np.uint8)
        b = pyarraypool.make_transferable(np.zeros(nbytes + i, dtype=np.uint8))
        c = pyarraypool.zeros((nbytes + i + 15) // 16, dtype=np.complex128)
        arrays += [a, b, c]
    for a in arrays:
        assert a.ctypes.data % 64 == 0, hex(a.ctypes.data)
        assert a.flags.aligned
        assert block_of(a).address % 64 == 0


def test_unaligned_input_gives_an_aligned_pool_array():
    raw = np.zeros(8 * 100 + 1, dtype=np.uint8)
    unaligned = raw[1:].view(np.float64)
    assert not unaligned.flags.aligned
    unaligned[:] = np.arange(100)
    x = pyarraypool.make_transferable(unaligned)
    assert x.flags.aligned and x.ctypes.data % 64 == 0
    np.testing.assert_array_equal(x, np.arange(100.0))
    y = roundtrip(x)
    assert y.flags.aligned and y.ctypes.data % 64 == 0


# --- point 3: views travel as views; results not in the pool are plain -----

VIEWS = {
    "x[3:7, ::2]": lambda x: x[3:7, ::2],
    "x.T": lambda x: x.T,
    "x[..., 0]": lambda x: x[..., 0],
    "x[::-1, 2:, ::-3]": lambda x: x[::-1, 2:, ::-3],
    "x[5]": lambda x: x[5],
    "x[3:7, ::2][1:, ::-1]": lambda x: x[3:7, ::2][1:, ::-1],
    "x[2, 3, 1:2]": lambda x: x[2, 3, 1:2],
    "x[None, 1:3]": lambda x: x[None, 1:3],
    "x.transpose(1, 0, 2)[::2]": lambda x: x.transpose(1, 0, 2)[::2],
    "x[4:4]": lambda x: x[4:4],
    # Views made by methods and numpy functions (numpy builds some as a plain
    # view and hands it to __array_wrap__).
    "x[:, :1].squeeze()": lambda x: x[:, :1].squeeze(),
    "np.squeeze(x[:1])": lambda x: np.squeeze(x[:1]),
    "x[2:3, 4:5, 1:2].squeeze()": lambda x: x[2:3, 4:5, 1:2].squeeze(),
    "x.swapaxes(0, 2)": lambda x: x.swapaxes(0, 2),
    "np.moveaxis(x, 0, -1)": lambda x: np.moveaxis(x, 0, -1),
    "np.expand_dims(x, 1)": lambda x: np.expand_dims(x, 1),
    "x.reshape(80, 3)": lambda x: x.reshape(80, 3),
    "x.ravel()": lambda x: x.ravel(),
    "x.view(np.int64)": lambda x: x.view(np.int64),
    "x[1].T.squeeze()": lambda x: x[1].T.squeeze(),
}


@pytest.mark.parametrize("name", list(VIEWS))
def test_views_pickle_as_views_on_the_same_memory(name):
    x = pyarraypool.make_transferable(np.arange(10 * 8 * 3, dtype=np.float64).reshape(10, 8, 3))
    before = settle()
    v = VIEWS[name](x)
    assert isinstance(v, pyarraypool.TransferableArray)
    assert block_of(v) is block_of(x)
    s = pickle.dumps(v)
    assert len(s) < 1024
    y = pickle.loads(s)
    assert isinstance(y, pyarraypool.TransferableArray)
    assert y.shape == v.shape and y.strides == v.strides and y.dtype == v.dtype
    assert y.ctypes.data == v.ctypes.data
    np.testing.assert_array_equal(y, v)
    # No new block: the view was not copied anywhere.
    after = pyarraypool.stats()
    assert after.used_bytes == before.used_bytes
    assert after.live_blocks == before.live_blocks
    # Writes through the loaded view land in x, exactly where v points.
    expected = np.array(x)
    VIEWS[name](expected)[...] = -1.0
    y[...] = -1.0
    np.testing.assert_array_equal(np.asarray(x), expected)


def test_a_view_of_a_big_array_pickles_small():
    x = pyarraypool.make_transferable(np.zeros((2048, 1024)))  # 16 MiB
    v = x[100:1900:3, ::-5]
    s = pickle.dumps(v)
    y = pickle.loads(s)
    assert len(s) < 1024
    assert y.ctypes.data == v.ctypes.data and y.strides == v.strides


@pytest.mark.parametrize("name", ["e[:, 1]", "e.T[2]", "e[:, 2:0:-1]", "e[:, ::-1]", "e[:0]"])
def test_views_of_an_empty_array_travel_as_views(name):
    # An empty view touches no byte, wherever numpy left its data pointer;
    # it is still a view of the pool array and must load as one.
    e = pyarraypool.make_transferable(np.zeros((0, 3)))
    try:
        v = eval(name, {"e": e})
        assert isinstance(v, pyarraypool.TransferableArray) and block_of(v) is block_of(e)
        y = roundtrip(v)
        assert isinstance(y, pyarraypool.TransferableArray), type(y)
        assert block_of(y) is block_of(e)
        assert y.shape == v.shape and y.strides == v.strides and y.dtype == v.dtype
    finally:
        e = v = y = None  # keep a failure from holding the block


def _fresh():
    return pyarraypool.make_transferable(np.arange(6 * 5, dtype=np.float64).reshape(6, 5))


PLAIN_RESULTS = {
    "x * 2": lambda x: x * 2,
    "x + x": lambda x: x + x,
    "np.sqrt(x)": np.sqrt,
    "x.copy()": lambda x: x.copy(),
    "x.sum(axis=0)": lambda x: x.sum(axis=0),
    "x.max(axis=1)": lambda x: x.max(axis=1),
    "np.concatenate": lambda x: np.concatenate([x, x]),
    "np.stack": lambda x: np.stack([x, x]),
    "fancy x[[0, 2]]": lambda x: x[[0, 2]],
    "fancy x[:, [4, 1]]": lambda x: x[:, [4, 1]],
    "boolean x[x > 3]": lambda x: x[x > 3],
    "copy.copy": copy.copy,
    "copy.deepcopy": copy.deepcopy,
    "x.astype(float32)": lambda x: x.astype(np.float32),
    "x.flatten()": lambda x: x.flatten(),
    "x.T.ravel()": lambda x: x.T.ravel(),
    "np.array(x)": np.array,
    "x @ x.T": lambda x: x @ x.T,
}


@pytest.mark.parametrize("name", list(PLAIN_RESULTS))
def test_results_not_in_the_pool_are_plain_independent_ndarrays(name):
    x = _fresh()
    expected = PLAIN_RESULTS[name](np.array(x))  # the same computation on plain numpy
    r = PLAIN_RESULTS[name](x)
    assert type(r) is np.ndarray, type(r)
    assert block_of(r) is None
    assert not np.shares_memory(r, x)
    np.testing.assert_array_equal(r, expected)
    # Independent of the block: writing x does not change r ...
    x[...] = -7.0
    np.testing.assert_array_equal(r, expected)
    # ... and r does not keep the block alive.
    live = pyarraypool.stats().live_blocks
    del x
    assert pyarraypool.stats().live_blocks == live - 1
    np.testing.assert_array_equal(r, expected)
    # It pickles by value, as a plain ndarray, and leaves nothing pending.
    pending = pyarraypool.stats().pending_transfers
    r2 = roundtrip(r)
    assert type(r2) is np.ndarray
    np.testing.assert_array_equal(r2, expected)
    assert pyarraypool.stats().pending_transfers == pending


# --- point 4: allocation directly in the pool --------------------------------


@pytest.mark.parametrize("func", [pyarraypool.empty, pyarraypool.zeros])
def test_empty_and_zeros_allocate_in_the_pool(func):
    before = settle()
    a = func((7, 9), dtype=np.int32)
    assert isinstance(a, pyarraypool.TransferableArray)
    assert block_of(a) is not None
    assert a.shape == (7, 9) and a.dtype == np.int32
    assert a.flags.c_contiguous and a.flags.writeable
    after = pyarraypool.stats()
    assert after.live_blocks == before.live_blocks + 1
    assert after.used_bytes >= before.used_bytes + a.nbytes
    # Written in place, seen by whoever loads it.
    a[...] = np.arange(63).reshape(7, 9)
    y = roundtrip(a)
    assert y.ctypes.data == a.ctypes.data
    np.testing.assert_array_equal(y, np.arange(63).reshape(7, 9))


@pytest.mark.parametrize("func", [pyarraypool.empty, pyarraypool.zeros])
def test_defaults_match_numpy(func):
    a = func(5)
    assert a.shape == (5,) and a.dtype == np.float64
    b = func((2, 3))
    assert b.shape == (2, 3)
    c = func(())
    assert c.shape == () and block_of(c) is not None


@pytest.mark.parametrize("func", [pyarraypool.empty, pyarraypool.zeros])
def test_order_f_gives_fortran_contiguous(func):
    a = func((4, 6, 3), dtype=np.float32, order="F")
    assert a.flags.f_contiguous and not a.flags.c_contiguous
    assert a.strides == (4, 16, 96)
    assert block_of(a) is not None
    y = roundtrip(a)
    assert y.flags.f_contiguous and y.strides == a.strides


def test_zeros_are_zero_even_on_reused_dirty_memory():
    shapes = [(1000,), (37, 11), (4096,), (3,)]
    dirty_addresses = set()
    for _ in range(3):
        dirty = [pyarraypool.empty(s, dtype=np.uint8) for s in shapes]
        for d in dirty:
            d[...] = 0xAB
            dirty_addresses.add(d.ctypes.data)
        del d, dirty
        zs = [pyarraypool.zeros(s, dtype=np.uint8) for s in shapes]
        zs += [pyarraypool.zeros_like(np.ones(s, dtype=np.uint8)) for s in shapes]
        reused = [z for z in zs if z.ctypes.data in dirty_addresses]
        for z in zs:
            assert not z.any(), "zeros() returned non-zero bytes"
        del zs, z
    # The test means something only if the pool did hand back dirty memory.
    assert reused, "precondition: the pool never reused a freed block"


@pytest.mark.parametrize("func", [pyarraypool.empty_like, pyarraypool.zeros_like])
def test_like_functions_allocate_in_the_pool(func):
    proto = np.arange(12, dtype=np.int16).reshape(3, 4)
    a = func(proto)
    assert isinstance(a, pyarraypool.TransferableArray) and block_of(a) is not None
    assert a.shape == (3, 4) and a.dtype == np.int16 and a.flags.c_contiguous
    b = func(proto, dtype=np.complex64)
    assert b.dtype == np.complex64 and b.shape == (3, 4)
    c = func(proto, shape=(5,))
    assert c.shape == (5,) and c.dtype == np.int16
    d = func([[1.0, 2.0], [3.0, 4.0]])
    assert d.shape == (2, 2) and d.dtype == np.float64
    pooled = pyarraypool.make_transferable(proto)
    e = func(pooled)
    assert block_of(e) is not None and block_of(e) is not block_of(pooled)
    assert not np.shares_memory(e, pooled)
    for arr in (a, b, c, d, e):
        assert block_of(arr) is not None
    if func is pyarraypool.zeros_like:
        for arr in (a, b, c, d, e):
            assert not arr.any()


@pytest.mark.parametrize("func", [pyarraypool.empty_like, pyarraypool.zeros_like])
def test_like_functions_keep_fortran_order(func):
    proto = np.asfortranarray(np.arange(24.0).reshape(2, 3, 4))
    assert proto.flags.f_contiguous and not proto.flags.c_contiguous
    a = func(proto)
    assert a.flags.f_contiguous and not a.flags.c_contiguous
    assert a.strides == proto.strides
    b = func(proto, order="C")
    assert b.flags.c_contiguous and not b.flags.f_contiguous
    c = func(np.arange(24.0).reshape(2, 3, 4), order="F")
    assert c.flags.f_contiguous and not c.flags.c_contiguous
    pooled_f = pyarraypool.make_transferable(proto)
    assert pooled_f.flags.f_contiguous
    d = func(pooled_f)
    assert d.flags.f_contiguous and not d.flags.c_contiguous


@pytest.mark.parametrize("func", [pyarraypool.empty, pyarraypool.zeros,
                                  pyarraypool.empty_like, pyarraypool.zeros_like])
def test_allocation_with_transfer_required_false_is_in_the_pool(func):
    arg = (3, 4) if func in (pyarraypool.empty, pyarraypool.zeros) else np.ones((3, 4))
    a = func(arg, transfer_required=False)
    assert block_of(a) is not None
    assert block_of(a).transfer_required is False
    a[...] = 5
    y = roundtrip(a)  # a is still alive: loading works
    assert y.ctypes.data == a.ctypes.data
    np.testing.assert_array_equal(y, 5)


# --- point 5: make_transferable of pool memory does not copy -----------------


def test_make_transferable_of_a_pool_array_is_the_same_object():
    x = pyarraypool.make_transferable(np.arange(100.0))
    before = settle()
    assert pyarraypool.make_transferable(x) is x
    assert pyarraypool.make_transferable(x, transfer_required=True) is x
    # The block's setting cannot change, and no copy is made behind the
    # caller's back (test_rough_edges.py has the details).
    with pytest.raises(ValueError, match="x.copy"):
        pyarraypool.make_transferable(x, transfer_required=False)
    e = pyarraypool.empty(10)
    assert pyarraypool.make_transferable(e) is e
    v = x[10:50:3]
    assert pyarraypool.make_transferable(v) is v
    y = roundtrip(x)
    assert pyarraypool.make_transferable(y) is y
    after = pyarraypool.stats()
    assert after.live_blocks == before.live_blocks + 1  # only `e`
    del e
    assert pyarraypool.stats().used_bytes == before.used_bytes


def test_make_transferable_of_asarray_of_pool_memory_is_a_view_not_a_copy():
    x = pyarraypool.make_transferable(np.arange(40.0).reshape(5, 8))
    before = settle()
    plain = np.asarray(x)
    assert type(plain) is np.ndarray
    assert block_of(plain) is block_of(x)
    t = pyarraypool.make_transferable(plain)
    assert isinstance(t, pyarraypool.TransferableArray)
    assert t.ctypes.data == x.ctypes.data and t.shape == x.shape and t.strides == x.strides
    assert block_of(t) is block_of(x)
    after = pyarraypool.stats()
    assert (after.used_bytes, after.live_blocks) == (before.used_bytes, before.live_blocks)
    t[2, 3] = -1.0
    assert x[2, 3] == -1.0
    # The same for a plain view of a slice.
    pv = np.asarray(x)[1:4, ::-2]
    tv = pyarraypool.make_transferable(pv)
    assert tv.ctypes.data == pv.ctypes.data and tv.strides == pv.strides
    y = roundtrip(tv)
    y[0, 0] = 123.0
    assert x[1, 7] == 123.0


# --- point 6: dtypes -----------------------------------------------------------

NESTED = np.dtype([
    ("id", "<u4"),
    ("pos", [("x", "<f8"), ("y", "<f4"), ("tag", "S3")]),
    ("grid", "<i2", (2, 3)),
    ("flag", "?"),
])
ALIGNED_NESTED = np.dtype([("a", "u1"), ("b", [("c", "<f8"), ("d", "<i2")]), ("e", "<c8")],
                          align=True)
DTYPES = [
    np.dtype(np.bool_),
    np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.int32), np.dtype(np.int64),
    np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint64),
    np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.longdouble),
    np.dtype(np.complex64), np.dtype(np.complex128),
    np.dtype("datetime64[ns]"), np.dtype("timedelta64[s]"),
    np.dtype("S5"), np.dtype("U3"),
    NESTED, ALIGNED_NESTED,
    np.dtype(">i4"), np.dtype(">f8"), np.dtype(">c16"), np.dtype(">M8[us]"), np.dtype(">U2"),
]


def sample(dtype: np.dtype, shape, seed=0) -> np.ndarray:
    """Deterministic data of any dtype in DTYPES (valid values for every kind)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape, dtype=np.int64))
    if dtype.fields is not None:
        out = np.zeros(n, dtype=dtype)
        raw = out.view(np.uint8).reshape(n, dtype.itemsize)
        raw[...] = rng.integers(0, 256, size=raw.shape, dtype=np.uint8)
        for name in dtype.names:
            f = dtype.fields[name][0]
            if f.fields is None and f.kind in "fc?":
                out[name] = sample(f.base, out[name].shape, seed + 1)
        return out.reshape(shape)
    kind = dtype.kind
    if kind == "b":
        flat = rng.integers(0, 2, n).astype(bool)
    elif kind in "iu":
        raw = rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8)
        flat = raw.view(dtype.newbyteorder("="))
    elif kind == "f":
        flat = rng.standard_normal(n) * 1000
        if n >= 3:
            flat[:3] = [np.nan, np.inf, -0.0]
    elif kind == "c":
        flat = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    elif kind in "Mm":
        unit = np.datetime_data(dtype)[0]
        flat = rng.integers(-(2**40), 2**40, n).astype(f"{kind}8[{unit}]")
        if n >= 2:
            flat[1] = np.dtype(f"{kind}8[{unit}]").type("NaT")
    elif kind == "S":
        alphabet = np.frombuffer(b"abcdefghij\x00XYZ\xff", dtype="S1")
        flat = np.array([b"".join(rng.choice(alphabet, dtype.itemsize)) for _ in range(n)],
                        dtype=dtype)
    elif kind == "U":
        chars = list("ab\u00e9\u4e2d\U0001f600z ")
        width = dtype.itemsize // 4
        flat = np.array(["".join(rng.choice(chars, width)) for _ in range(n)], dtype=dtype)
    else:
        raise AssertionError(dtype)
    return np.asarray(flat).astype(dtype).reshape(shape)


LAYOUTS = {
    "C": lambda d: sample(d, (4, 5)),
    "F": lambda d: np.asfortranarray(sample(d, (4, 5, 2))),
    "noncontiguous": lambda d: sample(d, (6, 9))[::2, ::-3],
    "0-d": lambda d: sample(d, ()),
    "empty (0,3)": lambda d: sample(d, (0, 3)),
    "1-d": lambda d: sample(d, (7,)),
}


def canonical_bytes(a: np.ndarray) -> bytes:
    """The bytes of `a` in C order, without the padding of aligned structured
    dtypes (numpy does not copy padding, so it holds garbage in copies)."""
    if a.dtype.fields is not None:
        a = repack_fields(a, recurse=True)
    return a.tobytes(order="C")


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return canonical_bytes(a) == canonical_bytes(b)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=[d.str if d.fields is None else "struct" + str(i)
                                                for i, d in enumerate(DTYPES)])
def test_every_dtype_round_trips_byte_for_byte(dtype, layout):
    src = LAYOUTS[layout](dtype)
    assert src.dtype == dtype
    x = pyarraypool.make_transferable(src)
    assert isinstance(x, pyarraypool.TransferableArray)
    assert x.dtype == dtype and x.dtype.str == dtype.str and x.dtype.descr == dtype.descr
    assert x.shape == src.shape
    assert same_bytes(x, src)
    if layout == "F":
        assert x.flags.f_contiguous
    elif layout != "empty (0,3)":
        assert x.flags.c_contiguous
    y = roundtrip(x)
    assert isinstance(y, pyarraypool.TransferableArray)
    assert y.dtype == dtype and y.dtype.descr == dtype.descr and y.dtype.isnative == dtype.isnative
    assert y.shape == src.shape and y.strides == x.strides
    assert same_bytes(y, src)
    if x.size:
        assert y.ctypes.data == x.ctypes.data
    # A view of it travels too.
    if x.ndim >= 1 and x.shape[0] > 1:
        v = x[::-1]
        w = roundtrip(v)
        assert w.dtype == dtype and w.strides == v.strides and same_bytes(w, src[::-1])


def _describe_in_child(arrays):
    out = []
    for a in arrays:
        out.append((type(a).__name__, canonical_bytes(a), a.dtype, a.dtype.str, a.shape, a.strides,
                    a.ctypes.data % 64 if a.size else 0))
    return out


def test_every_dtype_reaches_another_process_byte_for_byte():
    srcs = [LAYOUTS[lay](d) for d in DTYPES for lay in LAYOUTS]
    xs = [pyarraypool.make_transferable(s) for s in srcs]
    xs += [x[::-1] for x in xs if x.ndim >= 1]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply(_describe_in_child, (xs,))
        pool.close()
        pool.join()
    assert len(got) == len(xs)
    for x, (tname, raw, dt, dstr, shape, strides, align) in zip(xs, got, strict=True):
        assert tname == "TransferableArray"
        assert dt == x.dtype and dstr == x.dtype.str and dt.descr == x.dtype.descr
        assert shape == x.shape and strides == x.strides
        assert raw == canonical_bytes(x), (x.dtype, x.shape)
        assert align == x.ctypes.data % 64


OBJECT_DTYPES = [
    np.dtype(object),
    np.dtype([("a", "<i4"), ("o", "O")]),
    np.dtype([("a", "<i4"), ("s", [("x", "<f8"), ("o", "O")])]),
    np.dtype([("o", "O", (2,))]),
]


@pytest.mark.parametrize("dtype", OBJECT_DTYPES, ids=str)
def test_object_dtypes_are_refused(dtype):
    assert dtype.hasobject
    before = settle()
    src = np.empty(3, dtype=dtype)
    with pytest.raises(TypeError):
        pyarraypool.make_transferable(src)
    with pytest.raises(TypeError):
        pyarraypool.empty(3, dtype=dtype)
    with pytest.raises(TypeError):
        pyarraypool.zeros((2, 2), dtype=dtype)
    with pytest.raises(TypeError):
        pyarraypool.empty_like(src)
    with pytest.raises(TypeError):
        pyarraypool.zeros_like(np.ones(3), dtype=dtype)
    after = settle()
    assert (after.used_bytes, after.live_blocks) == (before.used_bytes, before.live_blocks)


def test_object_array_of_python_objects_is_refused():
    with pytest.raises(TypeError):
        pyarraypool.make_transferable(np.array([1, "a", None], dtype=object))
    with pytest.raises(TypeError):
        pyarraypool.make_transferable([1, "a", None])


@pytest.mark.skipif(not hasattr(np.dtypes, "StringDType"), reason="numpy 2 only")
def test_string_dtype_is_refused():
    dt = np.dtypes.StringDType()
    before = settle()
    with pytest.raises(TypeError):
        pyarraypool.make_transferable(np.array(["a", "longer string"], dtype=dt))
    with pytest.raises(TypeError):
        pyarraypool.empty(3, dtype=dt)
    with pytest.raises(TypeError):
        pyarraypool.zeros(3, dtype=dt)
    with pytest.raises(TypeError):
        pyarraypool.empty_like(np.array(["x"], dtype=dt))
    after = settle()
    assert (after.used_bytes, after.live_blocks) == (before.used_bytes, before.live_blocks)


# --- the full dtype travels: what a plain pickle keeps, a handle keeps -------------------

try:
    import ml_dtypes
except ImportError:  # not installable in this venv (see the Makefile's PY_DEPS)
    ml_dtypes = None

needs_ml_dtypes = pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes is not installed")


def _user_dtypes() -> dict[str, np.dtype]:
    if ml_dtypes is None:
        return {}
    return {
        "bfloat16": np.dtype(ml_dtypes.bfloat16),
        "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
        "int4": np.dtype(ml_dtypes.int4),
        "struct of bfloat16": np.dtype([("x", ml_dtypes.bfloat16), ("y", "<f4")]),
    }


# dtypes whose `.str` does not say everything about them (a handle once sent only that).
LOSSY_STR_DTYPES = {
    **_user_dtypes(),
    "metadata": np.dtype("<f8", metadata={"unit": "m"}),
    "titles": np.dtype({"names": ["a", "b"], "formats": ["<i4", "<f8"], "titles": ["A", "B"]}),
    "offsets and itemsize": np.dtype({"names": ["a", "b"], "formats": ["u1", "<i4"],
                                      "offsets": [0, 5], "itemsize": 12}),
    "aligned struct": np.dtype([("a", "u1"), ("b", "<f8")], align=True),
    "datetime with a multiplier": np.dtype("<M8[25us]"),
    "big-endian timedelta": np.dtype(">m8[D]"),
    "big-endian complex": np.dtype(">c8"),
    "longlong": np.dtype("q"),
    "char": np.dtype("c"),
}
# numpy's own pickle of these gives an equal dtype of another type ('q' comes back as 'l',
# 'c' as 'S1'): a handle may do the same. Every other dtype comes back exactly.
AS_NUMPY_PICKLES_IT = {"longlong", "char"}


def _dtype_facts(d: np.dtype) -> tuple:
    return (d, d.str, d.descr, d.type, d.itemsize, d.alignment, d.isalignedstruct, d.metadata,
            d.names, d.fields)


def _dtype_sample(d: np.dtype) -> np.ndarray:
    # Bytes that are valid values of any of these dtypes (small integers).
    out = np.zeros(6, dtype=d)
    for name in d.names or [None]:
        part = out if name is None else out[name]
        part[...] = np.arange(6).astype(part.dtype)
    return out


def _loaded_in_child(arrays):
    # The facts as text: a dtype sent back would be pickled once more, and NumPy 1's own
    # pickle of a datetime dtype adds an empty metadata dict.
    return [(type(a).__name__, repr(_dtype_facts(a.dtype)), canonical_bytes(a)) for a in arrays]


@pytest.mark.parametrize("name", list(LOSSY_STR_DTYPES))
def test_the_full_dtype_travels(name):
    d = LOSSY_STR_DTYPES[name]
    src = _dtype_sample(d)
    expected = roundtrip(src).dtype if name in AS_NUMPY_PICKLES_IT else d
    assert expected == d
    x = pyarraypool.make_transferable(src)
    assert x.dtype == d
    for v in (x, x[::-2]):
        y = roundtrip(v)
        assert isinstance(y, pyarraypool.TransferableArray)
        assert _dtype_facts(y.dtype) == _dtype_facts(expected), (y.dtype, expected)
        assert same_bytes(y, v) and np.shares_memory(y, x)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply(_loaded_in_child, ([x, x[1:]],))
        pool.close()
        pool.join()
    for v, (tname, facts, raw) in zip([x, x[1:]], got, strict=True):
        assert tname == "TransferableArray"
        assert facts == repr(_dtype_facts(expected))
        assert raw == canonical_bytes(v)


@needs_ml_dtypes
def test_bfloat16_values_arrive_as_bfloat16():
    src = np.linspace(-3, 3, 13).astype(ml_dtypes.bfloat16)
    x = pyarraypool.make_transferable(src)
    y = roundtrip(x)
    assert y.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(y.astype(np.float32), src.astype(np.float32))
    assert (y == src).all()


# --- the read-only flag travels ------------------------------------------------------------


def _write_in_child(arrays):
    out = []
    for a in arrays:
        try:
            a[...] = -1
            out.append((a.flags.writeable, "written"))
        except ValueError:
            out.append((a.flags.writeable, "refused"))
    return out


def _read_only_views(x):
    return {"the array": x, "a slice": x[1:, ::2], "a transpose": x.T, "a row": x[2],
            "a reshape": x.reshape(6, 4), "0-d": x[1, 1:2].reshape(())}


def test_a_read_only_pool_array_arrives_read_only():
    x = pyarraypool.make_transferable(np.arange(24.0).reshape(4, 6))
    x.flags.writeable = False
    for name, v in _read_only_views(x).items():
        assert not v.flags.writeable, name
        y = roundtrip(v)
        assert isinstance(y, pyarraypool.TransferableArray) and np.shares_memory(y, x)
        assert not y.flags.writeable, f"{name} arrived writeable"
        with pytest.raises(ValueError):
            y[...] = -1
        with pytest.raises(ValueError):
            y.flags.writeable = True
        np.testing.assert_array_equal(y, v)
    np.testing.assert_array_equal(x, np.arange(24.0).reshape(4, 6))


def test_read_only_arrives_read_only_in_another_process_and_writeable_stays_writeable():
    ro = pyarraypool.make_transferable(np.arange(24.0).reshape(4, 6))
    ro.flags.writeable = False
    rw = pyarraypool.make_transferable(np.arange(24.0).reshape(4, 6))
    views = [*_read_only_views(ro).values(), rw, rw[::2]]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply(_write_in_child, (views,))
        pool.close()
        pool.join()
    assert got[:-2] == [(False, "refused")] * (len(views) - 2)
    assert got[-2:] == [(True, "written")] * 2
    np.testing.assert_array_equal(ro, np.arange(24.0).reshape(4, 6))
    np.testing.assert_array_equal(rw, np.full((4, 6), -1.0))


def test_a_view_made_writeable_before_its_base_became_read_only_stays_writeable():
    # numpy's own rule: the flag belongs to each view, not to the memory.
    x = pyarraypool.make_transferable(np.arange(6.0))
    v = x[::2]
    x.flags.writeable = False
    y = roundtrip(v)
    assert y.flags.writeable and not roundtrip(x).flags.writeable
    y[...] = 0
    np.testing.assert_array_equal(x, [0.0, 1.0, 0.0, 3.0, 0.0, 5.0])
