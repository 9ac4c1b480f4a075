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
import sys

import pytest

import pyarraypool


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
