"""Lifetime: when a block stays alive and when it is freed.

Contract points 7-13 (see /work/shared/guide/contract.md), within one process
and with child processes (fork, spawn, forkserver, os.fork, subprocesses).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, my_pool_token, pool_files, run_python

import pyarraypool
from pyarraypool import _core


def settle() -> pyarraypool.PoolStats:
    gc.collect()
    pyarraypool.collect()
    return pyarraypool.stats()


def block_of(arr):
    return _core._block_of(arr)


def scribble(n: int, count: int = 4) -> list:
    """New allocations the size of a freed block, filled with -1: they would
    overwrite a block that was wrongly freed."""
    return [pyarraypool.make_transferable(np.full(n, -1, dtype=np.int64)) for _ in range(count)]


# --- point 7: every kind of reference keeps the block alive -----------------

HOLDERS = {
    "view": lambda x: x[2:500],
    "strided negative view": lambda x: x[::-3],
    "view of a view": lambda x: x[10:][::2][5:],
    "reshape": lambda x: x.reshape(8, -1),
    "x.view(other dtype)": lambda x: x.view(np.uint8),
    "memoryview": memoryview,
    "memoryview of a view": lambda x: memoryview(x[1:9]),
    "np.asarray": np.asarray,
    "view of np.asarray": lambda x: np.asarray(x)[::2],
    "np.frombuffer": lambda x: np.frombuffer(x, dtype=np.int64),
    "np.asarray(memoryview)": lambda x: np.asarray(memoryview(x)),
    "loaded pickle": lambda x: pickle.loads(pickle.dumps(x)),
    "list holding a view": lambda x: [x[3:]],
}


def _values(holder) -> bytes:
    if isinstance(holder, list):
        holder = holder[0]
    return np.asarray(holder).tobytes()


@pytest.mark.parametrize("name", list(HOLDERS))
def test_block_lives_while_any_reference_lives(name):
    before = settle()
    src = np.arange(1024, dtype=np.int64)
    x = pyarraypool.make_transferable(src)
    holder = HOLDERS[name](x)
    expected = _values(holder)
    del x
    mid = settle()
    assert mid.live_blocks == before.live_blocks + 1
    assert mid.used_bytes > before.used_bytes
    others = scribble(1024)
    assert _values(holder) == expected, "the block was freed and reused"
    del others
    del holder
    after = settle()
    assert after.live_blocks == before.live_blocks
    assert after.used_bytes == before.used_bytes


def test_block_freed_only_when_the_last_of_several_references_goes():
    before = settle()
    x = pyarraypool.make_transferable(np.arange(256.0))
    refs = [x[1:], memoryview(x), np.asarray(x), pickle.loads(pickle.dumps(x))]
    del x
    while refs:
        assert settle().live_blocks == before.live_blocks + 1
        refs.pop(0)
    after = settle()
    assert (after.used_bytes, after.live_blocks) == (before.used_bytes, before.live_blocks)


def test_block_without_transfer_is_freed_when_dropped():
    before = settle()
    for tr in (True, False):
        x = pyarraypool.make_transferable(np.arange(1000.0), transfer_required=tr)
        assert pyarraypool.stats().live_blocks == before.live_blocks + 1
        del x
        # No gc or collect needed: plain reference counting frees it.
        st = pyarraypool.stats()
        assert (st.used_bytes, st.live_blocks) == (before.used_bytes, before.live_blocks)
        e = pyarraypool.empty(100, transfer_required=tr)
        del e
        st = pyarraypool.stats()
        assert (st.used_bytes, st.live_blocks) == (before.used_bytes, before.live_blocks)


# --- point 8: a pickle in flight keeps the block alive ------------------------


def test_pickle_keeps_block_alive_after_sender_drops_everything():
    before = settle()
    x = pyarraypool.make_transferable(np.arange(1024, dtype=np.int64))
    s = pickle.dumps(x)
    del x
    mid = settle()
    assert mid.live_blocks == before.live_blocks + 1
    assert mid.pending_transfers == before.pending_transfers + 1
    assert mid.pending_blocks == before.pending_blocks + 1
    others = scribble(1024)
    y = pickle.loads(s)
    assert isinstance(y, pyarraypool.TransferableArray)
    np.testing.assert_array_equal(y, np.arange(1024))
    st = pyarraypool.stats()
    assert st.pending_transfers == before.pending_transfers
    assert st.pending_blocks == before.pending_blocks
    del others
    assert settle().live_blocks == before.live_blocks + 1  # y holds it
    del y
    after = settle()
    assert (after.used_bytes, after.live_blocks) == (before.used_bytes, before.live_blocks)


def test_every_pickle_in_flight_counts():
    before = settle()
    x = pyarraypool.make_transferable(np.arange(64.0))
    s1 = pickle.dumps(x)
    s2 = pickle.dumps(x[::2])  # a view's pickle counts for its block
    del x
    assert settle().pending_transfers == before.pending_transfers + 2
    y1 = pickle.loads(s1)
    del y1
    # s2 is not loaded yet: the block must survive.
    mid = settle()
    assert mid.live_blocks == before.live_blocks + 1
    assert mid.pending_transfers == before.pending_transfers + 1
    others = scribble(64)
    y2 = pickle.loads(s2)
    np.testing.assert_array_equal(y2, np.arange(0.0, 64.0, 2.0))
    del y2, others
    after = settle()
    assert (after.used_bytes, after.live_blocks, after.pending_transfers) == (
        before.used_bytes, before.live_blocks, before.pending_transfers)


def test_pickle_loaded_twice_in_one_process_shares_one_block():
    before = settle()
    x = pyarraypool.make_transferable(np.arange(100, dtype=np.int32))
    s = pickle.dumps(x)
    del x
    y1 = pickle.loads(s)
    y2 = pickle.loads(s)
    assert y1.ctypes.data == y2.ctypes.data
    assert block_of(y1) is block_of(y2)
    st = settle()
    assert st.live_blocks == before.live_blocks + 1
    assert st.pending_transfers == before.pending_transfers
    y1[7] = -7
    assert y2[7] == -7
    del y1
    assert settle().live_blocks == before.live_blocks + 1
    np.testing.assert_array_equal(y2[8:], np.arange(8, 100))
    del y2
    after = settle()
    assert (after.used_bytes, after.live_blocks) == (before.used_bytes, before.live_blocks)


# --- point 9: transfer_required=False ----------------------------------------


def test_transfer_not_required_frees_at_once_and_the_pickle_goes_stale():
    before = settle()
    x = pyarraypool.make_transferable(np.arange(500.0), transfer_required=False)
    s = pickle.dumps(x)
    assert pyarraypool.stats().pending_transfers == before.pending_transfers
    # While x lives, the pickle loads fine and shares x's memory.
    y = pickle.loads(s)
    assert y.ctypes.data == x.ctypes.data
    del y
    del x
    st = pyarraypool.stats()  # no collect needed
    assert (st.used_bytes, st.live_blocks) == (before.used_bytes, before.live_blocks)
    with pytest.raises(pyarraypool.StaleHandleError):
        pickle.loads(s)
    assert issubclass(pyarraypool.StaleHandleError, pyarraypool.PoolError)


def test_transfer_not_required_view_pickle_goes_stale_too():
    x = pyarraypool.empty((10, 10), transfer_required=False)
    s = pickle.dumps(x[2:5, ::3])
    del x
    with pytest.raises(pyarraypool.StaleHandleError):
        pickle.loads(s)


# --- point 11: a handle to freed and reused memory is stale -------------------


@pytest.mark.parametrize("transfer_required", [True, False])
def test_stale_handle_never_returns_the_new_arrays_bytes(transfer_required):
    before = settle()
    x = pyarraypool.make_transferable(np.full(1000, 1.0), transfer_required=transfer_required)
    old = block_of(x)
    old_where = (old.segment, old.offset, old.address, old.generation)
    del old
    s = pickle.dumps(x[10:20])
    if transfer_required:
        pickle.loads(s)  # consume the pending count; the result is dropped at once
    del x
    assert settle().used_bytes == before.used_bytes
    # New arrays of the same size, until one reuses the very same memory.
    news = []
    for _ in range(64):
        news.append(pyarraypool.make_transferable(np.full(1000, 2.0)))
        b = block_of(news[-1])
        if (b.segment, b.offset, b.address) == old_where[:3]:
            assert b.generation != old_where[3]
            break
    else:
        pytest.fail("precondition: the pool never reused the freed block")
    del b
    with pytest.raises(pyarraypool.StaleHandleError):
        pickle.loads(s)
    for y in news:
        np.testing.assert_array_equal(y, 2.0)
    del news, y
    assert settle().used_bytes == before.used_bytes


def test_many_generations_only_the_live_one_loads():
    pickles = []
    for i in range(20):
        x = pyarraypool.make_transferable(np.full(100, float(i)), transfer_required=False)
        pickles.append(pickle.dumps(x))
        if i < 19:
            del x
    for s in pickles[:-1]:
        with pytest.raises(pyarraypool.StaleHandleError):
            pickle.loads(s)
    y = pickle.loads(pickles[-1])
    np.testing.assert_array_equal(y, 19.0)
    assert y.ctypes.data == x.ctypes.data


# --- children: module-level functions (picklable for spawn/forkserver) -------


def _child_pool_info(q):
    a = pyarraypool.empty(10)  # allocates before it has seen any handle
    a[:] = 7.0
    q.put((os.getpid(), _core._pool_token(), pyarraypool.stats().pids, a))


def _grandparent(q, method):
    ctx = multiprocessing.get_context(method)
    p = ctx.Process(target=_child_pool_info, args=(q,))
    p.start()
    p.join()
    q.put(("middle", os.getpid(), _core._pool_token()))


def _hold_and_return(conn):
    arr = conn.recv()
    conn.send("got it")
    conn.recv()  # the parent has dropped every reference now
    ok = bytes(arr.view(np.uint8)) == np.arange(arr.size, dtype=np.int64).tobytes()
    arr[0] = -1
    conn.send((ok, arr))
    conn.close()


def _send_and_exit(conn, transfer_required):
    x = pyarraypool.make_transferable(np.arange(1000, dtype=np.int64) * 3,
                                      transfer_required=transfer_required)
    conn.send(x)
    conn.close()


# --- point 12: one program, one pool ------------------------------------------


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_child_that_allocates_first_uses_the_parents_pool(method):
    token = my_pool_token()
    before = settle()
    ctx = multiprocessing.get_context(method)
    q = ctx.Queue()
    p = ctx.Process(target=_child_pool_info, args=(q,))
    p.start()
    pid, child_token, child_pids, arr = q.get(timeout=60)
    p.join(timeout=60)
    assert p.exitcode == 0
    assert child_token == token
    assert os.getpid() in child_pids and pid in child_pids
    # The child's allocation lives in our pool: we can load it after it exited.
    assert isinstance(arr, pyarraypool.TransferableArray)
    np.testing.assert_array_equal(arr, 7.0)
    del arr
    q.close()
    after = settle()
    assert after.used_bytes == before.used_bytes
    assert pid not in after.pids


def test_grandchild_uses_the_same_pool():
    token = my_pool_token()
    # The queue belongs to the grandchild's context; the middle child is forked.
    q = multiprocessing.get_context("spawn").Queue()
    p = multiprocessing.get_context("fork").Process(target=_grandparent, args=(q, "spawn"))
    p.start()
    pid, child_token, child_pids, arr = q.get(timeout=60)
    tag, middle_pid, middle_token = q.get(timeout=60)
    p.join(timeout=60)
    assert p.exitcode == 0
    assert tag == "middle" and middle_token == token
    assert child_token == token
    assert os.getpid() in child_pids
    np.testing.assert_array_equal(arr, 7.0)
    del arr
    q.close()


def test_subprocess_started_by_the_program_uses_the_same_pool():
    token = my_pool_token()
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    code = ("import pyarraypool, pyarraypool._core as c; a = pyarraypool.empty(3); "
            "print(c._pool_token()); print(len(pyarraypool.stats().pids))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert out[0] == token
    assert int(out[1]) >= 2  # it saw us in the pool


def test_unrelated_program_gets_a_separate_pool():
    token = my_pool_token()
    out = run_python("""
        import pyarraypool, pyarraypool._core as c
        a = pyarraypool.make_transferable(list(range(10)))
        print(c._pool_token())
        print(" ".join(str(p) for p in pyarraypool.stats().pids))
    """).stdout.split("\n")
    other = out[0].strip()
    assert len(other) == 32 and other != token
    # Compared as numbers: as text, our pid 772 was "in" its pid 7727.
    assert os.getpid() not in [int(p) for p in out[1].split()]
    # Our pool did not see it, and it cleaned up after itself.
    assert pool_files(other) == []
    assert pool_files(token) != []


# --- point 7 across processes -------------------------------------------------


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_child_that_loaded_a_handle_keeps_the_block_alive(method):
    before = settle()
    ctx = multiprocessing.get_context(method)
    x = pyarraypool.make_transferable(np.arange(2048, dtype=np.int64))
    parent_conn, child_conn = ctx.Pipe()
    p = ctx.Process(target=_hold_and_return, args=(child_conn,))
    p.start()
    child_conn.close()
    parent_conn.send(x)
    assert parent_conn.recv() == "got it"
    del x
    mid = settle()
    assert mid.live_blocks == before.live_blocks + 1
    assert mid.pending_transfers == before.pending_transfers
    others = scribble(2048)
    parent_conn.send("go")
    ok, arr = parent_conn.recv()
    p.join(timeout=60)
    assert p.exitcode == 0
    assert ok, "the child read the wrong bytes after the parent dropped the array"
    assert arr[0] == -1
    np.testing.assert_array_equal(arr[1:], np.arange(1, 2048))
    del arr, others
    parent_conn.close()
    after = settle()
    assert (after.used_bytes, after.live_blocks) == (before.used_bytes, before.live_blocks)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_sender_may_exit_before_the_pickle_is_loaded(method):
    before = settle()
    ctx = multiprocessing.get_context(method)
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_send_and_exit, args=(child_conn, True))
    p.start()
    child_conn.close()
    p.join(timeout=60)
    assert p.exitcode == 0
    mid = settle()  # reclaims whatever the dead child held
    assert p.pid not in mid.pids
    assert mid.live_blocks == before.live_blocks + 1
    assert mid.pending_transfers == before.pending_transfers + 1
    others = scribble(1000)
    y = parent_conn.recv()
    assert isinstance(y, pyarraypool.TransferableArray)
    np.testing.assert_array_equal(y, np.arange(1000) * 3)
    del y, others
    parent_conn.close()
    after = settle()
    assert (after.used_bytes, after.live_blocks, after.pending_transfers) == (
        before.used_bytes, before.live_blocks, before.pending_transfers)


def test_sender_exit_without_transfer_required_makes_the_pickle_stale():
    before = settle()
    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_send_and_exit, args=(child_conn, False))
    p.start()
    child_conn.close()
    p.join(timeout=60)
    assert p.exitcode == 0
    mid = settle()
    assert (mid.used_bytes, mid.live_blocks) == (before.used_bytes, before.live_blocks)
    with pytest.raises(pyarraypool.StaleHandleError):
        parent_conn.recv()
    parent_conn.close()


# --- point 13: os.fork() --------------------------------------------------------


def _fork(child_body, *args):
    """Runs child_body(*args) in a child made by os.fork(); it returns the
    child's exit code. Returns the child's pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 99
        try:
            code = child_body(*args)
        finally:
            os._exit(code)
    return pid


