"""pyarraypool with multiprocessing and concurrent.futures, under every start method.

Contract points 2, 4, 8 and 10 as users meet them: the seed example, workers
that return pool arrays, arrays sent on from worker to worker, and views
written in place. Each scenario gives back every pool byte once its pool of
workers is closed and joined.
"""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing
import os
import sys

import numpy as np
import pytest
from helpers import REPO

import pyarraypool
from pyarraypool import _core

METHODS = ["fork", "spawn", "forkserver"]

# The seed example, imported as a module (its task must pickle by reference;
# spawned workers inherit sys.path and import it too).
if os.path.join(REPO, "examples") not in sys.path:
    sys.path.insert(0, os.path.join(REPO, "examples"))
import seed_example  # noqa: E402


def settle() -> pyarraypool.PoolStats:
    gc.collect()
    pyarraypool.collect()
    return pyarraypool.stats()


@pytest.fixture
def balance():
    """Checks, inside the test, that the scenario gave back every byte."""
    before = settle()
    yield before
    after = settle()
    assert after.used_bytes == before.used_bytes, (before, after)
    assert after.pending_transfers == before.pending_transfers, (before, after)


# --- worker functions (module level: picklable under spawn/forkserver) -------


def seed_task(x, i, value):
    # The seed example's task, unchanged.
    x[i, :, :] = value


def make_result(i):
    return pyarraypool.make_transferable(np.full((50, 40), float(i)) + np.arange(40.0))


def empty_result(i):
    out = pyarraypool.empty((30, 20), dtype=np.int32)
    out[...] = i
    out[:, 0] = np.arange(30)
    return out


def zeros_like_result(i):
    out = pyarraypool.zeros_like(np.ones((8, 9), dtype=np.int16, order="F"))
    out[i % 8, :] = i
    return out


PRODUCERS = {"make_transferable": make_result, "empty": empty_result,
             "zeros_like": zeros_like_result}


def expected_result(kind, i):
    if kind == "make_transferable":
        return np.full((50, 40), float(i)) + np.arange(40.0)
    if kind == "empty":
        e = np.full((30, 20), i, dtype=np.int32)
        e[:, 0] = np.arange(30)
        return e
    e = np.zeros((8, 9), dtype=np.int16)
    e[i % 8, :] = i
    return e


def produce(args):
    kind, i = args
    return (os.getpid(), PRODUCERS[kind](i))


def identity(arr):
    return arr


def write_marker(arr, value):
    arr[...] = value
    return os.getpid()


def write_and_report(arr, value):
    arr[...] = value
    return type(arr).__name__, arr.shape, arr.strides


def forward_via_queue(arr, q):
    # Worker A: sends the array it received on to worker B, then exits.
    q.put(arr[1:])
    q.put(arr)


def receive_and_write(q, done):
    # Worker B: writes into what worker A sent on.
    part = q.get()
    whole = q.get()
    part[...] = 42.0
    whole[0] = -1.0
    done.put((type(part).__name__, type(whole).__name__))


# --- the seed example ---------------------------------------------------------


def test_seed_example_runs_unchanged(balance):
    # examples/seed_example.py's main() and check(), as they are, under the
    # platform's default start method.
    result = seed_example.main()
    assert isinstance(result, pyarraypool.TransferableArray)
    seed_example.check(result)  # exits (fails the test) if a plane is missing
    expected = np.arange(result.shape[0], dtype=float)[:, None, None]
    assert np.array_equal(result, np.broadcast_to(expected, result.shape))
    del result


@pytest.mark.parametrize("method", METHODS)
def test_seed_example_under_every_start_method(method, balance):
    # The seed example's code, with the pool taken from the context.
    ctx = multiprocessing.get_context(method)
    arr = np.random.random((100, 200, 500))
    I, J, K = arr.shape  # noqa: E741 (the seed's names)
    with ctx.Pool(processes=8) as pool:
        shmarr = pyarraypool.make_transferable(arr)
        pool.starmap(seed_task, [(shmarr, i, i) for i in range(I)])
        pool.close()
        pool.join()
    seed_example.check(shmarr)
    expected = np.arange(I, dtype=float)[:, None, None]
    assert np.array_equal(shmarr, np.broadcast_to(expected, shmarr.shape))
    del shmarr


