"""Helpers for tests that run Python in a child program."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import pyarraypool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The time the stress tests (soak, fuzzers, property tests) spend: full by
# default; PAP_TEST_STRESS=short shortens them, never skips them. CI spends
# the full budget on its main Python and the short one on every other
# Python and NumPy, where the same tests check the same code again.
SHORT_STRESS = os.environ.get("PAP_TEST_STRESS") == "short"


def stress(full: int, short: int) -> int:
    """`full`, or `short` under PAP_TEST_STRESS=short."""
    return short if SHORT_STRESS else full


def fresh_env(**extra: str) -> dict[str, str]:
    """The environment of an unrelated program: no inherited pool name."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYARRAYPOOL_")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_python(code: str, *, env: dict[str, str] | None = None, timeout: float = 120,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs `code` (dedented) in a new Python program with its own pool."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=fresh_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"child failed with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def pool_files(token: str) -> list[str]:
    """The /dev/shm entries of the pool `token`."""
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("pyarraypool-" + token))


def remove_pool_files(token: str) -> None:
    """Unlinks whatever of the pool `token` is in /dev/shm (test teardown)."""
    for name in pool_files(token):
        try:
            os.unlink("/dev/shm/" + name)
        except FileNotFoundError:
            pass


def my_pool_token() -> str:
    pyarraypool.stats()  # attaches
    token = pyarraypool._core._pool_token()
    assert token is not None
    return token


def group_alive(pgid: int) -> list[int]:
    """Processes of group `pgid` that are still running (zombies are dead)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X", "x"):
            alive.append(int(entry))
    return alive


# The keeper of a pool (docs/design.md, "Keeper"): a process outside the
# program's session that removes the pool's files once every process of the
# program is dead. It is found by its command line, which names the pool.
KEEPER_MARK = "pyarraypool._keeper"
KEEPER_COMM = "pap-keeper"  # its name once it watches the pool


def _proc_state(pid: int) -> str | None:
    """The /proc state letter of `pid`, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def running(pid: int) -> bool:
    """`pid` exists and is not a zombie."""
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X", "x")


def keeper_pids(token: str, *, watching: bool = False) -> list[int]:
    """Running keepers of the pool `token`; with `watching`, only those
    that have started watching it (their name is set then)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if token.encode() not in argv or not any(KEEPER_MARK.encode() in a for a in argv):
            continue
        if (comm == KEEPER_COMM or not watching) and running(int(entry)):
            found.append(int(entry))
    return found


def kill_keeper(token: str, *, expect: bool = True, timeout: float = 10) -> list[int]:
    """SIGKILLs the keeper of the pool `token` (what only a SIGKILL of every
    process, the keeper included, does) and waits until it is dead. With
    `expect`, first waits for it to exist (its creator starts it a moment
    after making the pool) and fails if it never does."""
    deadline = time.monotonic() + timeout
    pids = keeper_pids(token)
    while expect and not pids:
        assert time.monotonic() < deadline, f"the pool {token} has no keeper"
        time.sleep(0.01)
        pids = keeper_pids(token)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    while any(running(pid) for pid in pids):
        assert time.monotonic() < deadline, f"keeper {pids} of {token} still running"
        time.sleep(0.01)
    return pids


def build_preload_shim(tmp_path: pathlib.Path, name: str, source: str) -> str:
    """Compiles the C `source` of an LD_PRELOAD shim (one that widens a race
    window) into tmp_path/name.so and returns its path; skips without gcc."""
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the LD_PRELOAD shim")
    src = tmp_path / f"{name}.c"
    src.write_text(source)
    lib = tmp_path / f"{name}.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(lib), str(src), "-ldl"],
                   check=True)
    return str(lib)
