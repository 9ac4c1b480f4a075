"""The command line: `python -m pyarraypool stats [--pool TOKEN] [--json] [--watch [S]]`
and `python -m pyarraypool clean [--dry-run]`."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import REPO, fresh_env, group_alive, kill_keeper, my_pool_token, pool_files

TOKEN_LINE = re.compile(r"^TOKEN ([0-9a-f]{32})$", re.M)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyarraypool", *args], env=fresh_env(),
                          capture_output=True, text=True, timeout=60, cwd=REPO)


class Program:
    """A child program in its own session; it runs until its stdin closes."""

    def __init__(self, code: str, path):
        path.with_suffix(".py").write_text(textwrap.dedent(code))
        self.out = path.with_suffix(".out")
        with open(self.out, "w") as out:
            self.proc = subprocess.Popen([sys.executable, str(path.with_suffix(".py"))],
                                         env=fresh_env(), stdin=subprocess.PIPE, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.out.read_text(), re.M)
            if m:
                return m
            assert self.proc.poll() is None, f"the child exited:\n{self.out.read_text()}"
            assert time.monotonic() < deadline, f"no {pattern!r}:\n{self.out.read_text()}"
            time.sleep(0.02)

    @property
    def token(self) -> str:
        return self.wait_for(TOKEN_LINE.pattern).group(1)

    def finish(self, timeout: float = 30) -> None:
        self.proc.stdin.close()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the child did not exit:\n{self.out.read_text()}") from None
        assert rc == 0, self.out.read_text()
        deadline = time.monotonic() + timeout
        while group_alive(self.proc.pid):
            assert time.monotonic() < deadline
            time.sleep(0.01)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        deadline = time.monotonic() + 10
        while group_alive(self.proc.pid):
            assert time.monotonic() < deadline
            time.sleep(0.01)


@pytest.fixture
def program(tmp_path):
    started: list[Program] = []

    def start(code: str) -> Program:
        p = Program(code, tmp_path / f"prog{len(started)}")
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
        for token in TOKEN_LINE.findall(p.out.read_text()):
            for name in pool_files(token):
                try:
                    os.unlink("/dev/shm/" + name)
                except FileNotFoundError:
                    pass


# A program with two arrays (one of them pickled and never loaded) and a
# forked worker; it prints its own view of the pool as JSON.
BUSY = """
    import json, os, pickle, sys, time, dataclasses
    import numpy as np, pyarraypool
    a = pyarraypool.make_transferable(np.arange(100_000.0))
    b = pyarraypool.zeros(1000)
    blob = pickle.dumps(b)
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.write(ready_w, b"x")  # this process is attached now
        os.read(r, 1)            # until the parent exits
        os._exit(0)
    os.close(r)
    os.read(ready_r, 1)
    s = pyarraypool.stats()
    print("TOKEN", pyarraypool._core._pool_token(), flush=True)
    print("STATS", json.dumps(dataclasses.asdict(s)), flush=True)
    sys.stdin.read()
    os.close(w)
    os.waitpid(pid, 0)
