"""Helpers for tests that run Python in a child program."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pyarraypool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
