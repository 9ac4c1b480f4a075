"""Dask across two hosts in one machine.

Two workers run on this host; a third worker runs on a "second host"
(tests/second_host.py): its own network namespace, reached over a veth pair,
and its own /dev/shm, so it cannot see this host's pools. One scheduler, on
this host or on the second one, listens on its side of the veth, where every
process can reach it: one cluster over two hosts, its client in this process.

With pyarraypool.dask installed, a pool array between the two workers of this
host goes by handle, and one sent to or from the second host goes by value
and arrives intact. Both ways of starting workers are run:

- "inherited": every worker is started with this program's environment, so
  the workers here share this process's pool; the second host's worker gets
  this pool's name too (as from a launcher that forwards the environment),
  but no such pool exists on its host: it must count as another pool.
- "preload": workers started as `dask worker --preload pyarraypool.dask` with
  a clean environment join their host's cluster pool, whose name both hosts
  derive from the scheduler's address: the same name on both hosts, two
  pools. Here arrays that arrive by value are put into the receiving
  worker's own pool (PYARRAYPOOL_DASK_REMOTE_AS_POOL=1).

Needs root; skips, with the reason, only where namespaces cannot be made.
PYARRAYPOOL_REQUIRE_SECOND_HOST=1 turns that skip into a failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client
from helpers import REPO, fresh_env, group_alive, my_pool_token
from second_host import (
    Processes,
    SecondHost,
    netns_list,
    running,
    second_host,
    unavailable_reason,
)

import pyarraypool
import pyarraypool.dask

REQUIRE_ENV = "PYARRAYPOOL_REQUIRE_SECOND_HOST"
START_TIMEOUT = 30.0
RESULT_TIMEOUT = 30.0
SHAPE = (512, 1024)  # 4 MiB of float64: by value and by handle differ by 10^4


@pytest.fixture(scope="module")
def namespaces_available() -> None:
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but no second host can be made: {reason}")
        pytest.skip(reason)


@dataclass
class Cluster:
    client: Client
    host: SecondHost
    local: list[str]  # addresses of the two workers on this host
    remote: str  # address of the worker on the second host
    local_pgids: list[int] = field(default_factory=list)
    remote_pids: list[int] = field(default_factory=list)
    killed: list[list[str]] = field(default_factory=list)  # had to be SIGKILLed


def _dask(*args: str) -> list[str]:
    return [sys.executable, "-m", "dask", *args]


def _worker_args(scheduler: str, name: str, host: str, preload: bool) -> list[str]:
    args = ["worker", scheduler, "--name", name, "--host", host, "--no-nanny"]
    args += ["--nthreads", "1", "--no-dashboard", "--death-timeout", "30"]
    if preload:
        args += ["--preload", "pyarraypool.dask"]
    return _dask(*args)


def _log_tails(log_dir: Path, lines: int = 15) -> str:
    parts = []
    for log in sorted(log_dir.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {log.name}\n" + "\n".join(tail))
    return "\n".join(parts)


def _worker_env(mode: str) -> dict[str, str]:
    if mode == "inherited":
        env = dict(os.environ)  # this process's pool name included
    else:
        env = fresh_env(PYARRAYPOOL_DASK_REMOTE_AS_POOL="1")
    # The workers import this module to run its functions (by reference).
    env["PYTHONFAULTHANDLER"] = "1"  # stacks in the log if stop() has to abort one
    tests = os.path.join(REPO, "tests")
    env["PYTHONPATH"] = os.pathsep.join([REPO, tests, env.get("PYTHONPATH", "")])
    return env


@contextlib.contextmanager
def two_hosts(
    log_dir: Path, mode: str = "inherited", scheduler_on: str = "here"
) -> Iterator[Cluster]:
    """Workers local-0, local-1 here, worker remote on a second host, and a
    scheduler here or (scheduler_on="second host") there with that worker.

    On exit every process is stopped and the second host deleted; the
    Cluster's pgids/pids say which processes ran, for checks afterwards.
    """
    env = _worker_env(mode)
    preload = mode == "preload"
    scheduler_proc, local = Processes(), Processes()
    client = None
    cluster = None
    with second_host() as host:
        try:
            sched_file = log_dir / "scheduler.json"
            there = scheduler_on == "second host"
            scheduler_host = host.address if there else host.host_address
            scheduler_args = ["scheduler", "--host", scheduler_host, "--port", "0"]
            # --idle-timeout: if this test process is killed, the scheduler
            # leaves after a while, and the workers (--death-timeout) after it.
            scheduler_args += ["--no-dashboard", "--scheduler-file", str(sched_file)]
            scheduler_args += ["--idle-timeout", "120s"]
            with open(log_dir / "scheduler.log", "wb") as out:
                argv = _dask(*scheduler_args)
                if there:
                    argv = host.command(argv, str(log_dir))
                scheduler_proc.start(argv, env=env, stdout=out, stderr=out, cwd=log_dir)
            deadline = time.monotonic() + START_TIMEOUT
            while not sched_file.exists() or not sched_file.read_text().strip():
                assert time.monotonic() < deadline, "no scheduler:\n" + _log_tails(log_dir)
                time.sleep(0.1)
            scheduler = json.loads(sched_file.read_text())["address"]
            for name in ("local-0", "local-1"):
                with open(log_dir / f"{name}.log", "wb") as out:
                    argv = _worker_args(scheduler, name, host.host_address, preload)
                    local.start(argv, env=env, stdout=out, stderr=out, cwd=log_dir)
            with open(log_dir / "remote.log", "wb") as out:
                argv = _worker_args(scheduler, "remote", host.address, preload)
                host.popen(argv, env=env, stdout=out, stderr=out, cwd=str(log_dir))
            client = Client(scheduler, timeout=START_TIMEOUT, set_as_default=False)
            try:
                client.wait_for_workers(3, timeout=START_TIMEOUT)
            except TimeoutError as exc:
                raise AssertionError("workers did not start:\n" + _log_tails(log_dir)) from exc
            by_name = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
            cluster = Cluster(
                client, host, [by_name["local-0"], by_name["local-1"]], by_name["remote"]
            )
            yield cluster
        except BaseException:
            print(_log_tails(log_dir))  # pytest shows it with the failure
            raise
        finally:
            if cluster is not None:
                cluster.local_pgids = scheduler_proc.pgids() + local.pgids()
                cluster.remote_pids = host.pids()
            if client is not None:
                client.close()
            # Workers first, while the scheduler is up: a worker told to stop
            # by SIGTERM and by its scheduler at once can hang in its close
            # and would be SIGKILLed, leaving its pool behind.
            remote_killed = host.processes.stop()
            killed = local.stop() + scheduler_proc.stop()
            if remote_killed:
                # Seen in 2 of the last CI runs, preload mode, cause not found
                # yet: the second host's worker outlived 20 s of SIGTERM. What
                # it leaves is in the second host's own /dev/shm, which goes
                # with it; this host's processes must still stop cleanly.
                # A warning, so that CI's summary shows it with the stacks
                # (the test itself passes).
                warnings.warn(
                    f"second host processes needed SIGKILL: {remote_killed}\n"
                    + _log_tails(log_dir, lines=80),
                    stacklevel=1,
                )
            if cluster is not None:
                cluster.killed = killed


# -- functions the workers run --------------------------------------------------


def _namespaces() -> tuple[str, str]:
    return os.readlink("/proc/self/ns/net"), os.readlink("/proc/self/ns/mnt")


def _touch_shm(name: str) -> list[str]:
    Path("/dev/shm", name).touch()
    return sorted(os.listdir("/dev/shm"))


def _expected(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE)


def _make_pool_array(seed: int) -> np.ndarray:
    """A pool array, made in place in the pool of the process that runs this."""
    arr = pyarraypool.empty(SHAPE, dtype=np.float64)
    arr[...] = _expected(seed)
    return arr


def _strided_view(arr: np.ndarray) -> np.ndarray:
    # A view travels as a view within a pool; by value it must keep its values.
    return arr[::2, 3:].T


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _describe(arr: np.ndarray) -> dict[str, Any]:
    """What arrived: its bytes, and whether it is a plain array or one of this pool's."""
    return {
        "digest": _digest(arr),
        "shape": arr.shape,
        "type": type(arr).__name__,
        "pool": dict(pyarraypool.pool_identity()),
    }