"""


def own_stats(p: Program) -> dict:
    return json.loads(p.wait_for(r"^STATS (.*)$").group(1))


def test_help_and_usage():
    r = cli("--help")
    assert r.returncode == 0 and "stats" in r.stdout and "clean" in r.stdout, r.stdout
    r = cli()
    assert r.returncode == 2 and "usage" in r.stderr.lower(), r.stderr
    r = cli("frobnicate")
    assert r.returncode == 2, r.stderr
    for sub in ("stats", "clean"):
        r = cli(sub, "--help")
        assert r.returncode == 0, r.stderr
    assert "--json" in cli("stats", "--help").stdout
    assert "--dry-run" in cli("clean", "--help").stdout


def test_stats_json_describes_a_live_pool(program):
    p = program(BUSY)
    token, mine = p.token, own_stats(p)
    r = cli("stats", "--json")
    assert r.returncode == 0, r.stderr
    pools = json.loads(r.stdout)
    assert isinstance(pools, list)
    by_token = {d["pool"]: d for d in pools}
    assert token in by_token, r.stdout
    assert my_pool_token() in by_token, "the pytest process's pool is not listed"
    d = by_token[token]
    for key in ("used_bytes", "capacity_bytes", "live_blocks", "pending_transfers",
                "segments", "max_bytes", "segment_bytes"):
        assert d[key] == mine[key], (key, d, mine)
    assert d["live_blocks"] == 2 and d["pending_transfers"] == 1, d
    assert d["used_bytes"] >= 800_000 + 8000, d
    # The program's two processes, not the inspecting command.
    assert d["processes"] == 2, d
    assert set(d["pids"]) == set(mine["pids"]) and len(d["pids"]) == 2, (d, mine)
    p.finish()
    assert pool_files(token) == [], "inspecting the pool kept it from being removed"


def test_stats_table_is_readable(program):
    p = program(BUSY)
    token, mine = p.token, own_stats(p)
    r = cli("stats")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    for column in ("POOL", "PROCS", "USED", "CAPACITY", "BLOCKS", "PENDING"):
        assert column in header, lines[0]
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[1:]]
    mine_rows = [cells for cells in rows if cells[0] == token]
    assert len(mine_rows) == 1, r.stdout
    assert len(mine_rows[0]) == len(header), (header, mine_rows)
    row = dict(zip(header, mine_rows[0], strict=True))
    assert row["PROCS"] == "2" and row["BLOCKS"] == "2" and row["PENDING"] == "1", row
    # Sizes for people: 781.4 KiB, 64.0 MiB.
    assert re.fullmatch(r"\d+(\.\d)? (B|KiB|MiB|GiB|TiB)", row["USED"]), row
    assert re.fullmatch(r"\d+(\.\d)? (B|KiB|MiB|GiB|TiB)", row["CAPACITY"]), row
    used = float(row["USED"].split()[0]) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20,
                                            "GiB": 1 << 30, "TiB": 1 << 40}[row["USED"].split()[1]]
    assert abs(used - mine["used_bytes"]) <= 0.001 * mine["used_bytes"] + 1024, (row, mine)
    p.finish()


def test_stats_of_one_pool(program):
    p = program(BUSY)
    other = program(BUSY)
    token, other_token = p.token, other.token
    r = cli("stats", "--pool", token, "--json")
    assert r.returncode == 0, r.stderr
    pools = json.loads(r.stdout)
    assert [d["pool"] for d in pools] == [token], r.stdout
    r = cli("stats", "--pool", token)
    assert r.returncode == 0 and token in r.stdout and other_token not in r.stdout, r.stdout
    p.finish()
    other.finish()
    # A pool that does not exist (any more) is an error, and so is a bad token.
    r = cli("stats", "--pool", token)
    assert r.returncode != 0 and token in r.stderr, (r.stdout, r.stderr)
    r = cli("stats", "--pool", "not-a-token", "--json")
    assert r.returncode != 0, r.stdout


def test_stats_shows_a_dead_program_and_clean_removes_it(program):
    p = program(BUSY)
    token = p.token
    kill_keeper(token)   # with the program: else the keeper removes the pool at once
    p.kill()
    files = pool_files(token)
    assert f"pyarraypool-{token}" in files, files

    r = cli("stats", "--pool", token, "--json")
    assert r.returncode == 0, r.stderr
    (d,) = json.loads(r.stdout)
    assert d["processes"] == 0 and d["pids"] == [], d
    assert pool_files(token) == files, "stats changed /dev/shm"

    r = cli("clean", "--dry-run")
    assert r.returncode == 0, r.stderr
    for name in files:
        assert f"would remove /dev/shm/{name}" in r.stdout.splitlines(), r.stdout
    assert pool_files(token) == files, "clean --dry-run removed something"

    r = cli("clean")
    assert r.returncode == 0, r.stderr
    for name in files:
        assert f"removed /dev/shm/{name}" in r.stdout.splitlines(), r.stdout
    assert pool_files(token) == []

    r = cli("clean", "--dry-run")
    assert r.returncode == 0 and token not in r.stdout, r.stdout


def test_cli_keeps_live_pools_and_makes_none_of_its_own(program):
    p = program(BUSY)
    token = p.token
    before = {n for n in os.listdir("/dev/shm") if n.startswith("pyarraypool-")}
    for args in (("stats",), ("stats", "--json"), ("clean", "--dry-run"), ("clean",)):
        r = cli(*args)
        assert r.returncode == 0, (args, r.stderr)
        assert f"remove /dev/shm/pyarraypool-{token}" not in r.stdout, r.stdout
        assert f"removed /dev/shm/pyarraypool-{token}" not in r.stdout, r.stdout
    after = {n for n in os.listdir("/dev/shm") if n.startswith("pyarraypool-")}
    assert after - before == set(), f"the command left {after - before}"
    assert f"pyarraypool-{token}" in after
    # The program still works and, as its last process leaves, removes its pool.
    assert own_stats(p)["pool"] == token
    p.finish()
    assert pool_files(token) == []


# A program whose main process holds three arrays of known sizes, one of them
# pickled and never loaded, and a forked child that holds nothing of its own.
HOLDER = """
    import json, os, pickle, sys
    import numpy as np, pyarraypool
    from pyarraypool import _core
    arrs = [pyarraypool.zeros(n, dtype=np.uint8) for n in (10_000, 200_000, 3_000_000)]
    blob = pickle.dumps(arrs[1])
    sizes = [_core._test_block_info(a)["size"] for a in arrs]
    print("TOKEN", _core._pool_token(), flush=True)
    print("HOLDER", json.dumps({"pid": os.getpid(), "sizes": sizes}), flush=True)
    sys.stdin.read()
