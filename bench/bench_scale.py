"""Scale checks (issue "2 of 5", target 8), each run for real:

- one million arrays live in the pool at once;
- a pool of 16 GiB on this 24 GiB machine (every page reserved and touched);
- 32 processes attached to one pool at once, each holding an array.

Each check runs in a program of its own (own pool) and prints what it saw,
with the time it took. Run: `.venv/bin/python bench/bench_scale.py [--skip-16g]`.
Writes build/bench_scale.json for bench/report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MILLION = """
import time, numpy as np, pyarraypool as pap
t0 = time.perf_counter()
arrays = [pap.empty(8, dtype=np.float64) for _ in range(1_000_000)]
t_alloc = time.perf_counter() - t0
for i in (0, 499_999, 999_999):
    arrays[i][:] = i
s = pap.stats()
assert s.live_blocks >= 1_000_000, s
t0 = time.perf_counter()
del arrays
t_free = time.perf_counter() - t0
after = pap.stats()
assert after.live_blocks == 0, after
print(json.dumps({"live_blocks": s.live_blocks, "used_bytes": s.used_bytes,
                  "alloc_s": t_alloc, "free_s": t_free}))
"""

SIXTEEN_GIB = """
import time, numpy as np, pyarraypool as pap
pap.configure(max_bytes="17G", segment_bytes="1G")
t0 = time.perf_counter()
# 128 blocks of 128 MiB (payload + its 64-byte header) = 16 GiB, 8 to a segment.
chunks = [pap.empty((1 << 27) - 64, dtype=np.uint8) for _ in range(128)]
for c in chunks:
    c[::4096] = 1          # touch every page
s = pap.stats()
assert s.used_bytes == 16 << 30 and s.capacity_bytes == 16 << 30, s
total = sum(int(c[::4096].sum()) for c in chunks)
assert total == 128 * (((1 << 27) - 64 + 4095) // 4096)
elapsed = time.perf_counter() - t0
del chunks
print(json.dumps({"capacity_bytes": s.capacity_bytes, "used_bytes": s.used_bytes,
                  "segments": s.segments, "seconds": elapsed}))
"""

THIRTY_TWO = """
import multiprocessing as mp, time, numpy as np, pyarraypool as pap

def hold(x, i, ready, go):
    x[i] = i
    mine = pap.zeros(1024)          # each process holds a block of its own
    mine[:] = i
    ready.put(pap.stats().processes)
    go.wait(60)
    assert (mine == i).all()

if __name__ == "__main__":
    ctx = mp.get_context("forkserver")
    x = pap.zeros(32, dtype=np.int64)
    ready, go = ctx.Queue(), ctx.Event()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=hold, args=(x, i, ready, go)) for i in range(32)]
    for p in procs:
        p.start()
    seen = [ready.get(timeout=120) for _ in procs]
    s = pap.stats()
    go.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, p.exitcode
    assert s.processes >= 33, s
    assert (x == np.arange(32)).all()
    pap.collect()
    print(json.dumps({"processes_attached": s.processes, "max_seen_by_a_worker": max(seen),
                      "live_blocks": s.live_blocks, "seconds": time.perf_counter() - t0}))
"""


def run(name: str, code: str, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYARRAYPOOL_")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    script = os.path.join(REPO, "build", f"scale_{name}.py")
    os.makedirs(os.path.dirname(script), exist_ok=True)
    with open(script, "w") as f:
        f.write("import json\n" + textwrap.dedent(code))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, script], env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout}\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    print(f"{name}: {result}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--skip-16g", action="store_true", help="skip the 16 GiB pool")
    ap.add_argument("--json", default=os.path.join(REPO, "build", "bench_scale.json"))
    args = ap.parse_args()
    results = {
        "million_live": run("million_live", MILLION, 600),
        "thirty_two_processes": run("thirty_two_processes", THIRTY_TWO, 600),
    }
    if not args.skip_16g:
        results["sixteen_gib"] = run("sixteen_gib", SIXTEEN_GIB, 900)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
