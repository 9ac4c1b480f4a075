"""A second "host" inside this machine, for tests that need two hosts.

`second_host()` makes a network namespace joined to this one by a veth pair on
a private /30, and one mount namespace with a fresh tmpfs on `/dev/shm`: what
runs there has its own network address and its own shared memory, as on
another machine, while it still sees this machine's files (the venv, the repo).
`SecondHost.popen` starts a program in it. On exit everything started there is
killed, and the namespace and the veth pair are deleted, whatever happened in
between.

Root is needed (`ip netns`, `mount`). `unavailable_reason()` says why a second
host cannot be made here (not root, no `ip`, or the kernel refuses: an
unprivileged container), so that a test can skip with that reason and only then.
This file is a helper, not a test module (pytest collects only test_*.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence

from helpers import group_alive

# Namespaces are named pap-<pid of the test process>-<n>, so that one left
# behind by a killed run can be recognised (its pid is dead) and removed.
NAME_PREFIX = "pap-"
# /30 subnets are taken from this /16, starting at a place chosen by the pid.
SUBNET_POOL = ipaddress.ip_network("10.213.0.0/16")
SHM_SIZE = "1g"
LOCK_FILE = os.path.join(
    "/run/lock" if os.path.isdir("/run/lock") else tempfile.gettempdir(),
    "pyarraypool-second-host.lock",
)

_counter = 0


class SecondHostError(RuntimeError):
    """The second host could not be set up or torn down."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise SecondHostError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def netns_list() -> list[str]:
    """Names of the network namespaces `ip netns` knows."""
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(name: str) -> list[int]:
    proc = _ip("netns", "pids", name, check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X", "x")
    except OSError:
        return False


def _kill_and_wait(pids: Sequence[int], timeout: float = 10.0) -> list[int]:
    """SIGKILLs `pids` and waits for them to go; returns those still there."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [p for p in left if running(p)]
        if left:
            time.sleep(0.05)
    return left


def _delete_netns(name: str, host_if: str | None) -> None:
    """Kills every process in namespace `name`, deletes the veth pair and the namespace."""
    left = _kill_and_wait(_netns_pids(name))
    if host_if is not None:
        # Deleting one end deletes both; the kernel would do it too when the
        # namespace goes, but later and asynchronously.
        _ip("link", "delete", host_if, check=False)
    _ip("netns", "delete", name, check=False)
    if left:
        raise SecondHostError(f"processes {left} of namespace {name} did not die")


def remove_stale() -> list[str]:
    """Deletes namespaces left by test processes that are dead (a killed run)."""
    removed = []
    for name in netns_list():
        rest = name[len(NAME_PREFIX) :]
        if not name.startswith(NAME_PREFIX) or "-" not in rest:
            continue
        pid = rest.split("-", 1)[0]
        if pid.isdigit() and not running(int(pid)):
            _delete_netns(name, None)
            removed.append(name)
    return removed


def _subnets_in_use() -> list[ipaddress.IPv4Network]:
    nets = []
    for line in _ip("-4", "-o", "addr", "show").stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            nets.append(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    for line in _ip("-4", "route", "show").stdout.splitlines():
        dest = line.split()[0] if line.split() else ""
        if dest and dest != "default":
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.ip_network(dest, strict=False))
    return nets


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 of SUBNET_POOL that overlaps no address or route of this host."""
    subnets = list(SUBNET_POOL.subnets(new_prefix=30))
    used = _subnets_in_use()
    start = (os.getpid() * 64 + _counter) % len(subnets)
    for i in range(len(subnets)):
        candidate = subnets[(start + i) % len(subnets)]
        if not any(candidate.overlaps(u) for u in used):
            return candidate  # type: ignore[return-value]
    raise SecondHostError(f"no free /30 left in {SUBNET_POOL}")


def unavailable_reason() -> str | None:
    """Why a second host cannot be made here, or None if it can (tried for real)."""
    if os.geteuid() != 0:
        return "needs root (ip netns, mount of a tmpfs on /dev/shm)"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (Debian: iproute2 has ip, util-linux unshare and nsenter)"
    try:
        with second_host() as host:
            host.run(["true"])
    except (SecondHostError, subprocess.SubprocessError, OSError) as exc:
        return f"cannot create network and mount namespaces here: {exc}"
    return None


class Processes:
    """Programs started in process groups of their own, all stopped by `stop()`."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            list(argv),
            start_new_session=True,
            **kwargs,  # type: ignore[call-overload]
        )
        self._procs.append(proc)
        return proc

    def pgids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def stop(self, grace: float = 20.0) -> list[list[str]]:
        """SIGTERM to every group (programs leave their pools on it), SIGKILL after `grace` s.

        A Dask worker's graceful close (it tells its scheduler, closes its
        comms, runs its plugins' teardown) took over 5 s once in a CI run on
        a busy 2-core machine; a process that hangs still fails the caller.

        Returns the command lines of the leaders that had to be SIGKILLed.
        """
        killed = []
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        # A leader still running gets SIGABRT first: a Python program run
        # with PYTHONFAULTHANDLER=1 then writes every thread's stack to its
        # log, which tells where it hung.
        stuck = [proc for proc in self._procs if proc.poll() is None]
        for proc in stuck:
            killed.append([str(a) for a in proc.args])  # type: ignore[union-attr]
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGABRT)
        for proc in stuck:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        # The leader may be gone while others of its group are not (an empty
        # group's id could be reused: signal only a group that has members).
        for proc in self._procs:
            if group_alive(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        return killed


class SecondHost:
    """A network namespace plus one mount namespace with its own /dev/shm."""

    def __init__(self, name: str, subnet: ipaddress.IPv4Network) -> None:
        self.name = name
        hosts = list(subnet.hosts())
        # Reachable from the second host: bind servers meant for it here.
        self.host_address = str(hosts[0])
        # The second host's own address.
        self.address = str(hosts[1])
        tag = name[len(NAME_PREFIX) :].replace("-", "x")
        self.host_if = f"pap{tag}h"[:15]
        self.peer_if = f"pap{tag}n"[:15]
        self._anchor: subprocess.Popen[str] | None = None
        self.processes = Processes()

    def _create(self) -> None:
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
        _ip("link", "set", self.peer_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_address}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.name, "addr", "add", f"{self.address}/30", "dev", self.peer_if)
        _ip("-n", self.name, "link", "set", self.peer_if, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")
        # One process holds the mount namespace that every program of this
        # host joins, so that they all share one /dev/shm, as on a machine.
        # `ip netns exec`, `unshare` and `sh` each exec the next, so the pid
        # of the Popen is the pid of the `sleep` that stays.
        self._anchor = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.name,
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"mount -t tmpfs -o size={SHM_SIZE},mode=1777 tmpfs /dev/shm"
                " && echo ready && exec sleep infinity",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self._anchor.stdout is not None
        line = self._anchor.stdout.readline()
        if line.strip() != "ready":
            self._anchor.wait(timeout=10)
            assert self._anchor.stderr is not None
            raise SecondHostError(
                f"could not mount a tmpfs on /dev/shm in namespace {self.name}: "
                f"{self._anchor.stderr.read().strip()}"
            )
        if os.readlink(f"/proc/{self._anchor.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            raise SecondHostError("the second host did not get a mount namespace of its own")

    def command(self, argv: Sequence[str], cwd: str | None = None) -> list[str]:
        """`argv` wrapped to run in this host (its network, its /dev/shm)."""
        assert self._anchor is not None
        return [
            "nsenter",
            f"--target={self._anchor.pid}",
            "--net",
            "--mount",
            f"--wd={cwd or os.getcwd()}",
            "--",
            *argv,
        ]

    def popen(
        self, argv: Sequence[str], *, cwd: str | None = None, **kwargs: object
    ) -> subprocess.Popen[bytes]:
        """Starts `argv` in this host, in a process group of its own; killed on exit."""
        return self.processes.start(self.command(argv, cwd), **kwargs)

    def run(
        self, argv: Sequence[str], *, timeout: float = 60, cwd: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Runs `argv` in this host to completion; raises on failure."""
        proc = subprocess.run(
            self.command(argv, cwd),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            raise SecondHostError(
                f"{' '.join(argv)} failed in {self.name} with {proc.returncode}: "
                f"{proc.stderr.strip()}"
            )
        return proc

    def pids(self) -> list[int]:
        """Every process in this host's network namespace (the anchor included)."""
        return _netns_pids(self.name)

    def _destroy(self) -> None:
        # The programs started here, then (in _delete_netns) any process
        # still in the namespace, even one that left its process group.
        self.processes.stop()
        _delete_netns(self.name, self.host_if)
        if self._anchor is not None:
            self._anchor.wait(timeout=5)
            for stream in (self._anchor.stdout, self._anchor.stderr):
                if stream is not None:
                    stream.close()
        # The veth pair and the namespace go synchronously with the commands
        # above; check rather than trust.
        if self.name in netns_list():
            raise SecondHostError(f"namespace {self.name} is still there")
        if _ip("link", "show", self.host_if, check=False).returncode == 0:
            raise SecondHostError(f"interface {self.host_if} is still there")


@contextlib.contextmanager
def second_host() -> Iterator[SecondHost]:
    """A fresh second host; everything in it is killed and deleted on exit."""
    global _counter
    _counter += 1
    # One test process at a time picks a subnet and puts addresses on it, so
    # that two concurrent runs cannot pick the same one.
    with open(LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        remove_stale()
        host = SecondHost(f"{NAME_PREFIX}{os.getpid()}-{_counter}", _free_subnet())
        try:
            host._create()
        except BaseException:
            host._destroy()
            raise
    try:
        yield host
    finally:
        host._destroy()
