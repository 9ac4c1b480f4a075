"""Handle validation: malformed, stale and foreign handles.

Contract points 11 and 17 (see /work/shared/guide/contract.md): loading a
handle whose block is gone, or that names another pool, raises
StaleHandleError; a malformed handle raises InvalidHandleError; never a
crash, never an array whose bytes reach outside its block.

Handle layout (csrc/core/handle.hpp, format 2), little-endian:
  0 magic "PAPH" | 4 version u8 | 5 flags u8 | 6 ndim u8 | 7 zero
  8 pool id (16) | 24 block ref u64 (segment << 48 | offset) | 32 generation
  40 view byte offset | 48 itemsize | 56 reserved (0) | 64 pool instance id (16)
  80 shape[ndim], strides[ndim]
"""

from __future__ import annotations

import os
import pickle
import secrets
import struct
import sys
import traceback

import numpy as np
import pytest
from helpers import fresh_env, my_pool_token, pool_files, run_python
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import pyarraypool
from pyarraypool import InvalidHandleError, StaleHandleError, _core

OFF_MASK = (1 << 48) - 1
U64 = 1 << 64
INSTANCE = 64  # the pool instance id's 16 bytes
DIMS = 80      # shape, then strides

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # numpy < 2
    byte_bounds = np.byte_bounds


class Rebuild:
    """Pickles as a call to the loader with given handle bytes and dtype,
    exactly like a real pickle of a pool array."""

    def __init__(self, handle, dtype):
        self.handle, self.dtype = handle, dtype

    def __reduce__(self):
        return _core._rebuild, (self.handle, self.dtype)


def load(handle, dtype):
    return pickle.loads(pickle.dumps(Rebuild(handle, dtype), protocol=pickle.HIGHEST_PROTOCOL))


def handle_of(arr):
    """The handle bytes and dtype a pickle of `arr` carries. Only for arrays
    made with transfer_required=False: asking adds no pending pickle."""
    assert _core._block_of(arr).transfer_required is False
    fn, (handle, dtype) = arr.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    assert fn is _core._rebuild and isinstance(handle, bytes)
    return handle, dtype


def u64(h: bytes, at: int) -> int:
    return struct.unpack_from("<Q", h, at)[0]


def put(h: bytes, at: int, value: int, fmt: str = "<Q") -> bytes:
    b = bytearray(h)
    struct.pack_into(fmt, b, at, value % U64 if fmt == "<Q" else value)
    return bytes(b)


def put_byte(h: bytes, at: int, value: int) -> bytes:
    b = bytearray(h)
    b[at] = value
    return bytes(b)


def parse(h: bytes) -> dict:
    ndim = h[6]
    return {
        "flags": h[5], "ndim": ndim, "ref": u64(h, 24), "generation": u64(h, 32),
        "view_offset": u64(h, 40), "itemsize": u64(h, 48),
        "shape": struct.unpack_from(f"<{ndim}q", h, DIMS),
        "strides": struct.unpack_from(f"<{ndim}q", h, DIMS + 8 * ndim),
    }


def segment_size(seg: int) -> int:
    prefix = f"pyarraypool-{my_pool_token()}-{seg}-"  # then the name's random part
    (name,) = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    return os.stat("/dev/shm/" + name).st_size


@pytest.fixture(autouse=True)
def _release_arrays_of_a_failed_test():
    """pytest keeps a failed test's traceback (sys.last_traceback), and with it
    the test's pool arrays, past the pool-balance check: clear those frames so
    that one failure is reported once, not again by the balance check."""
    yield
    tb = getattr(sys, "last_traceback", None)
    if tb is not None:
        traceback.clear_frames(tb)
        while tb is not None:
            _ = tb.tb_frame.f_locals  # re-syncs the frame's locals dict: now empty
            tb = tb.tb_next


def new_arr():
    """An 8x8 float64 array in the pool (no pending pickles to account for).
    Made in each test, not in a fixture: pytest keeps fixture values alive
    until after the pool-balance check."""
    return pyarraypool.make_transferable(np.arange(64, dtype="<f8").reshape(8, 8),
                                         transfer_required=False)


