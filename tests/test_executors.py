"""pyarraypool, unchanged, with each standard way of running work in other processes.

multiprocessing.Pool (map, imap, starmap, apply_async), Queue and Pipe, a
Manager dict, concurrent.futures.ProcessPoolExecutor and joblib's loky
backend, under every start method that applies. Each test passes pool
arrays both ways: the parent sends one array by handle and every task writes
its own row of it in place; every task returns a new pool array made by
`empty`, `zeros` or `make_transferable`. The parent then checks the block
the worker saw, every row written, every value returned, and, once the
workers are gone and the arrays dropped, that `stats()` is back where it
started. Then a sender that exits before its receiver first uses the pool,
and `copy.copy`/`copy.deepcopy`: independent plain ndarrays.
"""

from __future__ import annotations

import concurrent.futures
import copy
import gc
import multiprocessing
import multiprocessing.connection
import os
import pickle
import secrets
import subprocess
import sys
import textwrap
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
from helpers import fresh_env, pool_files

import pyarraypool
from pyarraypool import _core

METHODS = ["fork", "spawn", "forkserver"]

# A shared array above joblib's 1 MB auto-memmapping threshold: it must still
# travel by handle, not be dumped to a file or copied.
ROWS, COLS = 16, 10_000

# --- what runs in the workers (module level: picklable under spawn/forkserver)


def block_id(x):
    """The block an array lives in, comparable across processes."""
    b = _core._block_of(x)
    return None if b is None else (b.segment, b.offset, b.generation)


def produce(i):
    """Result `i` as a new pool array, made by one of the three allocators."""
    kind = i % 3
    if kind == 0:
        return pyarraypool.make_transferable(np.arange(i, i + 40, dtype=np.float64).reshape(5, 8))
    if kind == 1:
        out = pyarraypool.empty((7, 3), dtype=np.int32)
        out[...] = np.arange(21, dtype=np.int32).reshape(7, 3) * i
        return out
    out = pyarraypool.zeros(11, dtype=np.uint16)
    out[i % 11] = i
    return out


def expected(i):
    if i % 3 == 0:
        return np.arange(i, i + 40, dtype=np.float64).reshape(5, 8)
    if i % 3 == 1:
        return np.arange(21, dtype=np.int32).reshape(7, 3) * i
    e = np.zeros(11, dtype=np.uint16)
    e[i % 11] = i
    return e


def task(x, i):
    """Writes row `i` of the shared array `x`; returns what it saw and a new pool array."""
    if not isinstance(x, pyarraypool.TransferableArray):
        raise TypeError(f"the worker received a {type(x).__name__}, not a TransferableArray")
    x[i, :] = i + 1
    return os.getpid(), block_id(x), produce(i)


def task_packed(args):
    return task(*args)


def task_on(x):
    """`task` on `x` as a closure: cloudpickle sends it by value, and `x` in it by handle."""

    def run(i):
        return task(x, i)

    return run


def serve_queue(requests, replies):
    # A consumer: runs tasks from one queue until the sentinel None, answers on another.
    while (item := requests.get()) is not None:
        replies.put(task(*item))


def serve_pipe(conn):
    while (item := conn.recv()) is not None:
        conn.send(task(*item))
    conn.close()


def manager_worker(d):
    # Reads what the parent stored, writes into it, stores an array of its own.
    x = d["from_parent"]
    if not isinstance(x, pyarraypool.TransferableArray):
        raise TypeError(type(x).__name__)
    x[...] = 5
    d["seen_by_worker"] = block_id(x)
    d["from_worker"] = pyarraypool.make_transferable(np.arange(10, dtype=np.int64) * 3)


# --- the parent's side ---------------------------------------------------------


def settle():
    gc.collect()
    pyarraypool.collect()
    return pyarraypool.stats()