# --- workers return pool arrays ------------------------------------------------


def _check_results(results, tasks):
    assert len(results) == len(tasks)
    for (kind, i), (pid, arr) in zip(tasks, results, strict=True):
        assert pid != os.getpid()
        assert isinstance(arr, pyarraypool.TransferableArray), type(arr)
        assert _core._block_of(arr) is not None
        np.testing.assert_array_equal(arr, expected_result(kind, i))
        # The parent may write its result, like any array of its own.
        arr[...] = 0


TASKS = [(kind, i) for i in range(6) for kind in PRODUCERS]


@pytest.mark.parametrize("method", METHODS)
def test_pool_imap_returns_pool_arrays(method, balance):
    ctx = multiprocessing.get_context(method)
    pool = ctx.Pool(2)
    try:
        results = list(pool.imap(produce, TASKS))
        results += [pool.apply(produce, (("empty", 99),))]
    finally:
        pool.close()
        pool.join()
    _check_results(results, TASKS + [("empty", 99)])
    del results


# Under fork, the Pool's own worker-handler thread forks the replacement workers:
# what this test is about, and what Python 3.12+ warns of in any program doing it.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("method", METHODS)
def test_pool_with_maxtasksperchild_1_worker_exits_before_result_is_used(method, balance):
    ctx = multiprocessing.get_context(method)
    tasks = TASKS[:6]
    pool = ctx.Pool(2, maxtasksperchild=1)
    try:
        results = list(pool.imap(produce, tasks))
    finally:
        pool.close()
        pool.join()
    # Every task ran in a worker of its own, all of which have exited.
    pids = {pid for pid, _ in results}
    assert len(pids) == len(tasks)
    live = settle().pids
    assert not pids & set(live)
    _check_results(results, tasks)
    del results


@pytest.mark.parametrize("method", METHODS)
def test_process_pool_executor_returns_pool_arrays(method, balance):
    ctx = multiprocessing.get_context(method)
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as ex:
        results = list(ex.map(produce, TASKS))
        fut = ex.submit(produce, ("make_transferable", 7))
        results.append(fut.result())
    _check_results(results, TASKS + [("make_transferable", 7)])
    del results, fut


# (ProcessPoolExecutor refuses max_tasks_per_child under fork.)
@pytest.mark.skipif(sys.version_info < (3, 11),
                    reason="ProcessPoolExecutor takes max_tasks_per_child from Python 3.11 on")
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_process_pool_executor_max_tasks_per_child(method, balance):
    ctx = multiprocessing.get_context(method)
    tasks = TASKS[:4]
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx,
                                                max_tasks_per_child=1) as ex:
        results = list(ex.map(produce, tasks))
    assert len({pid for pid, _ in results}) == len(tasks)
    _check_results(results, tasks)
    del results


def _produce_into_queue(q, kind, i):
    q.put(produce((kind, i)))


@pytest.mark.parametrize("method", METHODS)
def test_result_loaded_only_after_the_worker_is_dead(method, balance):
    # Deterministically: the worker has exited and been joined before the
    # parent unpickles what it sent.
    ctx = multiprocessing.get_context(method)
    q = ctx.Queue()
    procs = [ctx.Process(target=_produce_into_queue, args=(q, kind, 3)) for kind in PRODUCERS]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    st = settle()
    assert not {p.pid for p in procs} & set(st.pids)
    assert st.pending_transfers == balance.pending_transfers + len(procs)
    results = sorted((q.get(timeout=10) for _ in procs), key=lambda r: r[1].shape)
    by_kind = sorted(((k, 3) for k in PRODUCERS), key=lambda t: expected_result(*t).shape)
    _check_results(results, by_kind)
    del results
    q.close()
    q.join_thread()


