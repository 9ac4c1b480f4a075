"""Per-array costs in one process: pyarraypool next to its peers, same run.

For each size (1 KiB, 64 KiB, 1 MiB, 16 MiB) it times, as medians of many
repetitions:
  - np.copyto into a preallocated array (the memcpy floor of any copy-in);
  - pickle.dumps + pickle.loads of the array (protocol 5);
  - stdlib SharedMemory: create, copy in, attach by name, close, unlink;
  - pyarraypool make_transferable + release;
  - pyarraypool empty + release;
  - pyarraypool handle round trip: pickle.dumps + pickle.loads of a pool array
    (the attach), then release of the loaded array.
Run: `make bench` or `.venv/bin/python bench/bench_python.py [--quick] [--json PATH]`;
--json also writes the medians (microseconds) to PATH, for bench/report.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from multiprocessing import shared_memory

import numpy as np
from machine import machine_info

import pyarraypool

SIZES = {"1 KiB": 1 << 10, "64 KiB": 64 << 10, "1 MiB": 1 << 20, "16 MiB": 16 << 20}


def median_us(
    fn: Callable[[], object], budget_s: float, min_reps: int = 5, max_reps: int = 20000
) -> float:
    """Median wall time of fn() in microseconds, over repetitions filling budget_s."""
    for _ in range(3):
        fn()  # warm up: first-touch page faults, caches, lazily mapped segments
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() < deadline):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e3)
    return statistics.median(samples)


def bench_size(nbytes: int, budget_s: float) -> dict[str, float]:
    src = np.random.default_rng(0).random(nbytes // 8)
    dst = np.empty_like(src)
    pool_arr = pyarraypool.make_transferable(src)

    def copyto() -> None:
        np.copyto(dst, src)

    def pickle_rt() -> None:
        pickle.loads(pickle.dumps(src, protocol=5))

    def stdlib_shm() -> None:
        shm = shared_memory.SharedMemory(create=True, size=nbytes)
        np.ndarray(src.shape, src.dtype, buffer=shm.buf)[...] = src
        other = shared_memory.SharedMemory(name=shm.name)
        view = np.ndarray(src.shape, src.dtype, buffer=other.buf)
        del view
        other.close()
        shm.close()
        shm.unlink()

    def make_release() -> None:
        pyarraypool.make_transferable(src)

    def empty_release() -> None:
        pyarraypool.empty(src.shape, src.dtype)

    def handle_rt() -> None:
        pickle.loads(pickle.dumps(pool_arr, protocol=5))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the resource tracker's chatter
        return {
            "np.copyto (memcpy floor)": median_us(copyto, budget_s),
            "pickle dumps+loads": median_us(pickle_rt, budget_s),
            "stdlib SharedMemory create+attach+unlink": median_us(stdlib_shm, budget_s),
            "pyarraypool make_transferable+release": median_us(make_release, budget_s),
            "pyarraypool empty+release": median_us(empty_release, budget_s),
            "pyarraypool handle round trip": median_us(handle_rt, budget_s),
        }


def fmt(us: float) -> str:
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    return f"{us:.2f} us"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="shorter runs (noisier)")
    ap.add_argument("--json", metavar="PATH", help="also write the medians (us) to PATH as JSON")
    args = ap.parse_args()
    budget = 0.3 if args.quick else 1.5
    gc.disable()  # no collector pauses inside timed calls
    results = {label: bench_size(n, budget) for label, n in SIZES.items()}
    gc.enable()
    rows = list(next(iter(results.values())))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, numpy {np.__version__}, Linux {platform.release()}"
    )
    print("medians per array, in one process\n")
    print("| way | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for row in rows:
        print(f"| {row} | " + " | ".join(fmt(results[s][row]) for s in results) + " |")
    print()
    for label in results:
        r = results[label]
        mk = r["pyarraypool make_transferable+release"]
        print(
            f"{label}: make_transferable is {r['stdlib SharedMemory create+attach+unlink'] / mk:.1f}x "
            f"faster than stdlib SharedMemory, {r['pickle dumps+loads'] / mk:.1f}x faster than pickle, "
            f"{mk / r['np.copyto (memcpy floor)']:.2f}x np.copyto; handle round trip "
            f"{r['pyarraypool handle round trip']:.2f} us"
        )
    if args.json:
        doc = {
            "benchmark": "bench_python",
            "description": "median wall time per array, in one process, microseconds",
            "unit": "us",
            "quick": args.quick,
            "budget_s_per_cell": budget,
            "machine": machine_info(),
            "sizes": SIZES,
            "ways": rows,
            "results": results,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