@pytest.fixture
def stats_back_to_start():
    """After the test, its workers gone and its arrays dropped: `stats()` as before it."""
    start = settle()
    yield
    now = settle()
    assert now.used_bytes == start.used_bytes, (start, now)
    assert now.live_blocks == start.live_blocks, (start, now)
    assert now.pending_transfers == start.pending_transfers, (start, now)


def shared_array():
    x = pyarraypool.zeros((ROWS, COLS), dtype=np.int64)
    assert x.nbytes > 1_000_000
    return x


def check_round_trip(x, indices, results):
    """What the tasks `indices` did to `x` and what they returned."""
    assert len(results) == len(indices)
    for i, (pid, seen, out) in zip(indices, results, strict=True):
        assert pid != os.getpid()
        # The worker had the parent's block itself: the array travelled by handle.
        assert seen == block_id(x), (i, seen, block_id(x))
        # What came back lives in the pool, with the exact values.
        assert isinstance(out, pyarraypool.TransferableArray), (i, type(out))
        assert block_id(out) is not None and block_id(out) != block_id(x)
        assert out.dtype == expected(i).dtype
        np.testing.assert_array_equal(out, expected(i))
    # The worker's writes are in the parent's memory (no copy came back).
    want = np.zeros((ROWS, COLS), dtype=np.int64)
    for i in indices:
        want[i, :] = i + 1
    np.testing.assert_array_equal(x, want)
    # Results returned in the pool are the parent's to use and write.
    for _, _, out in results:
        out[...] = 0


def test_a_pickled_pool_array_is_a_handle_not_the_data():
    x = shared_array()
    data = ForkingPickler.dumps(x)
    assert len(data) < 512, len(data)  # against 1.28 MB of data
    y = pickle.loads(data)  # loading it ends the pending transfer
    assert block_id(y) == block_id(x)
    del x, y


@pytest.mark.parametrize("method", METHODS)
def test_pool_map_imap_starmap_apply_async(method, stats_back_to_start):
    ctx = multiprocessing.get_context(method)
    x = shared_array()
    with ctx.Pool(2) as pool:
        results = pool.map(task_packed, [(x, i) for i in range(0, 4)])
        results += list(pool.imap(task_packed, [(x, i) for i in range(4, 8)]))
        results += pool.starmap(task, [(x, i) for i in range(8, 12)])
        futures = [pool.apply_async(task, (x, i)) for i in range(12, 16)]
        results += [f.get(timeout=60) for f in futures]
        pool.close()
        pool.join()
    check_round_trip(x, range(16), results)


@pytest.mark.parametrize("method", METHODS)
def test_queue_producer_consumer(method, stats_back_to_start):
    ctx = multiprocessing.get_context(method)
    x = shared_array()
    requests, replies = ctx.Queue(), ctx.Queue()
    consumers = [ctx.Process(target=serve_queue, args=(requests, replies)) for _ in range(2)]
    for p in consumers:
        p.start()
    for i in range(ROWS):
        requests.put((x, i))
    for _ in consumers:
        requests.put(None)
    results = [replies.get(timeout=60) for _ in range(ROWS)]
    for p in consumers:
        p.join(timeout=60)
        assert p.exitcode == 0
    for q in (requests, replies):
        q.close()
        q.join_thread()
    # Replies come in any order: match each to its task by the row it wrote.
    by_task = {}
    for r in results:
        by_task[task_index_of(r[2])] = r
    assert sorted(by_task) == list(range(ROWS))
    check_round_trip(x, range(ROWS), [by_task[i] for i in range(ROWS)])


def task_index_of(out):
    """Which task made `out` (the values of `expected(i)` tell i apart)."""
    matches = [i for i in range(ROWS)
               if out.shape == expected(i).shape and np.array_equal(out, expected(i))]
    assert len(matches) == 1, out
    return matches[0]


