"""Chaos soak: 8 workers pass checksummed arrays to each other while one of
them is SIGKILLed every 0.5 s (some inside the pool lock) and replaced.

The soak is a program of its own (tests/soak_program.py, its own pool); this
test runs it for 60 s under a hard timeout and checks its JSON result: no
hang, no corruption, every byte back after collect(), and nothing of its pool
or its queues left in /dev/shm. `make soak` runs the same program for longer.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
from helpers import REPO, fresh_env, pool_files, stress

SECONDS = stress(60, 20)
HARD_TIMEOUT = 150


def at_least(count_in_60_s: int) -> int:
    """What a soak of SECONDS must reach where 60 s must reach `count_in_60_s`."""
    return max(1, count_in_60_s * SECONDS // 60)


@pytest.mark.soak
def test_chaos_soak(tmp_path):
    # In the test's own folder: CI runs the suites of several Pythons at once
    # in one tree (`make soak` writes build/soak_result.json).
    result_path = str(tmp_path / "soak_result.json")
    cmd = [sys.executable, os.path.join(REPO, "tests", "soak_program.py"),
           "--seconds", str(SECONDS), "--workers", "8", "--kill-interval", "0.5",
           "--json", result_path]
    with open(tmp_path / "out", "w+") as out, open(tmp_path / "err", "w+") as err:
        proc = subprocess.Popen(cmd, env=fresh_env(), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=HARD_TIMEOUT)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # workers left behind; the program if it hangs
        except ProcessLookupError:
            pass
        proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    tokens = re.findall(r"^TOKEN ([0-9a-f]{32})$", stdout, re.M)
    try:
        report = f"exit {proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr[-20000:]}"
        assert not timed_out, f"the soak did not finish within {HARD_TIMEOUT} s\n{report}"
        assert tokens, f"the soak did not print its pool token\n{report}"
        assert os.path.exists(result_path), f"no JSON result\n{report}"
        with open(result_path) as f:
            r = json.load(f)
        print(stdout)
        violations = json.dumps(r["violations"], indent=1)
        assert r["violations"] == [], f"violations:\n{violations}\n{report}"
        assert proc.returncode == 0, report
        assert r["ok"] is True
        # It ran, and the chaos happened.
        assert r["soak_seconds"] >= SECONDS
        # The counts a 60 s soak must reach, in proportion for a shorter one
        # (PAP_TEST_STRESS=short): the same rates of work and of kills.
        assert r["ops"] >= at_least(20_000), r["ops"]
        assert r["received"] >= at_least(2_000) and r["verified"] >= at_least(5_000), (
            r["received"], r["verified"])
        assert r["driver_verified"] >= at_least(50), r.get("driver_verified")
        assert r["kills"] >= at_least(100), r["kills"]
        assert r["kills_in_lock"] >= at_least(10), r["kills_in_lock"]
        assert r["kills_in_lock_confirmed"] >= 1, r["kills_in_lock_confirmed"]
        assert r["hold_lock_calls"] >= at_least(100), r["hold_lock_calls"]
        assert r["spawn_starts"] >= 1, r["spawn_starts"]
        # As root, some workers run in a pid namespace of their own (killed
        # there too); PYARRAYPOOL_REQUIRE_ROOT_TESTS=1 (CI) insists on it.
        if os.geteuid() == 0:
            assert r["pid_ns_starts"] >= at_least(3), r["pid_ns_starts"]
        elif os.environ.get("PYARRAYPOOL_REQUIRE_ROOT_TESTS") == "1":
            pytest.fail("PYARRAYPOOL_REQUIRE_ROOT_TESTS=1 but the soak cannot start workers "
                        "in another pid namespace (needs root)")
        assert r["exec_children"] >= at_least(20), r["exec_children"]
        # And nothing went wrong.
        assert r["hangs"] == 0
        assert r["corruptions"] == 0
        assert r["premature_stale"] == 0
        assert r["exec_pinned"] == 0
        assert r["workers_died_on_their_own"] == 0
        assert r["verify_failures"] == 0 and r["verify_calls"] >= SECONDS // 2
        assert r["leaked_bytes"] == 0, r["final_stats"]
        s = r["final_stats"]
        assert s["live_blocks"] == 0 and s["pending_transfers"] == 0 and s["processes"] == 1, s
        # Idle memory went back while workers were being killed (decay 0.05 s:
        # every stats() and collect() of a worker gives back, under the lock).
        assert s["returned_bytes"] > 0, s
        # /dev/shm: the pool's segments and the queues' semaphores are gone.
        assert pool_files(tokens[0]) == [], pool_files(tokens[0])
        left = [n for n in r["semaphores"] if os.path.exists("/dev/shm/sem." + n.lstrip("/"))]
        assert left == [], left
    finally:
        for t in tokens:  # a failed run must not also leave /dev/shm dirty
            for name in pool_files(t):
                try:
                    os.unlink("/dev/shm/" + name)
                except FileNotFoundError:
                    pass
