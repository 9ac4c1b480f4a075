"""Auto mode (PYARRAYPOOL_AUTO) on unchanged programs: the targets and the threshold sweep.

Every measurement runs bench/auto_workload.py, a program that never imports
pyarraypool, as a subprocess: once with PYARRAYPOOL_AUTO set in its
environment ("on") and once without ("off"), alternating, the order within
each pair flipped every other pair so that a drifting machine load hits both
alike. Nothing else differs between the two runs. The program times its own
transfer loop (its start-up is reported apart).

Targets (each ratio from the runs of this one invocation):

  A  ProcessPoolExecutor(2) (spawn), 100 tasks returning 16 MiB arrays:
     on >= 5x faster than off.
  B  the same, 100 tasks sending 16 MiB arrays: on >= 5x faster.
  C  the same program with 64 KiB arrays (2,000 tasks, returning and
     sending): on no slower than off. "No slower": the median over the pairs
     of on/off (each pair run back to back) is at most 1 + NO_SLOWER_TOLERANCE.
  D  joblib.Parallel(n_jobs=2) over 8 distinct 64 MiB inputs, each task
     returning a new 64 MiB array: on faster than loky's default memmapping
     (median of on < median of off), and nothing the program made is left
     in /dev/shm or the temp folder after it exits.

The sweep: for a multiprocessing Pipe round trip and a ProcessPoolExecutor(2)
round trip, with auto forced on for every size (PYARRAYPOOL_AUTO=1, a 1-byte
threshold) against off, the median time per round trip at 1 KiB ... 64 MiB,
and the crossover: the smallest size from which on is no slower than off at
that size and every larger one (median of the paired on/off ratios <= 1). The recommended default threshold is that
size for the slower of the two APIs.

Run: `make bench-auto` (then bench/report.py rewrites the auto-mode section
of docs/benchmarks.md), or `.venv/bin/python bench/bench_auto.py [--quick]
[--reps N] [--sweep-reps N] [--only targets|sweep] [--json build/bench_auto.json]`;
with --only, the other part is kept from the existing --json file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from machine import machine_info

KiB, MiB = 1 << 10, 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOAD = os.path.join(HERE, "auto_workload.py")
DEFAULT_AUTO = "64K"  # the threshold the targets run with (the API's proposed default)
NO_SLOWER_TOLERANCE = 0.03
SWEEP_SIZES = [1 * KiB, 4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 16 * MiB, 64 * MiB]
SWEEP_APIS = ("pipe", "ppe")
# Environment a run must not inherit: the bench's own auto setting or pool
# (each program run starts its own pool, as a user's program would).
SCRUB = ("PYARRAYPOOL_AUTO", "PYARRAYPOOL_POOL", "PYARRAYPOOL_ROOT")


def _ppe(direction: str, nbytes: int, tasks: int) -> dict[str, Any]:
    verb = "returning" if direction == "return" else "sending"
    size = f"{nbytes // MiB} MiB" if nbytes >= MiB else f"{nbytes // KiB} KiB"
    return {
        "title": f"ProcessPoolExecutor(2) spawn, {tasks:,} tasks {verb} {size}",
        "args": ["ppe", "--direction", direction, "--nbytes", str(nbytes), "--tasks", str(tasks)],
    }


WORKLOADS: dict[str, dict[str, Any]] = {
    "A": _ppe("return", 16 * MiB, 100),
    "B": _ppe("send", 16 * MiB, 100),
    "C-return": _ppe("return", 64 * KiB, 2000),
    "C-send": _ppe("send", 64 * KiB, 2000),
    "D": {
        "title": "joblib.Parallel(n_jobs=2), 8 tasks, 64 MiB in and 64 MiB out",
        "args": ["joblib", "--nbytes", str(64 * MiB), "--tasks", "8"],
    },
}
QUICK_TASKS = {"A": "20", "B": "20", "C-return": "400", "C-send": "400", "D": "4"}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_program(args: list[str], auto: str | None, pythonpath: str | None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    if auto is not None:
        env["PYARRAYPOOL_AUTO"] = auto
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, WORKLOAD, *args], env=env, capture_output=True, text=True, timeout=1800
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{' '.join(args)} (auto={auto}) failed ({proc.returncode})")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = wall
    out["stderr"] = proc.stderr.strip()[-2000:]
    return out


def leftovers(r: dict[str, Any], before: dict[str, set[str]], wait_s: float = 10.0) -> list[str]:
    """What a finished program left in /dev/shm or the temp folder: new entries
    naming its pid (joblib's memmapping folders, loky's semaphores) or its pool,
    polled for up to wait_s (its workers may exit after it). Only its own: other
    programs on the machine come and go meanwhile."""
    marks = [f"_{r['pid']}_", f"-{r['pid']}-"]
    pool = f"pyarraypool-{r['pool']}" if r.get("pool") else None
    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for d, old in before.items():
            try:
                now = set(os.listdir(d))
            except OSError:
                continue
            for name in sorted(now - old):
                if any(m in name for m in marks) or (pool and name.startswith(pool)):
                    left.append(os.path.join(d, name))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def snapshot() -> dict[str, set[str]]:
    out = {}
    for d in ("/dev/shm", tempfile.gettempdir()):
        try:
            out[d] = set(os.listdir(d))
        except OSError:
            pass
    return out


def alternate(reps: int, run: Any) -> list[dict[str, Any]]:
    """reps pairs of (off, on) runs, the order flipped every other pair."""
    pairs = []
    for i in range(reps):
        order = ("off", "on") if i % 2 == 0 else ("on", "off")
        pair: dict[str, Any] = {"load": _load()}
        for mode in order:
            pair[mode] = run(mode)
        pairs.append(pair)
    return pairs


def summarize(pairs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    off = [p["off"][key] for p in pairs]
    on = [p["on"][key] for p in pairs]
    return {
        "off_s": off,
        "on_s": on,
        "median_off_s": statistics.median(off),
        "median_on_s": statistics.median(on),
        "speedup": statistics.median(off) / statistics.median(on),
        "median_pair_ratio_on_off": statistics.median(b / a for a, b in zip(off, on, strict=True)),
        # The noise of the off runs alone: their median absolute deviation
        # over their median (what a "no slower" tolerance has to cover).
        "off_mad_rel": statistics.median(abs(x - statistics.median(off)) for x in off)
        / statistics.median(off),
    }


def run_targets(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, w in WORKLOADS.items():
        wargs = list(w["args"])
        if args.quick:
            wargs[wargs.index("--tasks") + 1] = QUICK_TASKS[name]

        def one(mode: str, wargs: list[str] = wargs, name: str = name) -> dict[str, Any]:
            before = snapshot()
            r = run_program(wargs, args.auto if mode == "on" else None, args.pythonpath)
            r["leftovers"] = leftovers(r, before)
            print(
                f"  {name} {mode}: loop {r['loop_s'] * 1e3:.0f} ms, start-up "
                f"{r['startup_s'] * 1e3:.0f} ms, load {_load()[0]}",
                flush=True,
            )
            return r

        print(f"{name}: {w['title']}", flush=True)
        pairs = alternate(args.reps, one)
        runs = {m: [p[m] for p in pairs] for m in ("off", "on")}
        out[name] = {
            "title": w["title"],
            "args": wargs,
            **summarize(pairs, "loop_s"),
            **{
                f"median_startup_{m}_s": statistics.median(r["startup_s"] for r in runs[m])
                for m in runs
            },
            "leftovers": [x for m in runs for r in runs[m] for x in r["leftovers"]],
            "loads": [p["load"][0] for p in pairs],
            **{
                f"result_types_{m}": sorted({t for r in runs[m] for t in r.get("result_types", [])})
                for m in runs
            },
        }
    return out


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    sizes = SWEEP_SIZES
    out: dict[str, Any] = {"sizes": sizes, "apis": {}}
    for api in SWEEP_APIS:
        wargs = ["sweep", "--api", api, "--sizes", ",".join(map(str, sizes))]
        if args.quick:
            wargs += ["--budget", str(32 * MiB)]

        def one(mode: str, wargs: list[str] = wargs, api: str = api) -> dict[str, Any]:
            r = run_program(wargs, args.sweep_auto if mode == "on" else None, args.pythonpath)
            print(f"  sweep {api} {mode}: load {_load()[0]}", flush=True)
            return r

        print(f"sweep {api}", flush=True)
        pairs = alternate(args.sweep_reps, one)
        per_size = {}
        for n in sizes:
            flat = [{m: {"t": p[m]["per_trip_s"][str(n)]} for m in ("off", "on")} for p in pairs]
            per_size[str(n)] = summarize(flat, "t")
        out["apis"][api] = {
            "per_size": per_size,
            "crossover_bytes": crossover(sizes, per_size),
            "loads": [p["load"][0] for p in pairs],
        }
    worst = [a["crossover_bytes"] for a in out["apis"].values()]
    out["recommended_threshold_bytes"] = None if None in worst else max(worst)
    return out


def crossover(sizes: list[int], per_size: dict[str, Any]) -> int | None:
    """The smallest size from which on is no slower than off at that size and
    every larger one (by the median of the paired on/off ratios, the statistic
    of target C, without its tolerance); None if on loses at the largest."""
    best = None
    for n in reversed(sizes):
        if per_size[str(n)]["median_pair_ratio_on_off"] > 1.0:
            break
        best = n
    return best


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="fewer tasks and repetitions (a smoke test)"
    )
    ap.add_argument("--reps", type=int, help="pairs of runs per target (default 9; 2 with --quick)")
    ap.add_argument(
        "--sweep-reps", type=int, help="pairs of sweep runs (default 7; 2 with --quick)"
    )
    ap.add_argument("--only", choices=("targets", "sweep"), help="run only one part")
    ap.add_argument(
        "--auto",
        default=DEFAULT_AUTO,
        help=f"PYARRAYPOOL_AUTO for the targets (default {DEFAULT_AUTO})",
    )
    ap.add_argument(
        "--sweep-auto",
        default="1B",
        help="PYARRAYPOOL_AUTO for the sweep's on runs: a 1-byte threshold (default 1B; "
        "a bare 1 means 'on, default threshold')",
    )
    ap.add_argument(
        "--pythonpath",
        help="prepended to PYTHONPATH of every run, on and off alike (development: a stand-in for auto mode)",
    )
    ap.add_argument("--json", help="write the results and the machine to this file")
    args = ap.parse_args()
    args.reps = args.reps or (2 if args.quick else 9)
    args.sweep_reps = args.sweep_reps or (2 if args.quick else 7)
    if args.reps < 1 or args.sweep_reps < 1:
        ap.error("--reps and --sweep-reps must be at least 1")

    # With --only, the other part comes from the existing --json file, so that
    # one part can be rerun when the machine is quiet.
    doc: dict[str, Any] = {}
    if args.only and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            doc = json.load(f)
    doc.update(machine=machine_info(), no_slower_tolerance=NO_SLOWER_TOLERANCE)
    for part, runner, reps in (
        ("targets", run_targets, args.reps),
        ("sweep", run_sweep, args.sweep_reps),
    ):
        if args.only in (None, part):
            run = {
                "date": machine_info()["date"],
                "load_start": _load(),
                "reps": reps,
                "auto": args.auto if part == "targets" else args.sweep_auto,
                "pythonpath": args.pythonpath,
                "quick": args.quick,
            }
            doc[part] = runner(args)
            doc[part]["run"] = {**run, "load_end": _load()}
    print(json.dumps({k: v for k, v in doc.items() if k != "machine"}, indent=1)[:4000])
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