@pytest.mark.parametrize("method", METHODS)
def test_pipe_both_ways(method, stats_back_to_start):
    ctx = multiprocessing.get_context(method)
    x = shared_array()
    parent_end, child_end = ctx.Pipe()
    p = ctx.Process(target=serve_pipe, args=(child_end,))
    p.start()
    child_end.close()
    results = []
    for i in range(ROWS):
        parent_end.send((x, i))
        results.append(parent_end.recv())
    parent_end.send(None)
    p.join(timeout=60)
    assert p.exitcode == 0
    parent_end.close()
    check_round_trip(x, range(ROWS), results)


@pytest.mark.parametrize("method", METHODS)
def test_manager_dict(method, stats_back_to_start):
    ctx = multiprocessing.get_context(method)
    x = pyarraypool.zeros(10, dtype=np.int64)
    with ctx.Manager() as manager:
        d = manager.dict()
        d["from_parent"] = x
        worker = ctx.Process(target=manager_worker, args=(d,))
        worker.start()
        worker.join(timeout=60)
        assert worker.exitcode == 0
        # The worker wrote into the parent's array through what the manager held.
        assert d["seen_by_worker"] == block_id(x)
        np.testing.assert_array_equal(x, np.full(10, 5))
        # And the manager keeps the worker's array by handle: the parent's
        # write shows in what it reads back next.
        y = d["from_worker"]
        assert isinstance(y, pyarraypool.TransferableArray)
        np.testing.assert_array_equal(y, np.arange(10) * 3)
        y[0] = -1
        again = d["from_worker"]
        assert again[0] == -1 and block_id(again) == block_id(y)
        # The parent's own array, read back from the manager, is the same memory.
        back = d["from_parent"]
        assert block_id(back) == block_id(x)
        back[9] = 99
        assert x[9] == 99
        del d, back, again


@pytest.mark.parametrize("method", METHODS)
def test_process_pool_executor_with_mp_context(method, stats_back_to_start):
    ctx = multiprocessing.get_context(method)
    x = shared_array()
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as ex:
        futures = [ex.submit(task, x, i) for i in range(0, 8)]
        results = [f.result(timeout=60) for f in futures]
        results += list(ex.map(task, [x] * 8, range(8, 16), chunksize=3))
    check_round_trip(x, range(16), results)


def test_joblib_loky_backend(stats_back_to_start):
    # Imported here, not by the workers that load this module to find `task`.
    import joblib
    from joblib.externals.loky import get_reusable_executor

    x = shared_array()
    try:
        parallel = joblib.Parallel(n_jobs=2, backend="loky")
        results = parallel(joblib.delayed(task)(x, i) for i in range(0, 8))
        results += parallel(joblib.delayed(task_on(x))(i) for i in range(8, 16))
    finally:
        # loky keeps its workers alive for the next call: stop them, or they
        # would hold the pool after the tests end.
        get_reusable_executor(reuse=True).shutdown(wait=True)
    check_round_trip(x, range(16), results)


# A pickle in flight keeps the pool itself alive, not only its block: the
# sender may be the only process that has used the pool when it exits, before
# the receiver (here a parent that has only imported pyarraypool) loads what
# it sent. Contract points 8 and 12. A separate program, so that the parent
# really has not attached (the pytest process has).
SENDER_EXITS_FIRST = """
    import multiprocessing, sys
    import numpy as np
    import pyarraypool

    def child(q):
        a = pyarraypool.empty(1000, dtype=np.uint8)
        a[...] = 7
        q.put(a)

    if __name__ == "__main__":
        multiprocessing.set_start_method(sys.argv[1])
        q = multiprocessing.Queue()
        p = multiprocessing.Process(target=child, args=(q,))
        p.start()
        p.join()
        a = q.get(timeout=30)
        assert isinstance(a, pyarraypool.TransferableArray) and (a == 7).all()
        del a
        print("used", pyarraypool.stats().used_bytes)
"""