def test_the_handle_layout_is_what_these_tests_assume():
    arr = new_arr()
    h, dtype = handle_of(arr)
    blk = _core._block_of(arr)
    p = parse(h)
    assert h[:4] == b"PAPH" and h[4] == 2 and len(h) == DIMS + 16 * 2
    assert h[8:24].hex() == pyarraypool.pool_identity()["token"]
    assert h[INSTANCE:DIMS].hex() == pyarraypool.pool_identity()["instance"]
    assert p["ref"] >> 48 == blk.segment and p["ref"] & OFF_MASK == blk.offset
    assert p["generation"] == blk.generation
    assert p["view_offset"] == 0 and p["itemsize"] == 8
    assert p["shape"] == (8, 8) and p["strides"] == (64, 8)
    assert dtype == np.dtype("<f8")
    y = load(h, dtype)
    np.testing.assert_array_equal(y, arr)
    assert np.shares_memory(y, arr)


def test_error_classes():
    assert issubclass(InvalidHandleError, pyarraypool.PoolError)
    assert issubclass(InvalidHandleError, ValueError)
    assert issubclass(StaleHandleError, pyarraypool.PoolError)
    assert not issubclass(StaleHandleError, InvalidHandleError)
    assert not issubclass(InvalidHandleError, StaleHandleError)


# --- malformed handles: InvalidHandleError -------------------------------------------

NDIM2 = DIMS + 32  # length of the handle of a 2-d array