def test_forked_child_keeps_an_inherited_array_alive():
    before = settle()
    x = pyarraypool.make_transferable(np.arange(4096, dtype=np.int64))
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()

    def child(arr):
        os.close(go_w)
        os.close(res_r)
        os.read(go_r, 1)  # the parent has dropped x and collected
        ok = arr.tobytes() == np.arange(4096, dtype=np.int64).tobytes()
        os.write(res_w, b"1" if ok else b"0")
        return 0

    pid = _fork(child, x)
    os.close(go_r)
    os.close(res_w)
    try:
        del x
        mid = settle()
        assert pid in mid.pids
        assert mid.live_blocks == before.live_blocks + 1, "freed while a forked child holds it"
        others = scribble(4096)
        os.write(go_w, b"g")
        answer = os.read(res_r, 1)
    finally:
        os.close(go_w)
        _, status = os.waitpid(pid, 0)
        os.close(res_r)
    assert os.waitstatus_to_exitcode(status) == 0
    assert answer == b"1", "the forked child read bytes that were not its array's"
    del others
    # The child is dead (it left by os._exit): collect() reclaims its hold.
    after = settle()
    assert pid not in after.pids
    assert (after.used_bytes, after.live_blocks) == (before.used_bytes, before.live_blocks)


def test_forked_child_dropping_its_inherited_array_releases_it():
    before = settle()
    holder = [pyarraypool.make_transferable(np.arange(512.0))]
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()

    def child(refs):
        os.close(go_w)
        os.close(done_r)
        refs.clear()
        gc.collect()
        os.write(done_w, b"d")
        os.read(go_r, 1)  # stay alive until the parent has checked
        return 0

    pid = _fork(child, holder)
    os.close(go_r)
    os.close(done_w)
    try:
        assert os.read(done_r, 1) == b"d"
        holder.clear()
        # The child is alive but dropped its reference: the block is free.
        st = settle()
        assert pid in st.pids
        assert (st.used_bytes, st.live_blocks) == (before.used_bytes, before.live_blocks)
    finally:
        os.write(go_w, b"g")
        os.close(go_w)
        os.waitpid(pid, 0)
        os.close(done_r)


def test_forked_child_does_not_hold_blocks_made_after_the_fork():
    # The child's holds are taken at the instant of the fork: an array the
    # parent makes afterwards is not held by the child.
    before = settle()
    r, w = os.pipe()

    def child():
        os.close(w)
        os.read(r, 1)
        return 0

    pid = _fork(child)
    os.close(r)
    try:
        y = pyarraypool.make_transferable(np.arange(100.0))
        del y
        st = settle()
        assert (st.used_bytes, st.live_blocks) == (before.used_bytes, before.live_blocks)
    finally:
        os.write(w, b"g")
        os.close(w)
        os.waitpid(pid, 0)