def _counters() -> dict[str, int]:
    return pyarraypool.dask.counters()


# -- tests ----------------------------------------------------------------------


def _on(c: Client, worker: str, fn: Any, *args: Any) -> Any:
    """`fn(*args)` as a new task (never one with the same key) on `worker` only."""
    return c.submit(fn, *args, workers=[worker], allow_other_workers=False, pure=False)


def test_second_host_worker_computes_with_its_own_network_and_shm(
    namespaces_available: None, tmp_path: Path
) -> None:
    with two_hosts(tmp_path) as ch:
        c, remote = ch.client, ch.remote
        assert remote.startswith(f"tcp://{ch.host.address}:")
        for addr in ch.local:
            assert addr.startswith(f"tcp://{ch.host.host_address}:")

        # The remote worker runs in other namespaces than this process, the
        # local ones in the same.
        namespaces = c.run(_namespaces)
        assert namespaces[remote][0] != _namespaces()[0]
        assert namespaces[remote][1] != _namespaces()[1]
        for addr in ch.local:
            assert tuple(namespaces[addr]) == _namespaces()

        # It computes, with an input it fetches from a local worker.
        x = _on(c, ch.local[0], list, range(1000))
        total = _on(c, remote, sum, x)
        assert total.result(timeout=RESULT_TIMEOUT) == sum(range(1000))
        assert c.who_has(total)[total.key] == (remote,)

        # A file it makes in /dev/shm is in its /dev/shm only.
        probe = f"pap-second-host-probe-{os.getpid()}"
        assert probe in c.run(_touch_shm, probe, workers=[remote])[remote]
        assert probe not in os.listdir("/dev/shm")
    _assert_all_gone(ch)


