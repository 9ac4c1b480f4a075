"""Rough edges a new user hit when trying the library from outside (issue 11).

Each test below failed before its fix; the behaviour it asserts is documented
in the README, docs/faq.md or docs/cli.md.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from helpers import REPO, fresh_env, pool_files, run_python
from test_config import needs_private_shm, run_with_shm

import pyarraypool

# --- PoolFullError when /dev/shm, not max_bytes, is what is short ------------------


@needs_private_shm
def test_pool_full_in_a_64_mib_dev_shm_names_dev_shm_and_shm_size():
    """Docker's default /dev/shm is 64 MiB, and max_bytes defaults to its
    size: a request larger than /dev/shm, and one that no longer fits once
    the pool has filled /dev/shm, cannot be helped by raising max_bytes. The
    message says so: it names /dev/shm (its size and free space) and how to
    make it larger, not max_bytes."""
    proc = run_with_shm("64M", """
    msgs = []
    try:
        pyarraypool.empty(100 << 20, dtype=np.uint8)        # larger than /dev/shm
    except pyarraypool.PoolFullError as e:
        msgs.append(str(e))
    arrs = []
    try:
        for _ in range(20):                                   # fills /dev/shm
            arrs.append(pyarraypool.empty(8 << 20, dtype=np.uint8))
    except pyarraypool.PoolFullError as e:
        msgs.append(str(e))
    assert len(msgs) == 2, msgs
    for m in msgs:
        print(m)
        print("----")
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for msg in proc.stdout.split("----")[:2]:
        assert "/dev/shm" in msg and "64.0 MiB" in msg and "free" in msg, msg
        assert "--shm-size" in msg and "remount,size=" in msg, msg
        assert "Raise max_bytes" not in msg and "configure(max_bytes" not in msg, msg


