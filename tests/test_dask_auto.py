"""pyarraypool.dask auto mode: plain ndarrays between one host's Dask processes by handle.

With ``install(client, min_bytes=N)``, a plain ndarray (exact type
np.ndarray) of at least N bytes that goes between two processes of one pool
travels as a private handle: the sender copies it into a fresh pool block,
the recipient gets a plain ndarray on that block, its own. Everything else
travels as before. The cluster shares the pytest process's pool (a
LocalCluster inherits it), so the autouse balance check covers the workers.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from distributed import Client, LocalCluster  # noqa: E402
from distributed.protocol import deserialize, serialize  # noqa: E402
from test_dask import (  # noqa: E402
    MiB,
    _context,
    _delta,
    _note_pools,
    _release,
    _wait_until,
    describe,
    make_pool_array,
    reset_counters,
    shm_unchanged,  # noqa: F401  (the module fixture: no pools left behind)
)

import pyarraypool  # noqa: E402
import pyarraypool.dask as pdask  # noqa: E402
from pyarraypool import _core, _dask_meter  # noqa: E402

MIN_BYTES = 1 * MiB

# -- functions run on the workers ---------------------------------------------

# Arrays a worker made, kept by tag: the producer's own reference, which it
# may write to after Dask sent the array elsewhere.
_kept: dict[str, np.ndarray] = {}


def make_plain(nbytes: int, fill: int, tag: str | None = None) -> np.ndarray:
    x = np.full(nbytes, fill, dtype=np.uint8)
    if tag is not None:
        _kept[tag] = x
    return x


def overwrite_kept(tag: str, value: int) -> int:
    x = _kept.pop(tag)
    x[:] = value
    return int(x[0])


def arrival(x: object, _after: object = None) -> dict:
    """What a task got: its type, whether it lives in a pool block, its ends."""
    out = {"type": type(x).__name__, "in_pool": _core._block_of(x) is not None}
    if isinstance(x, np.ndarray):
        out.update(first=int(x.flat[0]), last=int(x.flat[-1]), nbytes=int(x.nbytes))
    return out


def write_all(x: np.ndarray, value: int) -> int:
    x[...] = value
    return int(x.flat[0])


def pending_transfers() -> int:
    return pyarraypool.stats().pending_transfers


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(shm_unchanged):  # noqa: F811
    import dask

    # The tests read which worker holds which copy: the active memory
    # manager would drop replicas it finds redundant.
    no_amm = {"distributed.scheduler.active-memory-manager.start": False}
    with dask.config.set(no_amm), LocalCluster(
        processes=True, n_workers=2, threads_per_worker=1, dashboard_address=":0"
    ) as cluster:
        with Client(cluster) as c:
            pdask.install(c, min_bytes=MIN_BYTES)
            _note_pools(c)
            try:
                yield c
            finally:
                pdask.install(c)  # auto off again in this process too


@pytest.fixture
def workers(client):
    # Every test starts with auto mode on, whatever the one before it did.
    pdask.install(client, min_bytes=MIN_BYTES)
    addrs = sorted(client.scheduler_info()["workers"])
    assert len(addrs) == 2
    client.run(reset_counters)
    return addrs, client.run(pdask.counters)


def _pending_everywhere(client) -> int:
    # One pool for the cluster: the count is the pool's, seen from anywhere.
    return pyarraypool.stats().pending_transfers


# -- between workers ----------------------------------------------------------


def test_plain_array_between_workers_by_handle(client, workers):
    (w0, w1), before = workers
    base = pyarraypool.stats().used_bytes
    x = client.submit(make_plain, 8 * MiB, 3, "between", workers=[w0], pure=False)
    got = client.submit(arrival, x, workers=[w1], pure=False).result()
    assert got == {"type": "ndarray", "in_pool": True, "first": 3, "last": 3, "nbytes": 8 * MiB}
    delta = _delta(client, before)
    assert delta[w0]["auto_sent_by_handle"] == 1
    assert delta[w1]["auto_received_by_handle"] == 1
    assert delta[w0]["sent_by_value"] == delta[w0]["sent_by_handle"] == 0
    # w0 served the handle and the get_data reply around it, not 8 MiB.
    served = client.run(_dask_meter.written, w0)[w0]
    assert 0 < served < 8 * 1024, served
    assert _pending_everywhere(client) == 0
    # Private: the producer's later writes to its own array do not reach w1's
    # copy, and w1's writes do not reach the producer's.
    assert client.submit(overwrite_kept, "between", 7, workers=[w0], pure=False).result() == 7
    again = client.submit(arrival, x, got, workers=[w1], pure=False).result()
    assert (again["first"], again["last"], again["in_pool"]) == (3, 3, True)
    w = client.submit(write_all, x, 9, workers=[w1], pure=False)
    assert w.result() == 9
    on_w0 = client.submit(arrival, x, w, workers=[w0], pure=False).result()
    assert (on_w0["first"], on_w0["in_pool"]) == (7, False)
    _release(base, x, w)


def test_small_arrays_and_other_types_go_as_before(client, workers):
    (w0, w1), before = workers
    base = pyarraypool.stats().used_bytes
    small = client.submit(make_plain, MIN_BYTES - 1, 1, workers=[w0], pure=False)
    blob = client.submit(bytes, 2 * MIN_BYTES, workers=[w0], pure=False)
    objects = client.submit(np.full, MIN_BYTES, None, dtype=object, workers=[w0], pure=False)
    pool = client.submit(make_pool_array, 2 * MIN_BYTES, 4, workers=[w0], pure=False)
    assert client.submit(arrival, small, workers=[w1], pure=False).result() == {
        "type": "ndarray", "in_pool": False, "first": 1, "last": 1, "nbytes": MIN_BYTES - 1}
    assert client.submit(arrival, blob, workers=[w1], pure=False).result() == {
        "type": "bytes", "in_pool": False}
    assert client.submit(lambda a: type(a[0]).__name__, objects, workers=[w1],
                         pure=False).result() == "NoneType"
    got = client.submit(arrival, pool, workers=[w1], pure=False).result()
    assert (got["type"], got["in_pool"]) == ("TransferableArray", True)
    delta = _delta(client, before)
    assert delta[w0]["auto_sent_by_handle"] == 0
    assert delta[w0]["sent_by_handle"] == 1  # the pool array, as without auto mode
    _release(base, small, blob, objects, pool)


def test_dask_array_transfers_by_handle(client, workers):
    da = pytest.importorskip("dask.array")
    (w0, w1), before = workers
    base = pyarraypool.stats().used_bytes
    x = da.random.RandomState(5).random_sample((2048, 2048), chunks=(512, 512))  # 2 MiB chunks
    total = (x + x.T).sum().compute()
    whole = x.compute()
    assert type(whole) is np.ndarray
    assert total == pytest.approx(float((whole + whole.T).sum()), rel=1e-12)
    delta = _delta(client, before)
    sent = delta[w0]["auto_sent_by_handle"] + delta[w1]["auto_sent_by_handle"]
    received = delta[w0]["auto_received_by_handle"] + delta[w1]["auto_received_by_handle"]
    assert sent > 0 and received > 0
    assert delta[w0]["sent_by_value"] == delta[w1]["sent_by_value"] == 0
    del whole
    gc.collect()
    _wait_until(lambda: _pending_everywhere(client) == 0, what="no pending transfers")
    _release(base)


# -- to and from the client ---------------------------------------------------


def test_gather_to_client_by_handle(client, workers):
    (w0, _w1), before = workers
    base = pyarraypool.stats().used_bytes
    received = pdask.counters()["auto_received_by_handle"]
    f = client.submit(make_plain, 4 * MiB, 6, "gathered", workers=[w0], pure=False)
    r = f.result()
    assert type(r) is np.ndarray and _core._block_of(r) is not None
    assert r.nbytes == 4 * MiB and r[0] == 6 and r[-1] == 6
    assert pdask.counters()["auto_received_by_handle"] == received + 1
    assert _delta(client, before)[w0]["auto_sent_by_handle"] == 1
    # The client's copy is its own.
    client.submit(overwrite_kept, "gathered", 1, workers=[w0], pure=False).result()
    assert r[0] == 6
    del r
    _release(base, f)


def test_scatter_from_client_by_handle(client, workers):
    (w0, _w1), before = workers
    base = pyarraypool.stats().used_bytes
    sent = pdask.counters()["auto_sent_by_handle"]
    x = np.full(2 * MiB, 8, dtype=np.uint8)
    fut = client.scatter(x, workers=[w0])
    assert pdask.counters()["auto_sent_by_handle"] == sent + 1
    x[:] = 0  # after the send: the worker's copy does not change
    got = client.submit(arrival, fut, workers=[w0], pure=False).result()
    assert got == {"type": "ndarray", "in_pool": True, "first": 8, "last": 8, "nbytes": 2 * MiB}
    assert _delta(client, before)[w0]["auto_received_by_handle"] == 1
    _release(base, fut)


# -- the serializer -----------------------------------------------------------


def test_serializer_sends_a_private_handle_only_to_the_same_pool(client):
    x = np.arange(2 * MIN_BYTES // 8, dtype=np.float64).reshape(64, -1)
    pending = pyarraypool.stats().pending_transfers
    same = _context(dict(pyarraypool.pool_identity()))
    header, frames = serialize(x, context=same)
    assert sum(memoryview(f).nbytes for f in frames) < 1024
    assert pyarraypool.stats().pending_transfers == pending + 1
    frames = [bytes(f) for f in frames]  # what the recipient reads
    y = deserialize(header, frames)
    assert type(y) is np.ndarray and _core._block_of(y) is not None
    np.testing.assert_array_equal(y, x)
    assert pyarraypool.stats().pending_transfers == pending
    # Loads once: a message deserialized twice cannot share the block.
    with pytest.raises(pyarraypool.StaleHandleError):
        deserialize(header, frames)
    x[0, 0] = -1
    assert y[0, 0] == 0
    # Fortran order and views keep their values.
    for arr in (np.asfortranarray(x), x[:, ::2], x.T):
        z = deserialize(*serialize(arr, context=same))
        assert type(z) is np.ndarray and _core._block_of(z) is not None
        np.testing.assert_array_equal(z, arr)
    del y, z
    # No context (spilling), another pool, too small: bytes, as Dask sends them.
    other = dict(pyarraypool.pool_identity(), instance="0" * 32)
    for arr, ctx in ((x, None), (x, _context(other)), (x[:1], same)):
        header, frames = serialize(arr, context=ctx)
        assert header["type"] == "numpy.ndarray"
        assert sum(memoryview(f).nbytes for f in frames) >= arr.nbytes
        back = deserialize(header, frames)
        assert _core._block_of(back) is None
        np.testing.assert_array_equal(back, arr)
    assert pyarraypool.stats().pending_transfers == pending


class _Unserializable:
    def __reduce__(self):
        raise TypeError("cannot pickle this")


class _NotMsgpack:
    """Plain data msgpack cannot encode: Dask serializes the whole message
    again with a pickle fallback for it (a correct program does this)."""

    def __eq__(self, other):
        return isinstance(other, _NotMsgpack)


def _send(msg: dict) -> list:
    """Writes `msg` on a TCP comm to a listener in this process; what it read."""
    import asyncio

    from distributed.comm import connect, listen

    got: list = []

    async def main() -> None:
        async def handle(comm):
            try:
                got.append(await comm.read())
            except Exception:  # the sender closed without a message
                pass

        async with listen("tcp://127.0.0.1:0", handle) as listener:
            comm = await connect(listener.contact_address)
            try:
                await comm.write(msg, on_error="raise")
                while not got:
                    await asyncio.sleep(0.01)
            finally:
                await comm.close()

    asyncio.run(main())
    return got


def test_a_send_that_fails_gives_the_block_back(client):
    """A message whose serialization fails after an array went by handle
    leaves no pending transfer (it would expire with a warning later)."""
    from distributed.protocol import to_serialize

    base = pyarraypool.stats()
    sent = pdask.counters()["auto_sent_by_handle"]
    msg = {"a": to_serialize(np.ones(MIN_BYTES, dtype=np.uint8)),
           "b": to_serialize(_Unserializable())}
    with pytest.raises(TypeError, match="Could not serialize"):
        _send(msg)
    assert pdask.counters()["auto_sent_by_handle"] > sent  # made, then taken back
    gc.collect()
    after = pyarraypool.stats()
    assert (after.pending_transfers, after.used_bytes) == (
        base.pending_transfers, base.used_bytes)


def test_a_message_serialized_twice_leaves_no_pending_copy(client):
    """Dask serializes a message again when msgpack cannot encode part of it;
    the copies of the first try are never sent and must not stay pending."""
    from distributed.protocol import to_serialize

    base = pyarraypool.stats()
    sent = pdask.counters()["auto_sent_by_handle"]
    (got,) = _send({"a": to_serialize(np.full(MIN_BYTES, 3, dtype=np.uint8)),
                    "b": _NotMsgpack()})
    assert pdask.counters()["auto_sent_by_handle"] == sent + 2  # one per try
    assert got["b"] == _NotMsgpack()
    assert type(got["a"]) is np.ndarray and _core._block_of(got["a"]) is not None
    assert got["a"][0] == 3
    del got
    gc.collect()
    after = pyarraypool.stats()
    assert (after.pending_transfers, after.used_bytes) == (
        base.pending_transfers, base.used_bytes)


# -- turning it off -----------------------------------------------------------


def test_install_without_min_bytes_turns_auto_mode_off(client, workers):
    (w0, w1), before = workers
    base = pyarraypool.stats().used_bytes
    pdask.install(client)
    x = client.submit(make_plain, 2 * MiB, 2, workers=[w0], pure=False)
    got = client.submit(arrival, x, workers=[w1], pure=False).result()
    assert got["type"] == "ndarray" and got["in_pool"] is False
    r = x.result()
    assert _core._block_of(r) is None
    pool = client.submit(make_pool_array, 2 * MiB, 4, workers=[w0], pure=False)
    assert client.submit(describe, pool, workers=[w1], pure=False).result()["type"] == (
        "TransferableArray")
    delta = _delta(client, before)
    assert delta[w0]["auto_sent_by_handle"] == 0 and delta[w0]["sent_by_handle"] == 1
    del r
    _release(base, x, pool)


def test_removing_the_plugin_turns_auto_mode_off_in_the_workers(client, workers):
    (w0, w1), before = workers
    base = pyarraypool.stats().used_bytes
    client.unregister_worker_plugin("pyarraypool")
    x = client.submit(make_plain, 2 * MiB, 2, workers=[w0], pure=False)
    got = client.submit(arrival, x, workers=[w1], pure=False).result()
    assert got["type"] == "ndarray" and got["in_pool"] is False
    assert _delta(client, before)[w0]["auto_sent_by_handle"] == 0
    _release(base, x)


def test_min_bytes_must_be_a_size(client):
    for bad in (-1, 1.5, "1M", True):
        with pytest.raises((TypeError, ValueError)):
            pdask.install(min_bytes=bad)