def _delta(
    after: dict[str, dict[str, int]], before: dict[str, dict[str, int]], addr: str, name: str
) -> int:
    return after[addr][name] - before[addr][name]


@pytest.mark.parametrize(
    ("mode", "scheduler_on"),
    [("inherited", "here"), ("preload", "here"), ("inherited", "second host")],
)
def test_pool_arrays_cross_hosts_by_value_and_stay_by_handle_on_one_host(
    namespaces_available: None, tmp_path: Path, mode: str, scheduler_on: str
) -> None:
    my_token = my_pool_token()
    shm_before = set(os.listdir("/dev/shm"))
    with two_hosts(tmp_path, mode, scheduler_on) as ch:
        c, remote = ch.client, ch.remote
        local0, local1 = ch.local
        pyarraypool.dask.install(c)
        there = scheduler_on == "second host"
        assert (c.run_on_scheduler(_namespaces)[0] == _namespaces()[0]) != there

        # One pool for the two workers here; the second host has another pool.
        ids = c.run(pyarraypool.pool_identity)
        assert ids[local0] == ids[local1]
        assert ids[remote]["instance"] != ids[local0]["instance"]
        assert ids[remote]["boot_id"] == ids[local0]["boot_id"]  # one kernel
        if mode == "inherited":
            assert ids[local0] == pyarraypool.pool_identity()
        else:
            assert ids[local0]["token"] != my_token
            # Both hosts derive their cluster pool's name from the scheduler's
            # address: only the pool's instance tells the two pools apart.
            assert ids[remote]["token"] == ids[local0]["token"]

        src = _on(c, local0, _make_pool_array, 1)
        view = _on(c, local0, _strided_view, src)
        expected = {"src": _digest(_expected(1)), "view": _digest(_strided_view(_expected(1)))}
        here = _on(c, local0, _describe, src).result(timeout=RESULT_TIMEOUT)
        assert here["type"] == "TransferableArray"

        # Between the two workers of this host: by handle, as a pool array.
        before = c.run(_counters)
        got = {key: _on(c, local1, _describe, fut) for key, fut in (("src", src), ("view", view))}
        for key, fut in got.items():
            info = fut.result(timeout=RESULT_TIMEOUT)
            assert info["digest"] == expected[key]
            assert info["type"] == "TransferableArray"
        after = c.run(_counters)
        assert _delta(after, before, local0, "sent_by_handle") == 2
        assert _delta(after, before, local0, "sent_by_value") == 0
        assert _delta(after, before, local1, "received_by_handle") == 2

        # Straight from a worker here to this process: by handle only when it
        # shares this process's pool. (Before any copy of src is on the second
        # host: gather may pick any worker that holds it.)
        before, mine_before = after, pyarraypool.dask.counters()
        mine = c.gather(src, direct=True)
        np.testing.assert_array_equal(mine, _expected(1))
        after, mine_after = c.run(_counters), pyarraypool.dask.counters()
        by_handle = mode == "inherited"
        assert isinstance(mine, pyarraypool.TransferableArray) == by_handle
        sent = {k: sum(_delta(after, before, a, k) for a in ch.local) for k in mine_after}
        assert sent["sent_by_handle"] == int(by_handle)
        assert sent["sent_by_value"] == int(not by_handle)
        received = mine_after["received_by_handle"] - mine_before["received_by_handle"]
        assert received == int(by_handle)

        # To the second host: by value, intact, a plain array or one of its
        # own pool.
        before = after
        got = {key: _on(c, remote, _describe, fut) for key, fut in (("src", src), ("view", view))}
        for key, fut in got.items():
            info = fut.result(timeout=RESULT_TIMEOUT)
            assert info["digest"] == expected[key]
            assert info["shape"] == ((SHAPE[1] - 3, SHAPE[0] // 2) if key == "view" else SHAPE)
            if mode == "inherited":
                assert info["type"] == "ndarray"
            else:
                assert info["type"] == "TransferableArray"
                assert info["pool"] == ids[remote]
        after = c.run(_counters)
        sent = sum(_delta(after, before, a, "sent_by_value") for a in ch.local)
        assert sent == 2
        assert all(_delta(after, before, a, "sent_by_handle") == 0 for a in ch.local)
        assert _delta(after, before, remote, "received_by_handle") == 0
        assert _delta(after, before, remote, "received_as_pool") == (2 if mode == "preload" else 0)

        # From the second host: a pool array made there comes back intact, to
        # this process (straight from it, and through the scheduler), then to
        # a worker here. (In this order: gather may pick any worker that holds
        # it, and the worker here keeps a copy.)
        before = c.run(_counters)
        made = _on(c, remote, _make_pool_array, 2)
        direct = c.gather(made, direct=True)
        assert type(direct) is np.ndarray
        np.testing.assert_array_equal(direct, _expected(2))
        np.testing.assert_array_equal(c.gather(made, direct=False), _expected(2))
        info = _on(c, local1, _describe, made).result(timeout=RESULT_TIMEOUT)
        assert info["digest"] == _digest(_expected(2))
        assert info["type"] == ("TransferableArray" if mode == "preload" else "ndarray")
        after = c.run(_counters)
        assert _delta(after, before, remote, "sent_by_value") == 3
        assert _delta(after, before, remote, "sent_by_handle") == 0
        assert _delta(after, before, local1, "received_by_handle") == 0
        del mine, direct, src, view, made, got

    _assert_all_gone(ch)
    # No pool of the cluster is left in this host's /dev/shm (the second
    # host's never was), except this process's own pool, in use until it
    # exits, which the workers here shared in "inherited".
    tokens = {ident["token"] for ident in ids.values()} - {my_token}
    new = set(os.listdir("/dev/shm")) - shm_before
    assert {n for n in new if any(t in n for t in tokens)} == set()


def _make_plain_array(seed: int) -> np.ndarray:
    return _expected(seed)


def _describe_plain(arr: np.ndarray) -> dict[str, Any]:
    """_describe, and whether the array lives in a pool block (auto mode's copies do)."""
    return dict(_describe(arr), in_pool=pyarraypool._core._block_of(arr) is not None)


def test_auto_mode_plain_arrays_by_handle_on_one_host_by_value_across(
    namespaces_available: None, tmp_path: Path
) -> None:
    """install(client, min_bytes=...): a plain ndarray goes between the two
    workers of this host as a private copy in their pool, and to and from
    the second host by value."""
    with two_hosts(tmp_path) as ch:
        c, remote = ch.client, ch.remote
        local0, local1 = ch.local
        pyarraypool.dask.install(c, min_bytes=1 << 20)
        try:
            src = _on(c, local0, _make_plain_array, 3)
            expected = _digest(_expected(3))
            before = c.run(_counters)
            here = _on(c, local1, _describe_plain, src).result(timeout=RESULT_TIMEOUT)
            assert (here["digest"], here["type"], here["in_pool"]) == (expected, "ndarray", True)
            there = _on(c, remote, _describe_plain, src).result(timeout=RESULT_TIMEOUT)
            assert (there["digest"], there["type"], there["in_pool"]) == (
                expected, "ndarray", False)
            made = _on(c, remote, _make_plain_array, 4)
            back = _on(c, local1, _describe_plain, made).result(timeout=RESULT_TIMEOUT)
            assert (back["digest"], back["in_pool"]) == (_digest(_expected(4)), False)
            after = c.run(_counters)
            assert _delta(after, before, local0, "auto_sent_by_handle") == 1
            assert _delta(after, before, local1, "auto_received_by_handle") == 1
            assert _delta(after, before, remote, "auto_received_by_handle") == 0
            assert _delta(after, before, remote, "auto_sent_by_handle") == 0
            del src, made
        finally:
            pyarraypool.dask.install(c)  # auto mode off again in this process
    _assert_all_gone(ch)


def _assert_all_gone(ch: Cluster) -> None:
    assert ch.killed == [], "these processes of this host did not stop on SIGTERM"
    assert ch.host.name not in netns_list()
    for pgid in ch.local_pgids:
        assert group_alive(pgid) == [], f"processes of group {pgid} are still running"
    assert ch.remote_pids, "the second host ran nothing"
    for pid in ch.remote_pids:
        assert not running(pid), f"process {pid} of the second host still runs"