@pytest.mark.parametrize("method", METHODS)
def test_pickle_sent_by_the_only_attached_process_survives_its_exit(method, tmp_path):
    token = secrets.token_hex(16)
    script = tmp_path / "sender_exits_first.py"
    script.write_text(textwrap.dedent(SENDER_EXITS_FIRST))
    proc = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True,
                          timeout=120, env=fresh_env(PYARRAYPOOL_POOL=token))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "used 0"
    assert pool_files(token) == []


# --- copy.copy / copy.deepcopy --------------------------------------------------
# tests/test_sharing.py checks that a copy of a whole pool array is a plain,
# independent ndarray that does not keep the block alive. Here: writes to the
# copy, views, 0-d arrays, layouts and containers.

VIEWS = {
    "x": lambda x: x,
    "x[::2]": lambda x: x[::2],
    "x.T": lambda x: x.T,
    "x[1:, ::-2]": lambda x: x[1:, ::-2],
    "x[..., 0]": lambda x: x[..., 0],
    "x[2, 3, ...] (0-d)": lambda x: x[2, 3, ...],
}


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy], ids=["copy", "deepcopy"])
@pytest.mark.parametrize("view", list(VIEWS))
def test_copy_of_a_pool_array_or_view_is_an_independent_plain_ndarray(how, view):
    x = pyarraypool.make_transferable(np.arange(24.0).reshape(4, 6))
    plain = np.arange(24.0).reshape(4, 6)
    v = VIEWS[view](x)
    assert isinstance(v, pyarraypool.TransferableArray)
    c = how(v)
    want = how(VIEWS[view](plain))  # numpy's own copy of the same view
    assert type(c) is np.ndarray, type(c)
    assert block_id(c) is None
    assert not np.shares_memory(c, x)
    # The same values and the same layout as numpy's copy.
    assert c.shape == want.shape and c.strides == want.strides and c.dtype == want.dtype
    np.testing.assert_array_equal(c, want)
    # Writes to the copy leave the pool array alone ...
    c[...] = -1.0
    np.testing.assert_array_equal(x, plain)
    # ... and writes to the pool array leave the copy alone.
    c[...] = want
    x[...] = 7.0
    np.testing.assert_array_equal(c, want)
    del x, v


def test_deepcopy_of_a_container_copies_every_pool_array():
    x = pyarraypool.make_transferable(np.arange(12, dtype=np.int32).reshape(3, 4))
    original = {"a": x, "again": x, "view": x[1:, ::2], "nested": [x[0]], "other": 5}
    live = settle().live_blocks
    d = copy.deepcopy(original)
    assert settle().live_blocks == live  # nothing new in the pool
    for key in ("a", "view"):
        assert type(d[key]) is np.ndarray, (key, type(d[key]))
        assert not np.shares_memory(d[key], x)
    assert type(d["nested"][0]) is np.ndarray
    # deepcopy's memo: one array twice in the container is one copy twice.
    assert d["again"] is d["a"]
    np.testing.assert_array_equal(d["view"], np.arange(12).reshape(3, 4)[1:, ::2])
    d["a"][...] = 0
    d["view"][...] = 0
    d["nested"][0][...] = 0
    np.testing.assert_array_equal(x, np.arange(12).reshape(3, 4))
    x[...] = -3
    assert (d["view"] == 0).all() and (d["nested"][0] == 0).all()
    # The copies hold nothing of the pool: the block goes when x does.
    del x, original
    assert settle().live_blocks == live - 1
    # And they pickle by value: nothing pending.
    pending = settle().pending_transfers
    assert pickle.loads(pickle.dumps(d))["view"].tolist() == [[0, 0], [0, 0]]
    assert settle().pending_transfers == pending


def test_copy_methods_document_the_type_they_return():
    for method in (pyarraypool.TransferableArray.__copy__,
                   pyarraypool.TransferableArray.__deepcopy__):
        assert "plain numpy.ndarray" in (method.__doc__ or ""), method.__doc__