"""


def holder_info(p: Program) -> dict:
    return json.loads(p.wait_for(r"^HOLDER (.*)$").group(1))


def test_stats_json_has_the_full_snapshot(program):
    p = program(HOLDER)
    token, info = p.token, holder_info(p)
    pid, sizes = info["pid"], info["sizes"]
    r = cli("stats", "--pool", token, "--json")
    assert r.returncode == 0, r.stderr
    (d,) = json.loads(r.stdout)
    assert d["used_bytes"] == sum(sizes) and d["live_blocks"] == 3, d
    assert d["pids"] == [pid] and d["processes"] == 1, d
    assert d["instance"] != d["pool"] and len(d["instance"]) == 32, d
    assert abs(d["created"] - time.time()) < 600, d
    # What each process holds (the inspecting command is not listed).
    assert [(h["pid"], h["blocks"], h["bytes"], h["reserved"]) for h in d["holdings"]] == [
        (pid, 3, sum(sizes), False)], d["holdings"]
    # The pending pickle: its block, its sender, its age.
    (t,) = d["pending"]
    assert (t["block_size"], t["pickles"], t["pid"]) == (sizes[1], 1, pid), t
    assert 0 <= t["age"] < 120 and 0 < t["expires_in"] <= d["transfer_timeout"], t
    assert t["age"] + t["expires_in"] == pytest.approx(d["transfer_timeout"], abs=1e-3), t
    assert d["pending_bytes"] == sizes[1] and d["oldest_pending_age"] == t["age"], d
    # Size classes: power-of-two ranges that add up to the pool.
    classes = d["size_classes"]
    assert sum(c["used_bytes"] for c in classes) == d["used_bytes"], classes
    assert sum(c["free_bytes"] for c in classes) == d["free_bytes"], classes
    assert sum(c["used_blocks"] for c in classes) == 3, classes
    for c in classes:
        assert c["max_size"] == 2 * c["min_size"] - 1 and c["min_size"] & (c["min_size"] - 1) == 0
    for size in sizes:
        (c,) = [c for c in classes if c["min_size"] <= size <= c["max_size"]]
        assert c["used_blocks"] == sum(c["min_size"] <= s <= c["max_size"] for s in sizes), c
    p.finish()


def test_stats_table_has_every_section(program):
    p = program(HOLDER)
    token, info = p.token, holder_info(p)
    r = cli("stats", "--pool", token)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    summary, _, detail = out.partition("\n\n")
    assert summary.splitlines()[0].split()[:5] == ["POOL", "PROCS", "USED", "FREE", "CAPACITY"]
    assert detail.startswith(f"Pool {token}\n"), out
    for section in ("Blocks by size class", "Processes", "Pending transfers: 1 pickle made"):
        assert f"\n  {section}" in detail, out
    lines = detail.splitlines()
    # The process row: pid, 3 blocks, the bytes it holds.
    proc_header = next(i for i, ln in enumerate(lines)
                       if ln.split()[:3] == ["PID", "BLOCKS", "HELD"])
    cells = lines[proc_header + 1].split()
    assert cells[:2] == [str(info["pid"]), "3"], lines[proc_header + 1]
    # The pending row: 195.4 KiB block, 1 pickle, an age, from our pid.
    pend_header = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["BLOCK", "SIZE"])
    row = re.split(r"\s{2,}", lines[pend_header + 1].strip())
    assert row[1] == "1" and row[-1] == str(info["pid"]), row
    assert re.fullmatch(r"\d+\.\d s", row[2]), row
    # One size-class row per class holding a block, with its range.
    class_rows = [ln for ln in lines if re.match(r"^    \d+(\.\d)? (B|KiB|MiB|GiB) - ", ln)]
    assert len(class_rows) >= 3, out
    p.finish()


def read_until(proc: subprocess.Popen[bytes], pattern: bytes, count: int, timeout: float,
               fd: int | None = None) -> bytes:
    """Reads proc's stdout (or `fd`, a terminal's other end) until `pattern`
    has been seen `count` times."""
    if fd is None:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while data.count(pattern) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {data.count(pattern)} of {count} {pattern!r}:\n{data.decode()}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, f"the command exited ({proc.poll()}):\n{data.decode()}"
            data += chunk
    return data


def test_stats_watch_redraws_until_ctrl_c(program):
    """On a terminal, --watch clears the screen before each snapshot (output
    that is not a terminal gets none: test_rough_edges.py)."""
    p = program(HOLDER)
    token = p.token
    terminal, screen = pty.openpty()
    watch = subprocess.Popen([sys.executable, "-m", "pyarraypool", "stats", "--pool", token,
                              "--watch", "0.2"], env=fresh_env(), cwd=REPO,
                             stdout=screen, stderr=subprocess.PIPE)
    os.close(screen)
    try:
        data = read_until(watch, b"\x1b[2J", 3, timeout=60, fd=terminal)
        frames = data.split(b"\x1b[H\x1b[2J")[1:]
        for frame in frames[:2]:
            text = frame.decode()
            assert text.startswith("pyarraypool stats at "), text
            assert f"Pool {token}" in text and "Pending transfers" in text, text
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=30)
        assert watch.returncode == 0, err.decode()
        assert b"Traceback" not in err, err.decode()
    finally:
        os.close(terminal)
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    # --watch with --json: one JSON document per line and refresh.
    watch = subprocess.Popen([sys.executable, "-m", "pyarraypool", "stats", "--pool", token,
                              "--json", "--watch", "0.2"], env=fresh_env(), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        data = read_until(watch, b"\n", 2, timeout=60)
        watch.send_signal(signal.SIGINT)
        watch.communicate(timeout=30)
        assert watch.returncode == 0
        for line in data.splitlines()[:2]:
            (d,) = json.loads(line)
            assert d["pool"] == token and d["live_blocks"] == 3, d
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    p.finish()


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_stats_watch_refuses_a_bad_interval(value):
    r = cli("stats", "--watch", value)
    assert r.returncode == 2 and "--watch" in r.stderr, (r.stdout, r.stderr)


# A program whose pickle has expired but which has not looked at its pool
# since; on its stdin closing, it collects and reports what it saw.
EXPIRED_UNNOTICED = """
    import json, logging, pickle, sys, time
    import numpy as np, pyarraypool
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    logging.getLogger("pyarraypool").addHandler(Keep())
    pyarraypool.configure(transfer_timeout=0.2)
    x = pyarraypool.zeros(50_000, dtype=np.uint8)
    blob = pickle.dumps(x)          # never loaded
    del x
    time.sleep(0.5)                 # the transfer timeout (0.2 s) has passed
    print("TOKEN", pyarraypool._core._pool_token(), flush=True)
    sys.stdin.read()
    freed = pyarraypool.collect()
    print("AFTER", json.dumps({"freed": freed, "records": records}), flush=True)
"""


def test_stats_only_looks(program):
    # Looking at a pool is not joining it: the command is not one of its
    # processes, and it neither expires nor reclaims anything (that, and the
    # warning, happen in the pool's own program).
    p = program(EXPIRED_UNNOTICED)
    token = p.token
    for _ in range(3):
        r = cli("stats", "--pool", token, "--json")
        assert r.returncode == 0, r.stderr
        (d,) = json.loads(r.stdout)
        assert d["processes"] == 1 and d["pids"] == [p.proc.pid], d
        assert d["pending_transfers"] == 1 and d["live_blocks"] == 1, d
        assert [u["pid"] for u in d["holdings"]] == [p.proc.pid], d
    assert "reclaimed" not in r.stderr and "never loaded" not in r.stderr, r.stderr
    p.proc.stdin.close()
    after = json.loads(p.wait_for(r"^AFTER (.*)$").group(1))
    assert after["freed"] >= 50_000, after
    assert len(after["records"]) == 1 and "never loaded" in after["records"][0], after
    p.finish()
