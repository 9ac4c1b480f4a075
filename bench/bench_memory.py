"""Memory follows the work (issue 12): footprint, idle memory, growth, reuse.

Each scenario runs in a program of its own (its own pool and settings):
  M1  /dev/shm at its peak, for 200 arrays of 1 MiB returned through
      multiprocessing.Pool(2), and for a mixed workload (arrays of 1 KiB to
      32 MiB made and dropped at random), against 1.05x the peak live bytes
      + 8 MiB;
  M2  /dev/shm and the parent's RssShmem after 3 s of idle once everything
      is dropped (no call into pyarraypool meanwhile), against 8 MiB each;
  M3  a 64 MiB make_transferable into a growing pool (fresh pages: the pool
      gave every page back before each one) against np.copyto into fresh
      numpy memory (np.empty of the same size each time), <= 1.25x; also
      against fresh anonymous memory of 4 KiB pages, and the floor: every
      way to fill 64 MiB of fresh /dev/shm pages, with no pool around it
      (build/growth_floor, bench/growth_floor.cpp);
  R   a loop that makes and drops a 64 MiB array, against np.copyto into a
      preallocated array (memcpy), <= 1.2x: reuse within the decay time is
      never given back.
/dev/shm is measured as the st_blocks of the pool's files. Run:
`make bench-memory` or `.venv/bin/python bench/bench_memory.py [--json PATH]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

from machine import machine_info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20

MEASURE = """
import json, os, statistics, time
import numpy as np
import pyarraypool
def shm_bytes(token):
    total = 0
    for n in os.listdir("/dev/shm"):
        if n.startswith("pyarraypool-" + token):
            try:
                total += os.stat("/dev/shm/" + n).st_blocks * 512
            except FileNotFoundError:
                pass
    return total
def rss_shmem():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    return 0
def token():
    pyarraypool.stats()
    return pyarraypool._core._pool_token()
"""

POOL2 = """
import multiprocessing as mp
def make(i):
    return pyarraypool.make_transferable(np.full(1 << 17, i, dtype=np.float64))
if __name__ == "__main__":
    tok = token()
    with mp.get_context("fork").Pool(2) as pool:
        arrays = pool.map(make, range(200), chunksize=4)
    live = sum(a.nbytes for a in arrays)
    peak = shm_bytes(tok)
    del arrays
    time.sleep(3)
    print(json.dumps({"live": live, "peak_shm": peak, "idle_shm": shm_bytes(tok),
                      "idle_rss_shmem": rss_shmem()}))
"""

MIXED = """
import random
rng = random.Random(1)
tok = token()
arrays, peak_live, peak_shm = [], 0, 0
for step in range(400):
    if arrays and rng.random() < 0.4:
        arrays.pop(rng.randrange(len(arrays)))
    else:
        # Not kept in a variable: a dropped array must be gone, or the pool
        # holds more than the live bytes counted here.
        arrays.append(pyarraypool.empty(int(2 ** rng.uniform(10, 25)), dtype=np.uint8))
        arrays[-1][::4096] = 1
    peak_live = max(peak_live, sum(a.nbytes for a in arrays))
    peak_shm = max(peak_shm, shm_bytes(tok))
del arrays
time.sleep(3)
print(json.dumps({"live": peak_live, "peak_shm": peak_shm, "idle_shm": shm_bytes(tok),
                  "idle_rss_shmem": rss_shmem()}))
"""

# Growth: decay 0, and collect() gives every page back before the next round.
# Two peers: numpy's fresh memory (np.empty: numpy asks for transparent huge
# pages), and fresh anonymous memory of 4 KiB pages (the page size of
# /dev/shm here), mapped the way np.empty maps it but without that advice.
# Each way runs in a loop of its own: a way timed right after another way
# freed 64 MiB of a different kind pays for that (the pool after 4 KiB
# anonymous pages: 42 ms instead of 31 here), which would measure the order.
GROW = """
import mmap
pyarraypool.configure(decay=0)
src = np.random.default_rng(0).random(8 << 20)  # 64 MiB
# Each way makes 64 MiB filled from src and returns what drops it again.
def pool_way():
    made = [pyarraypool.make_transferable(src)]
    return lambda: (made.clear(), pyarraypool.collect())  # every page back
def numpy_way():
    made = [np.empty_like(src)]
    np.copyto(made[0], src)
    return made.clear
def small_pages_way():
    m = mmap.mmap(-1, src.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    made = [np.frombuffer(m, dtype=src.dtype)]
    np.copyto(made[0], src)
    return lambda: (made.clear(), m.close())
def median_ms(way):
    times = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        drop = way()
        times.append(time.perf_counter() - t0)
        drop()
    return statistics.median(times) * 1e3
out = {"pool_ms": median_ms(pool_way), "fresh_ms": median_ms(numpy_way),
       "small_pages_ms": median_ms(small_pages_way),
       "returned": pyarraypool.stats().returned_bytes}
print(json.dumps(out))
"""

STEADY = """
src = np.random.default_rng(0).random(8 << 20)  # 64 MiB
dst = np.empty_like(src)
pool_t, copy_t = [], []
for _ in range(3):
    a = pyarraypool.make_transferable(src)
    del a
for _ in range(REPS):
    t0 = time.perf_counter()
    a = pyarraypool.make_transferable(src)
    pool_t.append(time.perf_counter() - t0)
    del a
    t0 = time.perf_counter()
    np.copyto(dst, src)
    copy_t.append(time.perf_counter() - t0)
print(json.dumps({"pool_ms": statistics.median(pool_t) * 1e3,
                  "memcpy_ms": statistics.median(copy_t) * 1e3,
                  "returned": pyarraypool.stats().returned_bytes}))
"""


def run(code: str, **env: str) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("PYARRAYPOOL_")}
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(MEASURE + code)], env=e,
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_floor(out: str) -> list[dict]:
    """growth_floor's lines: `<way> TAB <ms> ms TAB <ratio>x numpy's way`."""
    rows = []
    for line in out.splitlines():
        way, ms, _ = line.split("\t")
        rows.append({"way": way.strip(), "ms": float(ms.split()[0])})
    return rows


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=os.path.join(REPO, "build", "bench_memory.json"))
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    res: dict = {"machine": machine_info()}
    for name, code, env in [
        ("pool2", POOL2, {}),
        ("mixed", MIXED, {}),
        ("grow", GROW.replace("REPS", str(args.reps)), {}),
        ("steady", STEADY.replace("REPS", str(args.reps)), {}),
    ]:
        before = loadavg()
        res[name] = run(code, **env)
        res[name]["loadavg"] = f"{before} -> {loadavg()}"
        print(name, json.dumps(res[name]), flush=True)
    floor = os.path.join(REPO, "build", "growth_floor")
    if os.path.exists(floor):
        res["growth_floor"] = parse_floor(subprocess.run([floor], capture_output=True, text=True,
                                                         timeout=600, check=True).stdout)
        print("growth_floor", json.dumps(res["growth_floor"]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
