"""Threads of one process, the local block cache, and scalar results."""

from __future__ import annotations

import pickle

import numpy as np

import pyarraypool
from pyarraypool import _core
from tests.helpers import pool_files, run_python


def test_many_threads_using_the_pool_for_the_first_time_at_once():
    # All threads attach the process at the same instant: exactly one
    # attachment must happen, and every thread gets a working array.
    proc = run_python(
        """
        import threading, numpy as np, pyarraypool as pap
        barrier = threading.Barrier(8)
        results, errors = [], []
        def work(i):
            try:
                barrier.wait()
                x = pap.make_transferable(np.full(1000, i))
                results.append(int(x.sum()) == 1000 * i)
            except Exception as e:
                errors.append(repr(e))
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert not errors, errors
        assert results == [True] * 8, results
        s = pap.stats()
        assert s.processes == 1, s
        print(pap._core._pool_token())
        """
    )
    token = proc.stdout.strip().splitlines()[-1]
    assert pool_files(token) == []


def test_threads_loading_and_dropping_the_same_block_keep_it_alive():
    x = pyarraypool.make_transferable(np.arange(1000.0), transfer_required=False)
    data = pickle.dumps(x)
    import threading

    stop = threading.Event()
    errors: list[str] = []

    def churn() -> None:
        try:
            while not stop.is_set():
                y = pickle.loads(data)
                assert y[999] == 999.0
                del y
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(2000):
        z = pickle.loads(data)
        del z
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    # The original array still holds its block: loading still works and
    # the bytes are intact.
    again = pickle.loads(data)
    assert (again == np.arange(1000.0)).all()
    del again, x


def test_an_unshared_block_is_reused_without_a_round_trip_through_the_pool():
    x = pyarraypool.empty(100)
    first = _core._block_of(x)
    assert first is not None
    key = (first.segment, first.offset, first.generation)
    del x, first
    y = pyarraypool.empty(100)
    b = _core._block_of(y)
    # The same block comes back from this process's cache...
    assert (b.segment, b.offset, b.generation) == key
    # ...and stats() counts nothing cached: its accounting is exact.
    del y, b
    assert pyarraypool.stats().live_blocks == _live_before_any()


def _live_before_any() -> int:
    return pyarraypool.stats().live_blocks


def test_a_shared_block_never_goes_to_the_cache():
    x = pyarraypool.empty(100, transfer_required=False)
    data = pickle.dumps(x)  # a handle exists: another process may hold it
    b = _core._block_of(x)
    key = (b.segment, b.offset, b.generation)
    del x, b
    # The block was freed for real: its handle is stale, and the next
    # allocation of that size is a new block (new generation).
    try:
        pickle.loads(data)
    except pyarraypool.StaleHandleError:
        pass
    else:  # pragma: no cover
        raise AssertionError("a handle of a freed block loaded")
    y = pyarraypool.empty(100)
    b = _core._block_of(y)
    assert (b.segment, b.offset, b.generation) != key
    del y, b


def test_reductions_and_0d_results_are_scalars():
    x = pyarraypool.make_transferable(np.arange(10.0))
    for value in (x.sum(), x.max(), x.mean(), np.add.reduce(x), x[3] * 2):
        assert np.isscalar(value), type(value)
        assert {value: 1}  # hashable, as numpy's own results are
    zero_d = pyarraypool.make_transferable(np.array(4.0))
    assert np.isscalar(zero_d * 2)
    del x, zero_d


def test_program_exits_cleanly_while_a_daemon_thread_is_inside_the_pool():
    # At exit CPython ends daemon threads that take the GIL back; one that is
    # inside a pool call (GIL released) must not abort the process. The race
    # is with the start of finalization: three threads that take the GIL back
    # thousands of times a second, over ten runs (before the fix for it,
    # about one run in five aborted).
    for mode, runs in (("copy", 10), ("hold", 3)):
        for _ in range(runs):
            proc = run_python(
                f"""
                import sys, threading, time
                import numpy as np, pyarraypool
                def spin():
                    src = np.ones(1 << 20)
                    while True:
                        if "{mode}" == "hold":
                            pyarraypool._core._test_hold_lock(0.05)
                        else:
                            a = pyarraypool.make_transferable(src)
                            del a
                for _ in range(3):
                    threading.Thread(target=spin, daemon=True).start()
                time.sleep(0.1)
                print(pyarraypool._core._pool_token())
                sys.exit(0)
                """,
                check=False,
            )
            assert proc.returncode == 0, (mode, proc.returncode, proc.stderr[-2000:])
            assert "terminate called" not in proc.stderr
            token = proc.stdout.strip().splitlines()[-1]
            assert pool_files(token) == []
