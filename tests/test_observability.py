"""Observability: the pool's identity, statistics, warnings and error messages."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import secrets
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers import fresh_env, run_python
from test_config import needs_private_shm, run_with_shm

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


# ------------------------------------------------------------------ warnings

# A process of this program (it inherits PYARRAYPOOL_POOL) that holds three
# arrays of known sizes until it is killed; it prints its pid and the sizes
# of its blocks (headers included).
HOLDER = """
import json, os, sys
import numpy as np, pyarraypool
from pyarraypool import _core
arrs = [pyarraypool.zeros(n, dtype=np.uint8) for n in (10_000, 200_000, 3_000_000)]
sizes = [_core._test_block_info(a)["size"] for a in arrs]
if "--lock" in sys.argv:
    _core._test_lock_forever()   # dies inside an operation on the pool
print(json.dumps({"pid": os.getpid(), "sizes": sizes}), flush=True)
sys.stdin.read()
"""


def this_program_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = fresh_env()["PYTHONPATH"]
    return env


def another_program_env(root: str | None = None) -> dict[str, str]:
    """Another program sharing our pool by name (PYARRAYPOOL_POOL): it picks
    a root of its own, or is given `root` ("none": a pool shared by
    independent programs, as Dask's host pool)."""
    env = fresh_env(PYARRAYPOOL_POOL=os.environ["PYARRAYPOOL_POOL"])
    if root is not None:
        env["PYARRAYPOOL_ROOT"] = root
    return env


def start_holder(env: dict[str, str] | None = None,
                 *args: str) -> tuple[subprocess.Popen[str], int, list[int]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, *args],
                            env=this_program_env() if env is None else env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        proc.kill()
        proc.wait()
        raise AssertionError("the holder did not start")
    info = json.loads(line)
    return proc, info["pid"], info["sizes"]


def pool_records(caplog) -> list:
    return [r for r in caplog.records if r.name == "pyarraypool"]


def reclaim_killed_holder(caplog, env: dict[str, str] | None, *args: str, same_program: bool,
                          held_lock: bool = False) -> logging.LogRecord:
    """Starts a holder, SIGKILLs it, collects: the one record, its numbers checked."""
    caplog.set_level(logging.DEBUG, logger="pyarraypool")
    proc, pid, sizes = start_holder(env, *args)
    used = None if args else pyarraypool.stats().used_bytes  # stats() would wait for the lock
    try:
        os.kill(pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert pool_records(caplog) == []
    freed = pyarraypool.collect()
    # The repair of a lock happens as the lock is taken, before collect()
    # itself looks: the event alone counts what it freed.
    assert freed >= (0 if args else sum(sizes)), freed
    records = pool_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    rec = records[0]
    msg = rec.getMessage()
    assert f"pid {pid}" in msg and "3 blocks" in msg and str(sum(sizes)) in msg, msg
    assert rec.pyarraypool_event == {
        "kind": "reclaim", "pid": pid, "reserved": False, "same_program": same_program,
        "held_lock": held_lock, "blocks": 3, "bytes": sum(sizes), "freed_bytes": sum(sizes),
        "pickles": 0, "age": 0.0, "transfer_timeout": 0.0}, rec.pyarraypool_event
    if used is not None:
        assert pyarraypool.stats().used_bytes == used - sum(sizes)
    # Once reclaimed, it is not reported again.
    pyarraypool.collect()
    pyarraypool.stats()
    assert len(pool_records(caplog)) == 1
    return rec


def test_reclaiming_from_a_killed_process_of_this_program_logs_one_debug_record(caplog):
    # This program stopped its own process: routine (Pool.terminate() does
    # the same to workers that may hold arrays), so DEBUG, not WARNING.
    rec = reclaim_killed_holder(caplog, None, same_program=True)
    assert rec.levelno == logging.DEBUG


def test_a_process_of_this_program_killed_holding_the_lock_logs_one_warning(caplog):
    # It died inside an operation on the pool, which its survivors repaired:
    # worth a warning whoever stopped it.
    rec = reclaim_killed_holder(caplog, None, "--lock", same_program=True, held_lock=True)
    assert rec.levelno == logging.WARNING
    assert "died holding the pool's lock" in rec.getMessage(), rec.getMessage()


@pytest.mark.parametrize("root", [None, "none"], ids=["own-root", "no-root"])
def test_reclaiming_from_a_killed_process_of_another_program_logs_one_warning(caplog, root):
    # A pool shared by name with another program, or by independent
    # programs (root "none"): what one of them held may have been data the
    # others were still waiting for, and this program did not stop it.
    rec = reclaim_killed_holder(caplog, another_program_env(root), same_program=False)
    assert rec.levelno == logging.WARNING


def test_a_logging_error_never_escapes_from_the_pool(caplog):
    """A filter that raises makes logger.warning() raise: the reclaim still
    happens and collect() returns normally."""

    def explode(record):
        raise RuntimeError("broken logging configuration")

    logger = logging.getLogger("pyarraypool")
    # Another program's process: its reclaim is a warning, which reaches the
    # filter whatever the logger's level.
    proc, pid, sizes = start_holder(another_program_env())
    logger.addFilter(explode)
    try:
        os.kill(pid, signal.SIGKILL)
        proc.wait(30)
        assert pyarraypool.collect() >= sum(sizes)
        arr = pyarraypool.zeros(10)  # the pool works on
        del arr
    finally:
        logger.removeFilter(explode)


EXPIRY = """
import gc, json, logging, os, pickle, time
import numpy as np, pyarraypool
from pyarraypool import _core
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append((record.getMessage(), record.pyarraypool_event))
logging.getLogger("pyarraypool").addHandler(Keep())
a = pyarraypool.zeros(100_000, dtype=np.uint8)
size = _core._test_block_info(a)["size"]
blob = pickle.dumps(a)       # pending, never loaded
blob2 = pickle.dumps(a)      # a second pickle of the same block
b = pyarraypool.zeros(10, dtype=np.uint8)
blob3 = pickle.dumps(b, protocol=5)
loaded = pickle.loads(blob3)  # loaded: not pending any more
del a, b, loaded
gc.collect()
assert pyarraypool.stats().pending_transfers == 2
assert pyarraypool.collect() == 0 and records == []   # not yet expired
time.sleep(0.6)
freed = pyarraypool.collect()
pyarraypool.collect()
print(json.dumps({"pid": os.getpid(), "size": size, "freed": freed, "records": records,
                  "stats": pyarraypool.stats().pending_transfers}))
"""


def test_an_expired_pickle_logs_one_warning():
    out = run_python(EXPIRY, env=fresh_env(PYARRAYPOOL_TRANSFER_TIMEOUT="0.3"))
    res = json.loads(out.stdout)
    assert res["freed"] == res["size"] and res["stats"] == 0, res
    assert len(res["records"]) == 1, res["records"]
    msg, event = res["records"][0]
    assert event["kind"] == "expiry" and event["pid"] == res["pid"], event
    assert (event["blocks"], event["pickles"]) == (1, 2), event
    assert event["bytes"] == event["freed_bytes"] == res["size"], event
    assert event["transfer_timeout"] == pytest.approx(0.3)
    assert 0.3 <= event["age"] < 30, event
    assert f"pid {res['pid']}" in msg and str(res["size"]) in msg and "2 pickles" in msg, msg
    assert "transfer_timeout=0.3 s" in msg, msg
    # With nothing configured, Python's last-resort handler shows it on stderr.
    assert out.stderr == "", out.stderr  # our handler took it here


def test_without_logging_configured_the_warning_reaches_stderr():
    code = EXPIRY.replace('logging.getLogger("pyarraypool").addHandler(Keep())', "")
    code = code.replace("records == []", "True")
    out = run_python(code, env=fresh_env(PYARRAYPOOL_TRANSFER_TIMEOUT="0.3"))
    pid = json.loads(out.stdout)["pid"]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("pyarraypool:")]
    assert len(lines) == 1 and f"pid {pid}" in lines[0] and "never loaded" in lines[0], out.stderr


# ------------------------------------------------------------ PoolFullError

FULL = """
import json, os, pickle, subprocess, sys
import numpy as np, pyarraypool
from pyarraypool import _core
pyarraypool.configure(max_bytes="8M", segment_bytes="1M", transfer_timeout=300)
mine = [pyarraypool.zeros(1_500_000, dtype=np.uint8) for _ in range(2)]
sent = pyarraypool.zeros(1_000_000, dtype=np.uint8)
blob = pickle.dumps(sent)
del sent          # only the pickle keeps it now
child = subprocess.Popen([sys.executable, "-c", '''
import sys, numpy as np, pyarraypool
x = pyarraypool.zeros(2_500_000, dtype=np.uint8)
print("ready", flush=True)
sys.stdin.read()
'''], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
assert child.stdout.readline() == "ready\\n"
try:
    pyarraypool.empty(3_000_000, dtype=np.uint8)
except pyarraypool.PoolFullError as e:
    msg = str(e)
else:
    msg = None
child.stdin.close()
child.wait()
held = sum(_core._test_block_info(a)["size"] for a in mine)
print(json.dumps({"msg": msg, "pid": os.getpid(), "child": child.pid, "held": held}))
"""


def test_pool_full_error_says_what_uses_the_pool_and_what_to_raise():
    res = json.loads(run_python(FULL).stdout)
    msg = res["msg"]
    assert msg is not None, "3 MB more in an 8 MiB pool holding 7 MB"
    assert "3000000 bytes" in msg, msg                       # the request
    assert f"max_bytes={8 << 20}" in msg, msg                 # the limit
    # The holders, most bytes first: us (3 MB in two blocks), then the child
    # (2.5 MB in one).
    child_at = msg.index(f"pid {res['child']}: ")
    mine_at = msg.index(f"pid {res['pid']}: ")
    assert mine_at < child_at, msg
    assert f"({res['held']} bytes) in 2 blocks" in msg[mine_at:child_at], msg
    assert "in 1 block;" in msg[child_at:], msg
    # The pending pickle, with its size and age.
    assert "1 pickle pending" in msg and "the oldest made" in msg, msg
    assert "transfer_timeout=300.0 s" in msg, msg
    # The settings to raise.
    assert "pyarraypool.configure(max_bytes=...)" in msg and "PYARRAYPOOL_MAX_BYTES" in msg, msg
    assert "/dev/shm has" in msg, msg


@needs_private_shm
def test_pool_full_error_on_a_full_dev_shm_says_so():
    proc = run_with_shm("8M", """
    pyarraypool.configure(max_bytes="1G", segment_bytes="2M")
    arrs = []
    try:
        for _ in range(16):
            arrs.append(pyarraypool.zeros(1 << 20, dtype=np.uint8))
    except pyarraypool.PoolFullError as e:
        msg = str(e)
    else:
        raise AssertionError("16 MiB of arrays in an 8 MiB /dev/shm")
    print(json.dumps({"msg": msg, "pid": os.getpid(), "n": len(arrs)}))
    """.replace("pyarraypool.configure", "import json\n    pyarraypool.configure"))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    msg = res["msg"]
    assert str(1 << 20) in msg, msg
    assert "/dev/shm is the limit" in msg and "--shm-size" in msg, msg
    assert "/dev/shm has" in msg and "free of 8.0 MiB" in msg, msg
    assert f"pid {res['pid']}: " in msg and f"in {res['n']} blocks" in msg, msg


# ------------------------------------------------------------------ stats(detail=True)

def test_stats_detail_shows_this_process_holdings_and_pending():
    before = pyarraypool.stats(detail=True)
    plain = pyarraypool.stats()
    assert (plain.size_classes, plain.holdings, plain.pending) == ((), (), ())
    a = pyarraypool.zeros(300_000, dtype=np.uint8)
    size = pyarraypool._core._test_block_info(a)["size"]
    blob = pickle.dumps(a)
    s = pyarraypool.stats(detail=True)
    (me,) = [h for h in s.holdings if h["pid"] == os.getpid()]
    (was,) = [h for h in before.holdings if h["pid"] == os.getpid()] or [
        {"blocks": 0, "bytes": 0}]
    assert (me["blocks"], me["bytes"]) == (was["blocks"] + 1, was["bytes"] + size)
    mine = [t for t in s.pending if t["block_size"] == size and t["pid"] == os.getpid()]
    assert len(mine) == 1 and mine[0]["pickles"] == 1, s.pending
    assert s.pending_bytes == before.pending_bytes + size
    assert sum(c["used_bytes"] for c in s.size_classes) == s.used_bytes
    assert sum(c["free_bytes"] for c in s.size_classes) == s.free_bytes
    del a
    pickle.loads(blob)  # consumes the pickle; the loaded array is dropped at once
    assert pyarraypool.stats(detail=True).pending_bytes == before.pending_bytes
