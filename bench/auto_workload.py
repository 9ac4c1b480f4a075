"""An ordinary program that moves numpy arrays between processes.

This is what bench/bench_auto.py times with and without PYARRAYPOOL_AUTO: it
never imports pyarraypool, so whatever auto mode does to it comes from the
environment alone (a user's unchanged program). It prints one JSON line.

  ppe --direction return   ProcessPoolExecutor(2) (spawn): each task returns
                           an array of --nbytes (the worker's own, made once);
                           the parent reads one element of each result.
  ppe --direction send     each task gets the parent's array of --nbytes and
                           returns one element of it.
  joblib                   joblib.Parallel(n_jobs=2) (loky, its defaults)
                           over --tasks distinct inputs of --nbytes, each
                           task returning a new array of the size (x + 1).
  sweep --api pipe|ppe     per size of --sizes: round trips of an array to a
                           spawn child over a multiprocessing Pipe (the child
                           sends back what it got), or through
                           ProcessPoolExecutor(2) (the task returns its input).

Timed: the transfer loop only, after the workers started and ran a few
warm-up tasks of the same kind; the start-up (creating the executor and the
warm-up) is reported apart as startup_s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

WARMUP = 4
_mine: np.ndarray | None = None


def own_array(nbytes: int) -> np.ndarray:
    """The worker's array of the size, made (and its pages touched) once."""
    global _mine
    if _mine is None or _mine.nbytes != nbytes:
        _mine = np.full(nbytes, 7, dtype=np.uint8)
    return _mine


def last(a: np.ndarray) -> int:
    return int(a[-1])


def echo(a: np.ndarray) -> np.ndarray:
    return a


def plus_one(a: np.ndarray) -> np.ndarray:
    return a + 1


def pipe_child(conn: Any) -> None:
    while True:
        a = conn.recv()
        if a is None:
            return
        conn.send(a)


def iterations(nbytes: int, budget: int) -> int:
    """Round trips for one size: about `budget` bytes moved, 20 to 2000 of them."""
    return max(20, min(2000, budget // nbytes))


def run_ppe(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    n, k = args.nbytes, args.tasks
    t0 = time.perf_counter()
    with ProcessPoolExecutor(2, mp_context=ctx) as ex:
        if args.direction == "return":
            assert sum(ex.map(last, ex.map(own_array, [n] * WARMUP))) == 7 * WARMUP
            t1 = time.perf_counter()
            got = [int(r[-1]) for r in ex.map(own_array, [n] * k)]
            t2 = time.perf_counter()
        else:
            a = np.full(n, 7, dtype=np.uint8)
            assert sum(ex.map(last, [a] * WARMUP)) == 7 * WARMUP
            t1 = time.perf_counter()
            got = list(ex.map(last, [a] * k))
            t2 = time.perf_counter()
    assert got == [7] * k, "wrong results"
    return {"startup_s": t1 - t0, "loop_s": t2 - t1}


def run_joblib(args: argparse.Namespace) -> dict[str, Any]:
    from joblib import Parallel, delayed

    n, k = args.nbytes, args.tasks
    xs = [np.full(n, i % 200, dtype=np.uint8) for i in range(k)]
    t0 = time.perf_counter()
    par = Parallel(n_jobs=2)
    par(delayed(plus_one)(x) for x in xs[:2])  # starts the loky workers
    t1 = time.perf_counter()
    ys = par(delayed(plus_one)(x) for x in xs)
    t2 = time.perf_counter()
    assert [int(y[0]) for y in ys] == [i % 200 + 1 for i in range(k)], "wrong results"
    return {
        "startup_s": t1 - t0,
        "loop_s": t2 - t1,
        "result_types": sorted({type(y).__name__ for y in ys}),
    }


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    sizes = [int(s) for s in args.sizes.split(",")]
    per_trip: dict[str, float] = {}
    t0 = time.perf_counter()
    if args.api == "pipe":
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=pipe_child, args=(child,))
        proc.start()
        parent.send(np.zeros(8))
        parent.recv()
        startup = time.perf_counter() - t0
        for n in sizes:
            a = np.full(n, 7, dtype=np.uint8)
            for _ in range(WARMUP):
                parent.send(a)
                parent.recv()
            its = iterations(n, args.budget)
            t1 = time.perf_counter()
            for _ in range(its):
                parent.send(a)
                b = parent.recv()
            per_trip[str(n)] = (time.perf_counter() - t1) / its
            assert b.nbytes == n and b[-1] == 7
        parent.send(None)
        proc.join()
    else:
        with ProcessPoolExecutor(2, mp_context=ctx) as ex:
            list(ex.map(echo, [np.zeros(8)] * WARMUP))
            startup = time.perf_counter() - t0
            for n in sizes:
                a = np.full(n, 7, dtype=np.uint8)
                list(ex.map(echo, [a] * WARMUP))
                its = iterations(n, args.budget)
                t1 = time.perf_counter()
                for b in ex.map(echo, [a] * its):
                    assert b[-1] == 7
                per_trip[str(n)] = (time.perf_counter() - t1) / its
    return {"startup_s": startup, "per_trip_s": per_trip}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("kind", choices=("ppe", "joblib", "sweep"))
    ap.add_argument("--direction", choices=("return", "send"), default="return")
    ap.add_argument("--api", choices=("pipe", "ppe"), default="pipe")
    ap.add_argument("--nbytes", type=int, default=16 << 20)
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--sizes", default="1024,65536,1048576")
    ap.add_argument("--budget", type=int, default=128 << 20, help="sweep: bytes per size")
    args = ap.parse_args()
    run = {"ppe": run_ppe, "joblib": run_joblib, "sweep": run_sweep}[args.kind]
    out = run(args)
    out["pid"] = os.getpid()
    # The pool auto mode made for this program, if any (read, not imported):
    # the bench looks for what it left in /dev/shm by this name.
    out["pool"] = os.environ.get("PYARRAYPOOL_POOL")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