# --- arrays sent on from worker to worker -----------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_array_returned_by_a_worker_can_be_sent_to_another(method, balance):
    ctx = multiprocessing.get_context(method)
    x = pyarraypool.make_transferable(np.zeros((20, 10)))
    pool = ctx.Pool(2)
    try:
        back = pool.apply(identity, (x,))  # worker A returns what it received
        assert isinstance(back, pyarraypool.TransferableArray)
        assert back.ctypes.data == x.ctypes.data
        view_back = pool.apply(identity, (x[5:, ::2],))
        assert view_back.ctypes.data == x[5:, ::2].ctypes.data
        assert view_back.strides == x[5:, ::2].strides
        # worker B writes into the array worker A returned
        pool.apply(write_marker, (back[2:4], 3.0))
        pool.apply(write_marker, (view_back[0], 5.0))
    finally:
        pool.close()
        pool.join()
    expected = np.zeros((20, 10))
    expected[2:4] = 3.0
    expected[5, ::2] = 5.0
    np.testing.assert_array_equal(x, expected)
    del x, back, view_back


@pytest.mark.parametrize("method", METHODS)
def test_array_passed_from_worker_to_worker_through_a_queue(method, balance):
    ctx = multiprocessing.get_context(method)
    x = pyarraypool.make_transferable(np.zeros(16))
    q, done = ctx.Queue(), ctx.Queue()
    a = ctx.Process(target=forward_via_queue, args=(x, q))
    b = ctx.Process(target=receive_and_write, args=(q, done))
    a.start()
    a.join(timeout=60)  # A has exited before B loads what it sent
    assert a.exitcode == 0
    b.start()
    types = done.get(timeout=60)
    b.join(timeout=60)
    assert b.exitcode == 0
    assert types == ("TransferableArray", "TransferableArray")
    expected = np.full(16, 42.0)
    expected[0] = -1.0
    np.testing.assert_array_equal(x, expected)
    del x
    for qq in (q, done):
        qq.close()
        qq.join_thread()


# --- views are written in place ---------------------------------------------

VIEWS = {
    "x[2:5]": lambda x: x[2:5],
    "x[:, ::2]": lambda x: x[:, ::2],
    "x.T": lambda x: x.T,
    "x[::-2, 1::3]": lambda x: x[::-2, 1::3],
    "x[3]": lambda x: x[3],
    "x[..., 4]": lambda x: x[..., 4],
}


@pytest.mark.parametrize("method", METHODS)
def test_views_sent_to_a_worker_are_written_in_place(method, balance):
    ctx = multiprocessing.get_context(method)
    x = pyarraypool.make_transferable(np.zeros((8, 6)))
    expected = np.zeros((8, 6))
    pool = ctx.Pool(2)
    try:
        for value, (name, make) in enumerate(VIEWS.items(), start=1):
            v = make(x)
            tname, shape, strides = pool.apply(write_and_report, (v, float(value)))
            assert tname == "TransferableArray", name
            assert shape == v.shape and strides == v.strides, name
            make(expected)[...] = value
            np.testing.assert_array_equal(x, expected, err_msg=name)
        # Many views at once, written concurrently by both workers.
        y = pyarraypool.zeros((40, 5))
        pool.starmap(write_marker, [(y[i:i + 4], float(i)) for i in range(0, 40, 4)])
        pool.starmap(write_marker, [(y[::-1].T[j], 0.5 + j) for j in range(0, 5, 2)])
    finally:
        pool.close()
        pool.join()
    exp_y = np.repeat(np.arange(0.0, 40.0, 4.0), 4)[:, None] * np.ones(5)
    for j in range(0, 5, 2):
        exp_y[:, j] = 0.5 + j
    np.testing.assert_array_equal(y, exp_y)
    del x, y, v
