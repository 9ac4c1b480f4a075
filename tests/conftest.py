"""Shared fixtures.

Every test runs inside the pytest process's pool (one program, one pool) and
must give back every byte it took: the autouse fixture below checks that
`stats().used_bytes` is where it was before the test, after a garbage
collection and a `collect()`. Tests that need a pool of their own, other
settings, or that kill processes run Python in a subprocess with a fresh
pool name (see `helpers.run_python`).
"""

from __future__ import annotations

import gc
import os
import signal
import sys

import pytest

import pyarraypool

# A shell without job control starts background commands with SIGINT
# ignored, and an ignored signal stays ignored across exec: every program a
# test starts would then shrug off the Ctrl-C it sends them (the `stats
# --watch` tests). The tests send SIGINT on purpose, so it gets Python's
# handler here, and the programs they start get the default disposition.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def pool_balance():
    gc.collect()
    pyarraypool.collect()
    before = pyarraypool.stats()
    yield
    # A failed test's traceback keeps its frames, and so its arrays, alive:
    # drop it so that one failure is not reported again as a leak.
    sys.last_type = sys.last_value = sys.last_traceback = None
    gc.collect()
    pyarraypool.collect()
    after = pyarraypool.stats()
    assert after.used_bytes == before.used_bytes, (
        f"the test leaked pool memory: used_bytes {before.used_bytes} -> {after.used_bytes}, "
        f"live_blocks {before.live_blocks} -> {after.live_blocks}, "
        f"pending_transfers {before.pending_transfers} -> {after.pending_transfers}"
    )
    pyarraypool._core._verify()


@pytest.fixture
def shm_names():
    """Names in /dev/shm that belong to pyarraypool, as a function."""

    def names() -> set[str]:
        return {n for n in os.listdir("/dev/shm") if n.startswith("pyarraypool-")}

    return names


def pytest_collection_modifyitems(session, config, items):
    """Dask's test modules run last. A Dask client leaves threads behind in
    this process (distributed's offload executor and its IO loop), and every
    fork after them would fork a multi-threaded process: a child can then
    deadlock on a lock one of those threads held, and Python 3.12+ warns
    (DeprecationWarning: "use of fork() may lead to deadlocks in the child").
    The sort is stable: the order within each group stays as collected."""
    items.sort(key=lambda item: os.path.basename(str(item.path)).startswith("test_dask"))
