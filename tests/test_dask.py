"""pyarraypool.dask: pool arrays between Dask processes by handle within a pool, by value otherwise.

The LocalCluster's workers are spawned from this test process and inherit its
pool name, so the whole cluster (client, in-process scheduler, workers)
shares the pytest process's pool and the autouse balance check covers the
workers' memory too.
"""

from __future__ import annotations

import gc
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from distributed import Client, LocalCluster  # noqa: E402
from distributed.protocol import (  # noqa: E402
    deserialize,
    deserialize_bytes,
    serialize,
    serialize_bytelist,
)
from helpers import fresh_env, group_alive, run_python  # noqa: E402

import pyarraypool  # noqa: E402
import pyarraypool.dask as pdask  # noqa: E402
from pyarraypool import _dask_meter  # noqa: E402

MiB = 1 << 20


def _pool_names() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("pyarraypool-")}


def _wait_until(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- functions run on the workers ---------------------------------------------


def make_pool_array(nbytes: int, fill: int) -> pyarraypool.TransferableArray:
    x = pyarraypool.empty(nbytes, dtype=np.uint8)
    x[:] = fill
    return x


def pickle_and_drop(x: np.ndarray) -> int:
    """A handle made and never loaded, as a transfer Dask retried leaves one."""
    return len(pickle.dumps(x))


def describe(x: np.ndarray) -> dict:
    return {
        "type": type(x).__name__,
        "nbytes": int(x.nbytes),
        "first": int(x[0]),
        "last": int(x[-1]),
        "pool": pyarraypool.pool_identity()["instance"],
    }


def write_first(x: np.ndarray, value: int) -> int:
    x[0] = value
    return int(x[0])


def read_first(x: np.ndarray, _after: object = None) -> int:
    return int(x[0])


def reset_counters() -> None:
    _dask_meter.start()


def pool_used_after_gc() -> int:
    gc.collect()
    return pyarraypool.stats().used_bytes


def allocate_until_killed(chunk: int, limit: int) -> int:
    # Keeps touching pool memory (it counts in the worker's RSS) until the
    # nanny's memory monitor terminates this worker; bounded so that a
    # missing kill fails the test instead of filling /dev/shm.
    held = []
    for _ in range(limit // chunk):
        x = pyarraypool.empty(chunk, dtype=np.uint8)
        x[:] = 1
        held.append(x)
        time.sleep(0.02)
    return len(held)


# -- fixtures -------------------------------------------------------------------

# Tokens of the pools the clusters of this module used. Other test runs may
# come and go in /dev/shm meanwhile, so only these are checked.
_cluster_tokens: set[str] = set()


def _note_pools(c: Client) -> dict[str, dict]:
    pools = c.run(pyarraypool.pool_identity)
    _cluster_tokens.update(p["token"] for p in pools.values())
    return pools


@pytest.fixture(scope="module")
def shm_unchanged():
    """After the module, no pool of its clusters is left in /dev/shm (but ours)."""
    yield
    own = pyarraypool.pool_identity()["token"]

    def leftovers() -> list[str]:
        return [
            n
            for n in _pool_names()
            if any(n.startswith(f"pyarraypool-{t}") for t in _cluster_tokens - {own})
        ]

    _wait_until(lambda: not leftovers(), what="the clusters' pools to be unlinked")


@pytest.fixture(scope="module")
def client(shm_unchanged):
    with LocalCluster(
        processes=True, n_workers=2, threads_per_worker=1, dashboard_address=":0"
    ) as cluster:
        pids = [p.process.pid for p in cluster.workers.values()]
        with Client(cluster) as c:
            pdask.install(c)
            assert {p["token"] for p in _note_pools(c).values()} == {
                pyarraypool.pool_identity()["token"]
            }
            yield c
    for pid in pids:
        _wait_until(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), what=f"worker {pid} exit")


@pytest.fixture
def workers(client):
    addrs = sorted(client.scheduler_info()["workers"])
    assert len(addrs) == 2
    client.run(reset_counters)
    before = {a: c for a, c in client.run(pdask.counters).items()}
    return addrs, before


def _delta(client, before):
    now = client.run(pdask.counters)
    return {a: {k: now[a][k] - before[a][k] for k in now[a]} for a in now}


def _release(base: int, *futures) -> None:
    """Drops the futures and waits until Dask has freed their pool memory.

    Workers forget keys a little after the client releases them: that is
    Dask's own reference dropping, and it must bring the pool back to `base`.
    """
    for f in futures:
        f.release()
    del futures
    gc.collect()
    _wait_until(
        lambda: gc.collect() >= 0 and pyarraypool.stats().used_bytes == base,
        what="pool back to baseline",
    )


# -- same host, one pool: by handle -------------------------------------------


def test_worker_to_worker_by_handle(client, workers):
    (w0, w1), before = workers
    base = pyarraypool.stats().used_bytes
    x = client.submit(make_pool_array, 64 * MiB, 3, workers=[w0], pure=False)
    d = client.submit(describe, x, workers=[w1]).result()
    assert d["type"] == "TransferableArray"
    assert (d["nbytes"], d["first"], d["last"]) == (64 * MiB, 3, 3)
    assert d["pool"] == pyarraypool.pool_identity()["instance"]
    delta = _delta(client, before)
    assert delta[w0]["sent_by_handle"] == 1 and delta[w0]["sent_by_value"] == 0
    assert delta[w1]["received_by_handle"] == 1
    # What w0 wrote on the comms it serves data on (the handle and the
    # get_data reply around it) is a few KiB at most, not 64 MiB.
    served = client.run(_dask_meter.written, w0)[w0]
    assert 0 < served < 8 * 1024, served
    # Writes on w1 are seen on w0: one memory.
    y = client.submit(write_first, x, 99, workers=[w1], pure=False)
    assert y.result() == 99
    assert client.submit(read_first, x, y, workers=[w0], pure=False).result() == 99
    _release(base, x, y)


def test_worker_to_client_by_handle(client, workers):
    (w0, _w1), before = workers
    base = pyarraypool.stats().used_bytes
    received = pdask.counters()["received_by_handle"]
    f = client.submit(make_pool_array, 8 * MiB, 5, workers=[w0], pure=False)
    r = f.result()
    assert type(r) is pyarraypool.TransferableArray
    assert r.nbytes == 8 * MiB and r[0] == 5 and r[-1] == 5
    assert pdask.counters()["received_by_handle"] == received + 1
    assert _delta(client, before)[w0]["sent_by_handle"] == 1
    # The client's copy is the worker's memory: a write in the client is seen there.
    r[0] = 42
    assert client.submit(read_first, f, workers=[w0], pure=False).result() == 42
    del r
    _release(base, f)


def test_client_to_worker_by_handle(client, workers):
    (w0, _w1), before = workers
    base = pyarraypool.stats().used_bytes
    sent = pdask.counters()["sent_by_handle"]
    x = pyarraypool.zeros(4 * MiB, dtype=np.uint8)
    x[-1] = 8
    fut = client.scatter(x, workers=[w0])
    d = client.submit(describe, fut, workers=[w0]).result()
    assert d["type"] == "TransferableArray" and d["last"] == 8
    assert pdask.counters()["sent_by_handle"] == sent + 1
    assert _delta(client, before)[w0]["received_by_handle"] == 1
    assert client.submit(write_first, fut, 7, workers=[w0], pure=False).result() == 7
    assert x[0] == 7  # the worker wrote into the client's array
    del x
    _release(base, fut)


def test_task_argument_goes_by_value(client, workers):
    """A pool array given straight to submit() travels inside the pickled task.

    Dask pickles it with no recipient in sight (the scheduler unpickles it,
    any worker may run the task), and may pickle it twice: a handle there
    would be no data, and a pending transfer nobody loads.
    """
    (w0, _w1), _ = workers
    x = pyarraypool.make_transferable(np.full(2 * MiB, 9, dtype=np.uint8))
    pending = pyarraypool.stats().pending_transfers
    d = client.submit(describe, x, workers=[w0], pure=False).result()
    assert d["type"] == "ndarray" and d["last"] == 9
    assert pyarraypool.stats().pending_transfers == pending
    # Outside Dask's pickler, pickling is unchanged: a handle.
    import pickle

    from distributed.protocol.pickle import dumps, loads

    handle = pickle.dumps(x)
    assert len(handle) < 1024
    assert pyarraypool.stats().pending_transfers == pending + 1
    assert type(pickle.loads(handle)) is pyarraypool.TransferableArray
    assert pyarraypool.stats().pending_transfers == pending
    blob = dumps(x)
    assert len(blob) >= x.nbytes
    z = loads(blob)
    assert type(z) is np.ndarray and z[0] == 9


def test_release_gives_memory_back(client, workers):
    (w0, w1), _ = workers
    base = pyarraypool.stats().used_bytes
    xs = [
        client.submit(make_pool_array, 4 * MiB, i, workers=[w0 if i % 2 else w1], pure=False)
        for i in range(6)
    ]
    ds = client.map(describe, xs, workers=[w0], pure=False)
    assert [d["first"] for d in client.gather(ds)] == list(range(6))
    got = client.gather(xs)
    assert pyarraypool.stats().used_bytes >= base + 6 * 4 * MiB
    del got
    client.run(gc.collect)
    _release(base, *xs, *ds)
    assert pyarraypool.stats().pending_transfers == 0


def test_what_the_scheduler_relays_goes_by_value(client, workers):
    """The scheduler forwards frames it does not open: it must never be sent a handle.

    It runs in this process, which installed pyarraypool.dask, yet its comms
    claim no pool, so what reaches the client through it comes by value.
    """
    (w0, _w1), before = workers
    base = pyarraypool.stats().used_bytes
    r = client.run(make_pool_array, 1 * MiB, 2, workers=[w0])[w0]
    assert type(r) is np.ndarray and r[0] == 2
    f = client.submit(make_pool_array, 1 * MiB, 3, workers=[w0], pure=False)
    g = client.gather(f, direct=False)
    assert type(g) is np.ndarray and g[0] == 3
    delta = _delta(client, before)[w0]
    assert delta["sent_by_value"] == 2 and delta["sent_by_handle"] == 0
    del r, g
    _release(base, f)


def test_install_with_an_asynchronous_client():
    import asyncio

    base = pyarraypool.stats().used_bytes

    async def main() -> tuple[str, int]:
        async with (
            LocalCluster(
                processes=True,
                n_workers=1,
                threads_per_worker=1,
                dashboard_address=":0",
                asynchronous=True,
            ) as cluster,
            Client(cluster, asynchronous=True) as c,
        ):
            await pdask.install(c)
            r = await c.submit(make_pool_array, 1 * MiB, 4, pure=False)
            return type(r).__name__, int(r[-1])

    assert asyncio.run(main()) == ("TransferableArray", 4)
    gc.collect()
    pyarraypool.collect()
    assert pyarraypool.stats().used_bytes == base


# -- no known recipient, or another pool: by value ------------------------------


def test_no_context_goes_by_value():
    x = pyarraypool.make_transferable(np.arange(100_000, dtype=np.float64))
    pending = pyarraypool.stats().pending_transfers
    header, frames = serialize(x)  # no context: e.g. a call by hand
    assert sum(memoryview(f).nbytes for f in frames) >= x.nbytes
    y = deserialize(header, frames)
    assert type(y) is np.ndarray
    np.testing.assert_array_equal(y, x)
    # Spilling to disk goes through serialize_bytelist: data, never a handle.
    blob = b"".join(serialize_bytelist(x))
    assert len(blob) >= x.nbytes
    z = deserialize_bytes(blob)
    assert type(z) is np.ndarray
    np.testing.assert_array_equal(z, x)
    assert pyarraypool.stats().pending_transfers == pending


def _context(recipient_pool: dict | None) -> dict:
    recipient = {"address": "tcp://10.0.0.2:1234"}
    if recipient_pool is not None:
        recipient[pdask.HANDSHAKE_KEY] = recipient_pool
    return {"sender": {"address": "tcp://10.0.0.1:1"}, "recipient": recipient}


@pytest.mark.parametrize("field", ["token", "instance", "boot_id"])
def test_other_pool_goes_by_value(field):
    x = pyarraypool.make_transferable(np.arange(50_000, dtype=np.int32))
    other = dict(pyarraypool.pool_identity())
    other[field] = "0" * len(other[field])
    for ctx in (_context(other), _context(None), {"recipient": None}):
        header, frames = serialize(x, context=ctx)
        assert header["type"] == "numpy.ndarray"  # what Dask itself sends
        assert sum(memoryview(f).nbytes for f in frames) >= x.nbytes
        y = deserialize(header, frames)
        assert type(y) is np.ndarray
        np.testing.assert_array_equal(y, x)


def test_same_pool_context_goes_by_handle():
    x = pyarraypool.make_transferable(np.arange(50_000, dtype=np.int32))
    pending = pyarraypool.stats().pending_transfers
    header, frames = serialize(x, context=_context(dict(pyarraypool.pool_identity())))
    assert sum(memoryview(f).nbytes for f in frames) < 1024
    assert pyarraypool.stats().pending_transfers == pending + 1
    y = deserialize(header, frames)
    assert type(y) is pyarraypool.TransferableArray
    assert pyarraypool.stats().pending_transfers == pending
    y[0] = -1
    assert x[0] == -1  # the same memory


def test_handle_from_another_pool_is_refused():
    x = pyarraypool.make_transferable(np.arange(10))
    header, frames = serialize(x, context=_context(dict(pyarraypool.pool_identity())))
    header["sub-header"]["pool"] = dict(header["sub-header"]["pool"], instance="1" * 32)
    with pytest.raises(pyarraypool.StaleHandleError, match="handles work only within one pool"):
        deserialize(header, frames)
    # Consume the pending transfer the refused handle counted.
    header["sub-header"]["pool"] = dict(pyarraypool.pool_identity())
    deserialize(header, frames)


def test_remote_as_pool_on_request():
    x = pyarraypool.make_transferable(np.arange(1000, dtype=np.float32))
    plain = np.arange(1000, dtype=np.float32)

    def over_the_wire(obj):  # the recipient reads its own copy of the frames
        header, frames = serialize(obj, context=_context(None))
        return header, [bytes(f) for f in frames]

    msg = over_the_wire(x)
    plain_msg = over_the_wire(plain)
    pdask.install(remote_as_pool=True)
    try:
        y = deserialize(*msg)
        assert type(y) is pyarraypool.TransferableArray
        np.testing.assert_array_equal(y, x)
        y[0] = 5
        assert x[0] == 0  # a copy in this host's pool, not the sender's memory
        assert type(deserialize(*plain_msg)) is np.ndarray  # only pool arrays come back as such
    finally:
        pdask.install(remote_as_pool=False)
    assert type(deserialize(*msg)) is np.ndarray


def test_spill_to_disk_is_by_value(tmp_path):
    from distributed.spill import SpillBuffer

    buf = SpillBuffer(str(tmp_path), target=1)  # every key goes to disk
    x = pyarraypool.make_transferable(np.full(1 * MiB, 4, dtype=np.uint8))
    buf["k"] = x
    assert "k" in buf.slow
    del x
    gc.collect()
    back = buf["k"]
    assert type(back) is np.ndarray and back.nbytes == 1 * MiB and back[0] == 4
    del buf["k"], back


# -- a worker killed by its nanny's memory limit ------------------------------


def test_memory_limit_kill_leaks_nothing(shm_unchanged):
    import dask

    gc.collect()
    pyarraypool.collect()
    base = pyarraypool.stats().used_bytes
    with dask.config.set(
        {
            "distributed.scheduler.allowed-failures": 0,
            "distributed.worker.memory.spill": False,
            "distributed.worker.memory.target": False,
        }
    ):
        with LocalCluster(
            processes=True,
            n_workers=1,
            threads_per_worker=1,
            memory_limit="400MiB",
            dashboard_address=":0",
        ) as cluster:
            with Client(cluster) as c:
                pdask.install(c)
                f = c.submit(allocate_until_killed, 16 * MiB, 2048 * MiB, pure=False)
                with pytest.raises(distributed.KilledWorker):
                    f.result(timeout=60)
                del f
    pyarraypool.collect()
    _wait_until(
        lambda: pyarraypool.collect() >= 0 and pyarraypool.stats().used_bytes == base,
        what="the killed worker's blocks reclaimed",
    )


# -- which pool a worker joins ------------------------------------------------

_JOIN = """
import os, pyarraypool.dask as d, pyarraypool._core as c
d._join_cluster_pool("tcp://10.1.2.3:8786")
print(os.environ["PYARRAYPOOL_POOL"])
"""
_PARENT = """
import os, subprocess, sys
import pyarraypool, pyarraypool.dask
if {live}:
    pyarraypool.stats()  # the parent uses its pool
out = subprocess.run([sys.executable, "-c", {child!r}], capture_output=True, text=True,
                     check=True).stdout.split()[-1]
print(os.environ["PYARRAYPOOL_POOL"], out)
"""


def test_worker_pool_name_rule():
    cluster_name = pdask.cluster_pool_name("tcp://10.1.2.3:8786")
    # A name given on purpose is kept, even if no pool of that name exists yet.
    given = "ab" * 16
    out = run_python(_JOIN, env=fresh_env(PYARRAYPOOL_POOL=given)).stdout.split()
    assert out == [given]
    # A name drawn at random (by this process, or by a parent that only
    # imported pyarraypool.dask, like a `dask worker` nanny) gives way to the
    # host's cluster pool.
    assert run_python(_JOIN).stdout.split() == [cluster_name]
    parent, child = run_python(_PARENT.format(live=False, child=_JOIN)).stdout.split()
    assert parent != child == cluster_name
    # ... unless that parent uses the pool: a LocalCluster in the client program.
    parent, child = run_python(_PARENT.format(live=True, child=_JOIN)).stdout.split()
    assert parent == child


# -- a cluster of `dask worker` processes, as on a real host ------------------


def test_dask_worker_preload_shares_one_host_pool(tmp_path, shm_unchanged):
    """Two `dask worker --preload pyarraypool.dask` on one host join one pool.

    They are separate programs (no inherited pool name), as on a real
    cluster; the client in this process keeps its own pool, so what reaches
    it comes by value.
    """
    sched_file = str(tmp_path / "scheduler.json")
    env = fresh_env()
    # The workers import this module to run its functions.
    env["PYTHONPATH"] = os.path.dirname(__file__) + os.pathsep + env["PYTHONPATH"]
    env.pop(pdask.ENV_REMOTE_AS_POOL, None)
    bindir = os.path.dirname(sys.executable)
    procs = [
        subprocess.Popen(
            [
                os.path.join(bindir, "dask"),
                "scheduler",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                sched_file,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    ]
    try:
        _wait_until(lambda: os.path.exists(sched_file), timeout=30, what="scheduler file")
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        os.path.join(bindir, "dask"),
                        "worker",
                        "--scheduler-file",
                        sched_file,
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                        "--preload",
                        "pyarraypool.dask",
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        with Client(scheduler_file=sched_file, timeout=30) as c:
            c.wait_for_workers(2, timeout=30)
            w0, w1 = sorted(c.scheduler_info()["workers"])
            pools = _note_pools(c)
            assert pools[w0] == pools[w1]
            assert pools[w0]["instance"] != pyarraypool.pool_identity()["instance"]
            sched_addr = c.run(lambda dask_worker: dask_worker.scheduler.address)[w0]
            assert pools[w0]["token"] == pdask.cluster_pool_name(sched_addr)
            x = c.submit(make_pool_array, 16 * MiB, 6, workers=[w0], pure=False)
            d = c.submit(describe, x, workers=[w1], pure=False).result()
            assert d["type"] == "TransferableArray" and d["last"] == 6
            counts = c.run(pdask.counters)
            assert counts[w0]["sent_by_handle"] == 1 and counts[w1]["received_by_handle"] == 1
            r = x.result()  # to this client, outside the workers' pool: by value
            assert type(r) is np.ndarray and r.nbytes == 16 * MiB and r[0] == 6
            # (either worker may answer: both hold it now)
            assert sum(n["sent_by_value"] for n in c.run(pdask.counters).values()) == 1
            token = pools[w0]["token"]
            # A handle in flight that nobody will load: the pool's workers
            # are independent programs, so no "program root" may keep the
            # pool for it once they have all left.
            assert c.submit(pickle_and_drop, x, workers=[w0], pure=False).result() < 1000
            assert c.run(lambda: pyarraypool.stats().pending_transfers)[w0] == 1
            del r, x
            c.shutdown()  # workers leave the pool as they close: the last one unlinks it
        for p in procs:
            p.wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for p in procs:
            _wait_until(lambda p=p: not group_alive(p.pid), what="dask processes gone")
    assert not [n for n in _pool_names() if n.startswith("pyarraypool-" + token)]


def test_cluster_pool_name_carries_a_secret():
    """The plugin that install(client) registers carries a random secret to
    every worker (the scheduler keeps one plugin: the workers of a host
    agree); the name depends on it, and is not the old hash of the address
    and uid that another local user could compute."""
    addr = "tcp://10.1.2.3:8786"
    a, b = pdask.PyArrayPoolPlugin(), pdask.PyArrayPoolPlugin()
    assert a.secret != b.secret and len(a.secret) == 32
    a_again = pickle.loads(pickle.dumps(a))   # as the scheduler hands it to workers
    assert pdask.cluster_pool_name(addr, a_again.secret) == pdask.cluster_pool_name(addr, a.secret)
    assert pdask.cluster_pool_name(addr, a.secret) != pdask.cluster_pool_name(addr, b.secret)
    old = hashlib.sha256(f"pyarraypool-dask\0{addr}\0{os.getuid()}".encode()).hexdigest()[:32]
    names = {pdask.cluster_pool_name(addr, a.secret), pdask.cluster_pool_name(addr)}
    assert old not in names
    # Two processes that join with the plugin's secret agree.
    join = f"import os, pyarraypool.dask as d; d._join_cluster_pool({addr!r}, {a.secret!r}); " \
           "print(os.environ['PYARRAYPOOL_POOL'])"
    assert {run_python(join).stdout.split()[-1] for _ in range(2)} == {
        pdask.cluster_pool_name(addr, a.secret)}
