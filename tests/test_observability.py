"""Observability: the pool's identity, statistics, warnings and error messages."""

from __future__ import annotations

import json
import multiprocessing
import os
import secrets
import shutil
import subprocess
import sys

import pytest
from helpers import fresh_env, run_python

import pyarraypool

HEX32 = set("0123456789abcdef")


def is_hex32(s: str) -> bool:
    return len(s) == 32 and set(s) <= HEX32


def this_boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


# ------------------------------------------------------------------ identity

def test_pool_identity_names_this_pool_this_boot():
    ident = pyarraypool.pool_identity()
    assert set(ident) == {"token", "instance", "boot_id"}
    assert ident["token"] == pyarraypool._core._pool_token()
    assert ident["token"] == os.environ["PYARRAYPOOL_POOL"]
    assert is_hex32(ident["instance"])
    assert ident["instance"] != ident["token"]
    assert ident["boot_id"] == this_boot_id()
    assert pyarraypool.pool_identity() == ident  # written once, stable
    assert pyarraypool._core._pool_identity() == ident


def test_pool_identity_attaches_a_process_that_has_not_used_the_pool():
    out = run_python(
        """
        import json, pyarraypool
        assert pyarraypool._core._pool_token() is None  # importing does not attach
        ident = pyarraypool.pool_identity()
        assert pyarraypool._core._pool_token() == ident["token"]
        print(json.dumps(ident))
        """
    )
    ident = json.loads(out.stdout)
    assert is_hex32(ident["token"]) and is_hex32(ident["instance"])


def _identity_in_child(queue) -> None:
    queue.put(dict(pyarraypool.pool_identity()))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_processes_of_one_program_have_equal_identities(method):
    mine = pyarraypool.pool_identity()
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    proc = ctx.Process(target=_identity_in_child, args=(queue,))
    proc.start()
    try:
        theirs = queue.get(timeout=60)
    finally:
        proc.join(60)
    assert proc.exitcode == 0
    assert theirs == mine


def test_a_subprocess_of_this_program_has_an_equal_identity():
    # Started with this program's environment (PYARRAYPOOL_POOL inherited).
    env = dict(os.environ)
    env["PYTHONPATH"] = fresh_env()["PYTHONPATH"]
    out = run_python("import json, pyarraypool; print(json.dumps(pyarraypool.pool_identity()))",
                     env=env)
    assert json.loads(out.stdout) == pyarraypool.pool_identity()


def test_an_unrelated_program_has_another_pool():
    mine = pyarraypool.pool_identity()
    out = run_python("import json, pyarraypool; print(json.dumps(pyarraypool.pool_identity()))")
    theirs = json.loads(out.stdout)
    assert theirs["token"] != mine["token"]
    assert theirs["instance"] != mine["instance"]
    assert theirs["boot_id"] == mine["boot_id"]


def test_a_pool_recreated_under_the_same_token_is_another_instance():
    token = secrets.token_hex(16)
    code = "import json, pyarraypool; print(json.dumps(pyarraypool.pool_identity()))"
    first = json.loads(run_python(code, env=fresh_env(PYARRAYPOOL_POOL=token)).stdout)
    second = json.loads(run_python(code, env=fresh_env(PYARRAYPOOL_POOL=token)).stdout)
    assert first["token"] == second["token"] == token
    assert first["instance"] != second["instance"]


def _can_mount_private_shm() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", "mount -t tmpfs none /dev/shm"],
        capture_output=True, timeout=30,
    )
    return probe.returncode == 0


def test_the_same_token_in_another_shm_mount_is_another_instance():
    if not _can_mount_private_shm():
        pytest.skip("unshare -Urm cannot mount a private /dev/shm here")
    mine = pyarraypool.pool_identity()
    code = "import json, pyarraypool; print(json.dumps(pyarraypool.pool_identity()))"
    # A program with our token, but in a mount namespace with its own /dev/shm.
    script = f"mount -t tmpfs none /dev/shm && exec {sys.executable} -c '{code}'"
    proc = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script],
        env=fresh_env(PYARRAYPOOL_POOL=mine["token"]),
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    theirs = json.loads(proc.stdout)
    assert theirs["token"] == mine["token"]
    assert theirs["boot_id"] == mine["boot_id"]
    assert theirs["instance"] != mine["instance"]
    # Our pool is untouched by the other one.
    assert pyarraypool.pool_identity() == mine