MALFORMED = {
    "empty": lambda h, b: b"",
    "truncated-header": lambda h, b: h[:40],
    "truncated-by-one": lambda h, b: h[:-1],
    "truncated-dims": lambda h, b: h[:DIMS + 8],
    "truncated-to-format-1-fixed-part": lambda h, b: h[:64],
    "extended-by-one": lambda h, b: h + b"\0",
    "extended-by-a-dim": lambda h, b: h + bytes(16),
    "bad-magic": lambda h, b: b"PAPX" + h[4:],
    "zero-magic": lambda h, b: bytes(4) + h[4:],
    "bad-version": lambda h, b: put_byte(h, 4, 3),
    "format-1": lambda h, b: put_byte(h, 4, 1),
    "unknown-flag": lambda h, b: put_byte(h, 5, 0x80),
    "reserved-byte": lambda h, b: put_byte(h, 7, 1),
    "reserved-word": lambda h, b: put(h, 56, 1),
    "ndim-disagrees-with-length": lambda h, b: put_byte(h, 6, 3),
    "ndim-too-large": lambda h, b: put_byte(h, 6, 65)[:DIMS] + bytes(16 * 65),
    "nil-block": lambda h, b: put(h, 24, U64 - 1),
    "segment-out-of-range": lambda h, b: put(h, 24, (4096 << 48) | b.offset),
    "segment-index-max": lambda h, b: put(h, 24, (0xFFFF << 48) | b.offset),
    "offset-misaligned": lambda h, b: put(h, 24, (b.segment << 48) | (b.offset + 8)),
    "offset-past-its-segment": lambda h, b: put(
        h, 24, (b.segment << 48) | segment_size(b.segment)),
    "offset-far-past-its-segment": lambda h, b: put(h, 24, (b.segment << 48) | (1 << 40)),
    "generation-zero": lambda h, b: put(h, 32, 0),
    "view-offset-past-block": lambda h, b: put(h, 40, b.capacity),
    "view-offset-near-end": lambda h, b: put(h, 40, b.capacity - 8),
    "view-offset-huge": lambda h, b: put(h, 40, U64 - 64),
    "shape-past-block": lambda h, b: put(h, DIMS, b.capacity // 64 + 1),
    "stride-past-block": lambda h, b: put(h, DIMS + 16, b.capacity),
    "negative-stride-before-block": lambda h, b: put(h, DIMS + 16, -64),
    "negative-shape": lambda h, b: put(h, DIMS, -1),
    "shape-times-stride-overflows": lambda h, b: put(put(h, DIMS, 1 << 62), DIMS + 16, 1 << 62),
    "min-int-stride": lambda h, b: put(h, DIMS + 24, -(1 << 63)),
    "itemsize-past-block": lambda h, b: put(h, 48, b.capacity + 8),
    # Shapes numpy cannot make, although the bytes they touch are in the block:
    # no bytes at all, and one item repeated 2**61 times (stride 0).
    "empty-with-a-huge-dimension": lambda h, b: put(put(h, DIMS, 0), DIMS + 8, 1 << 62),
    "stride-0-with-a-huge-dimension": lambda h, b: put(put(h, DIMS, 1 << 61), DIMS + 16, 0),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_handle_raises_invalid_handle_error(case):
    arr = new_arr()
    h, dtype = handle_of(arr)
    bad = MALFORMED[case](h, _core._block_of(arr))
    assert bad != h
    before = pyarraypool.stats()
    with pytest.raises(InvalidHandleError):
        _core._rebuild(bad, dtype)
    with pytest.raises(InvalidHandleError):
        load(bad, dtype)
    after = pyarraypool.stats()
    assert (after.used_bytes, after.live_blocks) == (before.used_bytes, before.live_blocks)
    np.testing.assert_array_equal(arr, np.arange(64.0).reshape(8, 8))


def test_malformed_handle_in_a_real_pickle():
    """The same mutations spliced into the bytes of a real pickle."""
    arr = new_arr()
    h, _ = handle_of(arr)
    blob = pickle.dumps(arr)
    assert blob.count(h) == 1
    b = _core._block_of(arr)
    for case in ("bad-magic", "bad-version", "unknown-flag", "reserved-word",
                 "offset-misaligned", "offset-past-its-segment", "view-offset-past-block",
                 "shape-past-block", "negative-stride-before-block", "generation-zero"):
        bad = MALFORMED[case](h, b)
        assert len(bad) == len(h)
        with pytest.raises(InvalidHandleError):
            pickle.loads(blob.replace(h, bad))
    y = pickle.loads(blob)
    np.testing.assert_array_equal(y, arr)


@pytest.mark.parametrize("dtype", [
    np.dtype("<f4"),                      # itemsize 4, the handle says 8
    np.dtype("<c16"),                     # itemsize 16
    np.dtype("V16"),
    np.dtype(("<f4", 2)),                 # subarray dtype, itemsize 8
    np.dtype(object),                     # pointers: never
    np.dtype([("a", "O")]),               # a structured dtype holding pointers
    "<f4",                                # the same, as the strings a pickle may carry
    "O",
    "V16",
], ids=["f4", "c16", "V16", "subarray", "object", "struct-with-object", "str-f4", "str-O",
        "str-V16"])
def test_dtype_that_does_not_match_the_handle_is_refused(dtype):
    arr = new_arr()
    h, _ = handle_of(arr)
    with pytest.raises(InvalidHandleError):
        _core._rebuild(h, dtype)
    with pytest.raises(InvalidHandleError):
        load(h, dtype)


def test_dtype_of_the_same_item_size_reinterprets_the_bytes():
    arr = new_arr()
    h, _ = handle_of(arr)
    y = load(h, np.dtype("<i8"))
    assert y.dtype == np.dtype("<i8") and np.shares_memory(y, arr)
    np.testing.assert_array_equal(y, arr.view("<i8"))


@pytest.mark.parametrize("bad", [
    lambda h, d: (bytearray(h), d),
    lambda h, d: (h.decode("latin-1"), d),
    lambda h, d: (None, d),
    lambda h, d: (h, "not a dtype"),
    lambda h, d: (h, None),
    lambda h, d: (h, np.float64),
    lambda h, d: (h, 8),
], ids=["bytearray", "str", "None", "bad-dtype-string", "dtype-None", "dtype-as-type",
        "dtype-as-int"])
def test_loader_arguments_of_the_wrong_type(bad):
    arr = new_arr()
    h, d = handle_of(arr)
    args = bad(h, d)
    with pytest.raises((InvalidHandleError, TypeError)):
        _core._rebuild(*args)


# --- stale handles and handles of another pool: StaleHandleError -------------------------

STALE = {
    "generation-plus-one": lambda h, b: put(h, 32, b.generation + 1),
    "generation-minus-one": lambda h, b: put(h, 32, b.generation - 1),
    "generation-huge": lambda h, b: put(h, 32, 1 << 63),
    "another-pool-id": lambda h, b: put_byte(h, 8, h[8] ^ 1),
    "zero-pool-id": lambda h, b: h[:8] + bytes(16) + h[24:],
    # The same token, another instance: a pool made again under the same name.
    "another-instance": lambda h, b: put_byte(h, INSTANCE + 15, h[INSTANCE + 15] ^ 1),
    "zero-instance": lambda h, b: h[:INSTANCE] + bytes(16) + h[DIMS:],
}


@pytest.mark.parametrize("case", list(STALE))
def test_handle_of_a_gone_block_or_another_pool_raises_stale_handle_error(case):
    arr = new_arr()
    h, dtype = handle_of(arr)
    bad = STALE[case](h, _core._block_of(arr))
    with pytest.raises(StaleHandleError):
        _core._rebuild(bad, dtype)
    with pytest.raises(StaleHandleError):
        load(bad, dtype)


def test_handle_of_a_freed_block_is_stale():
    x = pyarraypool.make_transferable(np.arange(100.0), transfer_required=False)
    blob = pickle.dumps(x)
    h, dtype = handle_of(x)
    del x
    with pytest.raises(StaleHandleError):
        pickle.loads(blob)
    with pytest.raises(StaleHandleError):
        load(h, dtype)


def test_handle_of_a_freed_block_whose_memory_was_reused_is_stale():
    """Never another array's bytes: the generation tells the new block apart."""
    x = pyarraypool.make_transferable(np.arange(100.0), transfer_required=False)
    h, dtype = handle_of(x)
    old = _core._block_of(x)
    where = (old.segment, old.offset)
    del old, x
    ys = []
    for _ in range(50):       # the freed block is taken again (most likely at once)
        ys.append(pyarraypool.make_transferable(np.full(100, -1.0), transfer_required=False))
        b = _core._block_of(ys[-1])
        if (b.segment, b.offset) == where:
            break
    with pytest.raises(StaleHandleError):
        load(h, dtype)
    assert any((_core._block_of(y).segment, _core._block_of(y).offset) == where for y in ys), \
        "the freed block was not reused: the test did not test reuse"


def test_handle_pointing_into_the_middle_of_another_block_is_refused():
    """A handle whose offset lands inside a live block's payload names no
    block: it must not load (whatever the bytes there look like)."""
    arr = new_arr()
    h, dtype = handle_of(arr)
    b = _core._block_of(arr)
    for k in (1, 2, 3, 7):
        bad = put(h, 24, (b.segment << 48) | (b.offset + 64 * k))
        with pytest.raises((StaleHandleError, InvalidHandleError)):
            load(bad, dtype)
    # A segment this pool does not have (in range, never created).
    bad = put(h, 24, (4000 << 48) | b.offset)
    with pytest.raises((StaleHandleError, InvalidHandleError)):
        load(bad, dtype)
    # The last header-sized slot of the segment, inside some block or free space.
    bad = put(h, 24, (b.segment << 48) | (segment_size(b.segment) - 64))
    with pytest.raises((StaleHandleError, InvalidHandleError)):
        load(bad, dtype)


def test_real_handle_of_another_program_is_stale():
    proc = run_python("""
        import pickle, numpy as np, pyarraypool
        x = pyarraypool.make_transferable(np.arange(64.0).reshape(8, 8))
        fn, (h, d) = x.__reduce_ex__(5)
        print(h.hex())
        print(pickle.dumps(x).hex())
    """)
    h_hex, blob_hex = proc.stdout.split()[:2]
    h, blob = bytes.fromhex(h_hex), bytes.fromhex(blob_hex)
    # The other program's block may well have the same segment, offset and
    # generation as one of ours: only the pool id tells them apart.
    with pytest.raises(StaleHandleError):
        _core._rebuild(h, np.dtype("<f8"))
    with pytest.raises(StaleHandleError):
        pickle.loads(blob)
    # Even with a block of ours at exactly that place and generation.
    mine = pyarraypool.make_transferable(np.zeros(64), transfer_required=False)
    mh, _ = handle_of(mine)
    forged = h[:24] + mh[24:40] + h[40:]
    with pytest.raises(StaleHandleError):
        _core._rebuild(forged, np.dtype("<f8"))


def test_failed_loads_leave_the_pending_pickle_intact():
    """A pickle made with transfer_required keeps its block alive until it is
    loaded; failed loads of damaged copies of it must not use that up."""
    x = pyarraypool.make_transferable(np.arange(1000.0))
    blob = pickle.dumps(x)
    del x
    s0 = pyarraypool.stats()
    # Find the handle inside the pickle: it starts with the magic.
    at = blob.index(b"PAPH")
    h = blob[at:at + DIMS + 16]
    assert parse(h)["ndim"] == 1
    for bad in (put(h, 40, 8000), put(h, DIMS, 1001), put(h, 32, u64(h, 32) + 1),
                put_byte(h, 5, 5), h[:8] + bytes(16) + h[24:], put(h, DIMS + 8, -8),
                h[:INSTANCE] + bytes(16) + h[DIMS:]):
        with pytest.raises((InvalidHandleError, StaleHandleError)):
            pickle.loads(blob.replace(h, bad))
    s1 = pyarraypool.stats()
    assert s1.pending_transfers == s0.pending_transfers
    assert s1.used_bytes == s0.used_bytes
    y = pickle.loads(blob)
    np.testing.assert_array_equal(y, np.arange(1000.0))
    assert pyarraypool.stats().pending_transfers == s0.pending_transfers - 1


# --- random damage: never a crash, never bytes outside the block -------------------------

EDGES = [0, 1, 7, 8, 63, 64, 65, 4096, 1 << 31, (1 << 47) - 64, 1 << 48, 1 << 62, 1 << 63,
         U64 - 1, U64 - 8, U64 - 64]


def sample_arrays():
    base = np.arange(240, dtype="<i4").reshape(4, 6, 10)
    a = pyarraypool.make_transferable(base, transfer_required=False)
    b = pyarraypool.make_transferable(np.arange(50.0, dtype=">f8"), transfer_required=False)
    c = pyarraypool.make_transferable(np.array(3.5), transfer_required=False)
    d = pyarraypool.make_transferable(np.zeros((0, 5)), transfer_required=False)
    e = pyarraypool.make_transferable(
        np.array([(1, 2.0), (3, 4.0)], dtype=[("i", "<i2"), ("f", "<f8")]),
        transfer_required=False)
    return [a, a[1], a[:, ::2, 1:7], a.T, a[..., 0], a[::-1], b, b[::-3], c, d, e]


@st.composite
def damage(draw, h: bytes):
    kind = draw(st.sampled_from(["bytes", "field", "resize", "dims", "view", "view"]))
    if kind == "view" and h[6] > 0:
        # Small changes to the view's offset, shape and strides: as likely to
        # stay inside the block as to cross its edge by a few bytes.
        ndim = h[6]
        out = h
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.sampled_from([40] + [DIMS + 8 * i for i in range(2 * ndim)]))
            old = struct.unpack_from("<q", out, at)[0]
            out = put(out, at, old + draw(st.sampled_from([-64, -16, -8, -2, -1, 1, 2, 8, 16, 64])))
        return out
    if kind == "bytes":
        out = bytearray(h)
        for at, v in draw(st.lists(st.tuples(st.integers(0, len(h) - 1), st.integers(0, 255)),
                                   min_size=1, max_size=4)):
            out[at] = v
        return bytes(out)
    if kind in ("field", "view"):
        at = draw(st.sampled_from([24, 32, 40, 48, 56] + list(range(64, len(h), 8))))
        old = u64(h, at)
        value = draw(st.one_of(st.sampled_from(EDGES), st.integers(0, U64 - 1),
                               st.integers(-4096, 4096).map(lambda d: old + d)))
        return put(h, at, value)
    if kind == "resize":
        n = draw(st.integers(-len(h), 24))
        return h[:len(h) + n] if n < 0 else h + draw(st.binary(min_size=n, max_size=n))
    # dims: another ndim, with shapes and strides from random and edge values
    ndim = draw(st.integers(0, 6))
    value = st.one_of(st.integers(-(1 << 63), (1 << 63) - 1),
                      st.sampled_from([0, 1, 2, 3, 8, -8, 64, 1 << 31, 1 << 62, -(1 << 62)]))
    vals = draw(st.lists(value, min_size=2 * ndim, max_size=2 * ndim))
    return put_byte(h[:DIMS], 6, ndim) + struct.pack(f"<{2 * ndim}q", *vals)


def check_loaded(y, handle: bytes, dtype) -> None:
    """y was loaded from `handle`: it must be exactly the view the handle
    describes, on the block it names, inside that block."""
    assert isinstance(y, pyarraypool.TransferableArray)
    p = parse(handle)
    blk = _core._block_of(y)
    assert blk is not None
    assert (blk.segment, blk.offset) == (p["ref"] >> 48, p["ref"] & OFF_MASK)
    assert blk.generation == p["generation"]
    assert y.dtype == dtype
    assert y.shape == p["shape"] and y.strides == p["strides"]
    assert y.ctypes.data == blk.address + p["view_offset"]
    if y.size:
        lo, hi = byte_bounds(y)
        assert blk.address <= lo and hi <= blk.address + blk.capacity, (
            lo - blk.address, hi - blk.address, blk.capacity)
        # Read the two items at the ends of the extent (not the whole array:
        # a zero stride may repeat one item 2**40 times).
        first = tuple(0 if st >= 0 else n - 1 for n, st in zip(y.shape, y.strides, strict=True))
        last = tuple(n - 1 if st >= 0 else 0 for n, st in zip(y.shape, y.strides, strict=True))
        y[first].tobytes()
        y[last].tobytes()


def try_damaged_handle(data) -> str | None:
    """Loads a damaged handle of one of a few pool arrays; returns what went
    wrong, or None. Returning (rather than raising) lets every pool array of
    the attempt go before a failure is reported: a traceback kept by
    hypothesis or pytest would otherwise hold them past the balance check."""
    arrays = sample_arrays()
    i = data.draw(st.integers(0, len(arrays) - 1), label="array")
    h, dtype = handle_of(arrays[i])
    bad = data.draw(damage(h), label="handle")
    if data.draw(st.booleans(), label="other dtype"):
        dtype = data.draw(st.sampled_from(
            [np.dtype(t) for t in ("u1", "<i2", "<i4", ">f8", "<c16", "V3", "S5")]),
            label="dtype")
    try:
        y = load(bad, dtype)
    except (InvalidHandleError, StaleHandleError) as e:
        event(type(e).__name__)
        return None
    except Exception:
        return "loading raised another error than Invalid/StaleHandleError:\n" + \
            traceback.format_exc()
    event("loaded" if bad == h else "loaded a damaged handle")
    try:
        check_loaded(y, bad, dtype)
        if bad == h:
            np.testing.assert_array_equal(y, arrays[i])
    except Exception:
        return "the loaded array is wrong:\n" + traceback.format_exc()
    return None


@settings(max_examples=300, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(data=st.data())
def test_randomly_damaged_handles_never_crash_or_escape_their_block(data):
    problem = try_damaged_handle(data)
    assert problem is None, problem


# --- handles of an ended pool: refused by a new pool of the same name ----------------------
#
# A pool's name (its token) outlives the pool: a user who fixes PYARRAYPOOL_POOL, a Dask
# cluster whose host pool is named after the scheduler's address, and a pool without a root
# that ends and is created again while a program runs all reuse it. The new pool allocates
# the same blocks with the same generations as the old one, so only the pool's instance
# tells an old handle apart.

MAKE_A_PICKLE = """
    import pickle, sys, numpy as np, pyarraypool
    x = pyarraypool.make_transferable(np.arange(1000.0))
    sys.stdout.write(pickle.dumps(x).hex())
"""

# Allocates what the maker allocated (so the same block and generation) and loads the old
# pickle; prints what happened.
LOAD_IN_A_NEW_POOL = """
    import pickle, numpy as np, pyarraypool
    blob = bytes.fromhex({blob_hex!r})
    mine = pyarraypool.make_transferable(np.full(1000, 7.0))
    try:
        y = pickle.loads(blob)
    except pyarraypool.StaleHandleError as e:
        print("STALE", " ".join(str(e).split()))
    else:
        print("LOADED", y[:3].tolist(), np.shares_memory(y, mine))
    pickle.loads(pickle.dumps(mine))  # use up the pending pickle of `mine` too
"""


def assert_refused_as_stale(out: str) -> None:
    assert out.startswith("STALE "), f"a handle of an ended pool loaded: {out}"
    msg = out[len("STALE "):]
    # The message says what went wrong and how to keep data.
    assert "ended" in msg and "handle" in msg and "not" in msg and "data" in msg, msg
    assert "x.copy()" in msg and "np.save" in msg, msg


def cluster_env(name: str) -> dict[str, str]:
    from pyarraypool._lifecycle import NO_ROOT
    from pyarraypool.dask import cluster_pool_name
    return fresh_env(PYARRAYPOOL_POOL=cluster_pool_name(name), PYARRAYPOOL_ROOT=NO_ROOT)


@pytest.mark.parametrize("naming", ["fixed PYARRAYPOOL_POOL", "Dask cluster pool"])
def test_handle_of_an_ended_pool_is_stale_in_a_new_pool_of_the_same_name(naming):
    if naming == "fixed PYARRAYPOOL_POOL":
        env = fresh_env(PYARRAYPOOL_POOL=secrets.token_hex(16))
    else:
        # A scheduler address of its own, so that no other test run shares the name.
        env = cluster_env(f"tcp://127.0.0.1:{secrets.randbelow(60000) + 1024}/"
                          f"{secrets.token_hex(4)}")
    token = env["PYARRAYPOOL_POOL"]
    blob_hex = run_python(MAKE_A_PICKLE, env=env).stdout.strip()
    assert pool_files(token) == [], "the first program's pool did not end"
    out = run_python(LOAD_IN_A_NEW_POOL.format(blob_hex=blob_hex), env=env).stdout.strip()
    assert pool_files(token) == []
    assert_refused_as_stale(out)


def test_handle_of_a_pool_that_ended_while_the_program_runs_is_stale():
    """A program outlives the pool its worker made (a pool without a root ends with its last
    process), then makes the pool again: the worker's old pickle must not load."""
    env = cluster_env(f"tcp://127.0.0.1:1/{secrets.token_hex(8)}")
    token = env["PYARRAYPOOL_POOL"]
    out = run_python(f"""
        import subprocess, sys, textwrap
        import pyarraypool   # imported, not attached: the worker makes the pool
        maker = textwrap.dedent({MAKE_A_PICKLE!r})
        blob_hex = subprocess.run([sys.executable, "-c", maker], capture_output=True, text=True,
                                  check=True).stdout.strip()
        assert pyarraypool._core._inspect({token!r}) is None, "the worker's pool did not end"
        exec(textwrap.dedent({LOAD_IN_A_NEW_POOL!r}).format(blob_hex=blob_hex))
    """, env=env).stdout.strip()
    assert pool_files(token) == []
    assert_refused_as_stale(out)
