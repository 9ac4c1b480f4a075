"""Dask across two hosts in one machine.

A scheduler and two workers run on this host; a third worker runs on a
"second host" (tests/second_host.py): its own network namespace, reached over
a veth pair, and its own /dev/shm, so it cannot see this host's pool. The
scheduler listens on the veth's address on this side, so everybody reaches it.

The second-host worker is started with this program's environment, pool name
included, as a launcher that forwards the environment would: it must still be
treated as another host (its /dev/shm holds another pool under that name).

Needs root; skips, with the reason, only where namespaces cannot be made.
PYARRAYPOOL_REQUIRE_SECOND_HOST=1 turns that skip into a failure (CI is root).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from distributed import Client
from helpers import REPO
from second_host import Processes, SecondHost, netns_list, second_host, unavailable_reason

REQUIRE_ENV = "PYARRAYPOOL_REQUIRE_SECOND_HOST"
START_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def namespaces_available() -> None:
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but no second host can be made: {reason}")
        pytest.skip(reason)


@dataclass
class TwoHosts:
    client: Client
    host: SecondHost
    local: list[str]  # addresses of the two workers on this host
    remote: str  # address of the worker on the second host


def _dask(*args: str) -> list[str]:
    return [sys.executable, "-m", "dask", *args]


def _worker_args(scheduler: str, name: str, host: str) -> list[str]:
    return _dask(
        "worker",
        scheduler,
        "--name",
        name,
        "--host",
        host,
        "--no-nanny",
        "--nthreads",
        "1",
        "--no-dashboard",
        "--death-timeout",
        "30",
    )


def _log_tails(log_dir: Path) -> str:
    parts = []
    for log in sorted(log_dir.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-15:]
        parts.append(f"--- {log.name}\n" + "\n".join(lines))
    return "\n".join(parts)


@pytest.fixture
def two_hosts(namespaces_available: None, tmp_path: Path) -> Iterator[TwoHosts]:
    env = dict(os.environ)
    # The workers import this module to run its functions (by reference).
    tests = os.path.join(REPO, "tests")
    env["PYTHONPATH"] = os.pathsep.join([REPO, tests, env.get("PYTHONPATH", "")])

    def log(name: str):  # type: ignore[no-untyped-def]
        return open(tmp_path / f"{name}.log", "wb")

    local = Processes()
    client = None
    with second_host() as host:
        try:
            sched_file = tmp_path / "scheduler.json"
            with log("scheduler") as out:
                local.start(
                    _dask(
                        "scheduler",
                        "--host",
                        host.host_address,
                        "--port",
                        "0",
                        "--no-dashboard",
                        "--scheduler-file",
                        str(sched_file),
                    ),
                    env=env,
                    stdout=out,
                    stderr=out,
                    cwd=tmp_path,
                )
            deadline = time.monotonic() + START_TIMEOUT
            while not sched_file.exists() or not sched_file.read_text().strip():
                assert time.monotonic() < deadline, "no scheduler:\n" + _log_tails(tmp_path)
                time.sleep(0.1)
            scheduler = json.loads(sched_file.read_text())["address"]
            for name in ("local-0", "local-1"):
                with log(name) as out:
                    local.start(
                        _worker_args(scheduler, name, host.host_address),
                        env=env,
                        stdout=out,
                        stderr=out,
                        cwd=tmp_path,
                    )
            with log("remote") as out:
                host.popen(
                    _worker_args(scheduler, "remote", host.address),
                    env=env,
                    stdout=out,
                    stderr=out,
                    cwd=str(tmp_path),
                )
            client = Client(scheduler, timeout=START_TIMEOUT, set_as_default=False)
            try:
                client.wait_for_workers(3, timeout=START_TIMEOUT)
            except TimeoutError as exc:
                raise AssertionError("workers did not start:\n" + _log_tails(tmp_path)) from exc
            by_name = {w["name"]: addr for addr, w in client.scheduler_info()["workers"].items()}
            yield TwoHosts(
                client, host, [by_name["local-0"], by_name["local-1"]], by_name["remote"]
            )
        finally:
            if client is not None:
                client.close()
            local.stop()


def _shm_names() -> set[str]:
    return set(os.listdir("/dev/shm"))


def _net_and_mount_ns() -> tuple[str, str]:
    return os.readlink("/proc/self/ns/net"), os.readlink("/proc/self/ns/mnt")


def _touch_shm(name: str) -> list[str]:
    Path("/dev/shm", name).touch()
    return sorted(os.listdir("/dev/shm"))


def test_second_host_worker_computes_with_its_own_network_and_shm(two_hosts: TwoHosts) -> None:
    c = two_hosts.client
    remote = two_hosts.remote
    assert remote.startswith(f"tcp://{two_hosts.host.address}:")
    for addr in two_hosts.local:
        assert addr.startswith(f"tcp://{two_hosts.host.host_address}:")

    # The remote worker runs in other namespaces than this process; the local
    # ones in the same.
    namespaces = c.run(_net_and_mount_ns)
    assert namespaces[remote][0] != _net_and_mount_ns()[0]
    assert namespaces[remote][1] != _net_and_mount_ns()[1]
    for addr in two_hosts.local:
        assert tuple(namespaces[addr]) == _net_and_mount_ns()

    # It computes, and gets its inputs from a local worker over the veth.
    x = c.submit(lambda: list(range(1000)), workers=two_hosts.local[0], pure=False)
    total = c.submit(sum, x, workers=remote, allow_other_workers=False)
    assert total.result(timeout=30) == sum(range(1000))
    assert c.who_has(total)[total.key] == (remote,)

    # A file it makes in /dev/shm is in its /dev/shm only.
    probe = f"pap-second-host-probe-{os.getpid()}"
    before = _shm_names()
    seen_there = c.run(_touch_shm, probe, workers=[remote])[remote]
    assert probe in seen_there
    assert probe not in _shm_names()
    assert _shm_names() == before


def test_second_host_is_gone_afterwards(namespaces_available: None) -> None:
    before = set(netns_list())
    with second_host() as host:
        proc = host.popen(["sleep", "600"])
        name = host.name
        assert name in netns_list()
        assert host.pids()
    assert name not in netns_list()
    assert set(netns_list()) == before - {name}
    assert proc.poll() is not None