@needs_private_shm
def test_pool_full_under_max_bytes_still_advises_max_bytes():
    """When /dev/shm has room and max_bytes is the limit, raising max_bytes is
    the advice, and Docker's --shm-size is not."""
    proc = run_with_shm("64M", """
    pyarraypool.configure(max_bytes="16M")
    try:
        pyarraypool.empty(32 << 20, dtype=np.uint8)
    except pyarraypool.PoolFullError as e:
        print(e)
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    msg = proc.stdout
    assert "max_bytes=16777216" in msg and "configure(max_bytes=" in msg, msg
    assert "--shm-size" not in msg, msg


# --- a bad PYARRAYPOOL_* value: import works, first use raises ValueError ----------

BAD_SETTINGS = [
    ("PYARRAYPOOL_MAX_BYTES", "lots"),
    ("PYARRAYPOOL_TRANSFER_TIMEOUT", "-1"),
    ("PYARRAYPOOL_SEGMENT_BYTES", "0"),
]


@pytest.mark.parametrize("var,value", BAD_SETTINGS)
def test_bad_setting_variable_fails_at_first_use_not_at_import(var, value):
    """`import pyarraypool` works; every first use (allocation, make_transferable,
    stats, collect, configure that does not give that setting, loading a
    handle) raises ValueError naming the variable and its value, every time."""
    proc = run_python(f"""
    import pickle, numpy as np
    import pyarraypool                                  # must not raise
    uses = {{
        "empty": lambda: pyarraypool.empty(3),
        "make_transferable": lambda: pyarraypool.make_transferable(np.ones(3)),
        "stats": pyarraypool.stats,
        "collect": pyarraypool.collect,
        "pool_identity": pyarraypool.pool_identity,
        "configure": lambda: pyarraypool.configure(transfer_timeout=5)
                     if {var!r} != "PYARRAYPOOL_TRANSFER_TIMEOUT"
                     else pyarraypool.configure(max_bytes="1G"),
        "load": lambda: pickle.loads(HANDLE),
    }}
    for name, use in uses.items():
        for attempt in range(2):
            try:
                use()
            except ValueError as e:
                msg = str(e)
                assert {var!r} in msg and {value!r} in msg, (name, msg)
            else:
                raise AssertionError(name + " worked with {var}={value}")
    print("OK")
    """.replace("HANDLE", repr(_foreign_handle())), env=fresh_env(**{var: value}))
    assert "OK" in proc.stdout, proc.stdout + proc.stderr


def _foreign_handle() -> bytes:
    """A pickled pool array of this (pytest's) pool: a handle another program
    would try to load."""
    import pickle

    import numpy as np

    import pyarraypool
    x = pyarraypool.make_transferable(np.arange(3), transfer_required=False)
    return pickle.dumps(x)


def test_configure_giving_the_bad_setting_replaces_it():
    """configure() with the setting that the variable got wrong replaces it:
    the pool then works, and so do processes started afterwards."""
    proc = run_python("""
    import subprocess, sys
    import pyarraypool
    pyarraypool.configure(max_bytes="64M")
    a = pyarraypool.zeros(10)
    assert pyarraypool.stats().max_bytes == 64 << 20
    child = "import pyarraypool; print(pyarraypool.stats().max_bytes)"
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert out.stdout.strip() == str(64 << 20), out.stdout + out.stderr
    print("OK")
    """, env=fresh_env(PYARRAYPOOL_MAX_BYTES="lots"))
    assert "OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("var,value", BAD_SETTINGS)
@pytest.mark.parametrize("args", [["--help"], ["stats"], ["stats", "--json"], ["clean"],
                                  ["clean", "--dry-run"]])
def test_cli_works_with_a_bad_setting_variable(var, value, args):
    """The command line reads no setting: it does its job, and warns once on
    stderr, naming the variable."""
    proc = subprocess.run([sys.executable, "-m", "pyarraypool", *args],
                          env=fresh_env(**{var: value}), capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    if args != ["--help"]:
        assert proc.stderr.count(var) == 1 and "warning" in proc.stderr, proc.stderr
    if args[0] == "clean":
        assert "nothing to clean" in proc.stdout or "remove" in proc.stdout, proc.stdout
    if args == ["stats", "--json"]:
        json.loads(proc.stdout)


# --- make_transferable(pool_array, transfer_required=...) -------------------------


@pytest.mark.parametrize("made_with", [True, False])
def test_make_transferable_of_a_pool_array_honours_a_matching_or_omitted_flag(made_with):
    """An array already in the pool is returned as it is (no copy) when the
    flag is left out or matches the block's."""
    x = pyarraypool.zeros(8, transfer_required=made_with)
    assert pyarraypool.make_transferable(x) is x
    assert pyarraypool.make_transferable(x, transfer_required=made_with) is x
    v = pyarraypool.make_transferable(np.asarray(x)[2:], transfer_required=made_with)
    assert isinstance(v, pyarraypool.TransferableArray) and np.shares_memory(v, x)


@pytest.mark.parametrize("made_with", [True, False])
def test_make_transferable_of_a_pool_array_with_the_other_flag_raises(made_with):
    """The flag belongs to the block, which other processes may already
    share: it cannot change, and a silent copy would stop writes reaching
    them. So a different flag is a ValueError that names both and says how
    to get a copy with the flag wanted."""
    x = pyarraypool.zeros(8, transfer_required=made_with)
    for arr in (x, x[2:], np.asarray(x)):
        with pytest.raises(ValueError) as info:
            pyarraypool.make_transferable(arr, transfer_required=not made_with)
        msg = str(info.value)
        assert f"transfer_required={made_with}" in msg, msg
        assert f"transfer_required={not made_with}" in msg, msg
        assert f"make_transferable(x.copy(), transfer_required={not made_with})" in msg, msg
    y = pyarraypool.make_transferable(x.copy(), transfer_required=not made_with)
    assert not np.shares_memory(x, y)


# --- stats --watch into a file or a pipe ----------------------------------------


def test_stats_watch_into_a_file_writes_plain_snapshots(tmp_path):
    """`stats --watch > file` (or into a pipe): no screen-clearing escape
    codes, one snapshot after another, each starting with its timestamp line
    and set off from the previous by a blank line."""
    out = tmp_path / "watch.txt"
    with open(out, "wb") as f:
        watch = subprocess.Popen([sys.executable, "-m", "pyarraypool", "stats", "--watch", "0.1"],
                                 env=fresh_env(), cwd=REPO, stdout=f, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while out.read_bytes().count(b"pyarraypool stats at ") < 3:
            assert watch.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=30)
        assert watch.returncode == 0 and b"Traceback" not in err, err.decode()
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    text = out.read_text()
    assert "\x1b" not in text, repr(text[:200])
    assert text.startswith("pyarraypool stats at "), text
    starts = [m.start() for m in re.finditer(r"^pyarraypool stats at ", text, re.M)]
    assert len(starts) >= 3, text
    for s in starts[1:]:
        assert text[:s].endswith("\n\n"), repr(text[max(0, s - 80):s + 40])


# --- ndarray.resize on a pool array -------------------------------------------------


def test_resize_of_a_pool_array_says_why_and_what_to_do():
    """A pool array cannot grow or shrink in place: its memory is a block that
    other processes may hold. The ValueError (numpy's type) says so and names
    np.resize and make_transferable(np.resize(...)); a resize that keeps the
    size (a reshape in place) works as it does on numpy's own views."""
    x = pyarraypool.make_transferable(np.arange(6.0))
    for call in (lambda: x.resize(8), lambda: x.resize((2, 5)), lambda: x[1:].resize(3),
                 lambda: x.resize(8, refcheck=False)):
        with pytest.raises(ValueError) as info:
            call()
        msg = str(info.value)
        assert "shared-memory block" in msg and "other processes" in msg, msg
        assert "np.resize(x, shape)" in msg, msg
        assert "pyarraypool.make_transferable(np.resize(x, shape))" in msg, msg
    assert x.shape == (6,) and (x == np.arange(6.0)).all()
    x.resize((2, 3))                                  # same size: allowed, as in numpy
    assert x.shape == (2, 3) and x[1, 2] == 5
    with pytest.raises(ValueError, match="negative"):
        x.resize(-1)                                  # numpy's own errors are numpy's
    y = pyarraypool.make_transferable(np.resize(x, (3, 3)))
    assert isinstance(y, pyarraypool.TransferableArray) and y.shape == (3, 3)


# --- a subprocess tool with settings of its own -----------------------------------

TOOL = """
import logging, os, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(message)s")
import pyarraypool
{before}
try:
    pyarraypool.configure(max_bytes="{tool_max}")
except pyarraypool.PoolError as e:
    print("REFUSED", e)
else:
    a = pyarraypool.zeros(1000)
    s = pyarraypool.stats()
    print("TOOL", s.pool, s.max_bytes, os.environ["PYARRAYPOOL_POOL"])
"""

PARENT = """
import os, subprocess, sys
import pyarraypool
pyarraypool.configure(max_bytes="64M")
x = pyarraypool.zeros(10)
s = pyarraypool.stats()
print("PARENT", s.pool)
out = subprocess.run([sys.executable, "-c", TOOL], capture_output=True, text=True)
print(out.stdout, out.stderr)
assert out.returncode == 0
after = pyarraypool.stats()
print("AFTER", after.pool, after.max_bytes, after.processes)
"""


def run_parent_and_tool(tool_max: str, before: str = "") -> tuple[str, str]:
    tool = TOOL.format(tool_max=tool_max, before=before)
    proc = run_python(PARENT.replace("TOOL]", repr(tool) + "]"))
    out = proc.stdout
    parent = re.search(r"^PARENT (\w+)$", out, re.M).group(1)
    after = re.search(r"^AFTER (\w+) (\d+) (\d+)$", out, re.M)
    # The program's own pool is untouched: same token, settings, one process.
    assert after.groups() == (parent, str(64 << 20), "1"), out
    return parent, out


def test_subprocess_tool_with_other_settings_gets_a_pool_of_its_own():
    """A Python tool started with subprocess inherits the program's pool name;
    if it has not used the pool yet and configure() asks for other settings,
    it moves to a fresh pool of its own (one INFO log line says so) instead of
    failing with "the pool is already running with ..."."""
    parent, out = run_parent_and_tool("32M")
    assert "REFUSED" not in out, out
    tool = re.search(r"^TOOL (\w+) (\d+) (\w+)$", out, re.M)
    assert tool, out
    assert tool.group(1) != parent and tool.group(1) == tool.group(3), out
    assert tool.group(2) == str(32 << 20), out
    log = [ln for ln in out.splitlines() if ln.startswith("LOG ")]
    assert len(log) == 1 and parent in log[0] and tool.group(1) in log[0], out
    assert "own pool" in log[0], out
    assert not pool_files(tool.group(1)) and not pool_files(parent), out


def test_subprocess_tool_with_the_same_settings_shares_the_program_pool():
    parent, out = run_parent_and_tool("64M")
    tool = re.search(r"^TOOL (\w+) (\d+)", out, re.M)
    assert tool and tool.group(1) == parent, out
    assert "LOG " not in out, out


def test_subprocess_tool_that_already_uses_the_pool_keeps_it():
    """Once the tool has used the program's pool (here: stats()), it is part of
    it: configure() with other settings raises PoolError as before."""
    _, out = run_parent_and_tool("32M", before="pyarraypool.stats()")
    assert "REFUSED" in out and "already running" in out, out


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_multiprocessing_children_never_leave_the_program_pool(method, tmp_path):
    """Contract point 12: workers of multiprocessing (and so of
    concurrent.futures) share the program's pool; configure() with other
    settings there still raises PoolError."""
    program = tmp_path / "program.py"  # spawn workers import the main module
    program.write_text(textwrap.dedent(f"""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    import pyarraypool

    def child():
        try:
            pyarraypool.configure(max_bytes="32M")
        except pyarraypool.PoolError as e:
            return "REFUSED " + str(e)
        return "MOVED " + pyarraypool.stats().pool

    if __name__ == "__main__":
        pyarraypool.configure(max_bytes="64M")
        x = pyarraypool.zeros(10)
        ctx = multiprocessing.get_context({method!r})
        with ctx.Pool(1) as pool:
            print(pool.apply(child))
        with ProcessPoolExecutor(1, mp_context=ctx) as ex:
            print(ex.submit(child).result())
    """))
    proc = subprocess.run([sys.executable, str(program)], env=fresh_env(), capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(ln.startswith("REFUSED") for ln in lines), proc.stdout
