"""Dask distributed: a map whose inputs live on the other worker, with and without pyarraypool.

A LocalCluster(processes=True, n_workers=2, threads_per_worker=1) makes K
arrays on worker A, then maps a cheap task over them on worker B (placement
forced with ``workers=``), so that every task's input crosses from A to B:

- ``numpy``: plain ndarrays and Dask as it is (pyarraypool.dask not
  installed): each array goes over the comm by value;
- ``pyarraypool``: the same arrays made with ``pyarraypool.empty`` and
  ``pyarraypool.dask.install(client)``: each goes as its handle.

Per size and way it reports medians over the repetitions of: the map's wall
time divided by K (from submitting the map to having its results), Dask's
own transfer time per array (worker B's ``transfer_incoming_log``), and the
bytes worker A wrote on the comms it serves data on, per array (what went
over the wire, measured by pyarraypool._dask_meter). Each way runs in a fresh
program of its own so that neither sees the other's installation.

Run: ``make bench-dask``, or ``.venv/bin/python bench/dask_bench.py [--quick]
[--reps N] [--json build/dask_bench.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

MiB = 1 << 20
SIZES = (1 * MiB, 64 * MiB)
WAYS = ("numpy", "pyarraypool")


# -- run on the workers ---------------------------------------------------------


def make_numpy(nbytes: int, i: int) -> Any:
    import numpy as np

    return np.full(nbytes, i % 251, dtype=np.uint8)


def make_pool(nbytes: int, i: int) -> Any:
    import numpy as np

    import pyarraypool

    x = pyarraypool.empty(nbytes, dtype=np.uint8)
    x[:] = i % 251
    return x


def consume(x: Any) -> int:
    return int(x[0]) + int(x[-1])


def meter_start() -> None:
    from pyarraypool import _dask_meter

    _dask_meter.start()


def served_bytes(dask_worker: Any) -> int:
    from pyarraypool import _dask_meter

    return _dask_meter.written(dask_worker.address)


def incoming_log(dask_worker: Any) -> list[tuple[float, int]]:
    return [(e["duration"], len(e["keys"])) for e in dask_worker.transfer_incoming_log]


# -- one way, in its own program --------------------------------------------------


def run_way(way: str, sizes: list[int], count: dict[int, int], reps: int) -> dict[str, Any]:
    from distributed import Client, LocalCluster, wait

    if way == "pyarraypool":
        import pyarraypool  # before the cluster: its workers inherit the pool name
        import pyarraypool.dask

        make = make_pool
    else:
        make = make_numpy
    results: dict[str, Any] = {}
    with (
        LocalCluster(
            processes=True, n_workers=2, threads_per_worker=1, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        if way == "pyarraypool":
            pyarraypool.dask.install(client)
        a, b = sorted(client.scheduler_info()["workers"])
        for nbytes in sizes:
            k = count[nbytes]
            rows = []
            for rep in range(reps + 1):  # the first is a warm-up
                xs = client.map(make, [nbytes] * k, range(k), workers=[a], pure=False)
                wait(xs)
                client.run(meter_start, workers=[a])
                seen = len(client.run(incoming_log, workers=[b])[b])
                t0 = time.perf_counter()
                ys = client.map(consume, xs, workers=[b], pure=False)
                got = client.gather(ys)
                wall = time.perf_counter() - t0
                assert got == [2 * (i % 251) for i in range(k)], "wrong results"
                served = client.run(served_bytes, workers=[a])[a]
                log = client.run(incoming_log, workers=[b])[b][seen:]
                moved = sum(n for _, n in log)
                assert moved == k, f"expected {k} arrays moved from A to B, saw {moved}"
                if rep:
                    rows.append(
                        {
                            "wall_per_transfer_s": wall / k,
                            "dask_transfer_per_array_s": sum(d for d, _ in log) / k,
                            "comm_bytes_per_transfer": served / k,
                        }
                    )
                client.cancel(xs + ys)
                del xs, ys
                time.sleep(0.2)  # let the workers forget the keys
            results[str(nbytes)] = {
                "arrays_per_map": k,
                "reps": rows,
                **{f"median_{key}": statistics.median(r[key] for r in rows) for key in rows[0]},
            }
    return results


# -- the driver --------------------------------------------------------------------


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} us"


def _fmt_bytes(n: float) -> str:
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n:.0f} B"


def table(results: dict[str, Any], sizes: list[int]) -> str:
    lines = [
        "| array | way | wall per transfer | Dask transfer time | comm bytes per transfer | wall-time ratio |",
        "|---|---|---|---|---|---|",
    ]
    for nbytes in sizes:
        base = results["numpy"][str(nbytes)]["median_wall_per_transfer_s"]
        for way in WAYS:
            r = results[way][str(nbytes)]
            ratio = base / r["median_wall_per_transfer_s"]
            lines.append(
                f"| {_fmt_bytes(nbytes)} | {way} | {_fmt_time(r['median_wall_per_transfer_s'])} "
                f"| {_fmt_time(r['median_dask_transfer_per_array_s'])} "
                f"| {_fmt_bytes(r['median_comm_bytes_per_transfer'])} | {ratio:.1f}x |"
            )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="2 repetitions, fewer arrays per map")
    ap.add_argument("--reps", type=int, help="timed repetitions (default 7; 2 with --quick)")
    ap.add_argument("--json", help="write the results and the machine to this file")
    ap.add_argument("--one", choices=WAYS, help=argparse.SUPPRESS)  # a child program's way
    args = ap.parse_args()
    reps = args.reps or (2 if args.quick else 7)
    if reps < 1:
        ap.error("--reps must be at least 1")
    sizes = list(SIZES)
    count = {1 * MiB: 16 if args.quick else 32, 64 * MiB: 4 if args.quick else 8}

    if args.one:
        print(json.dumps(run_way(args.one, sizes, count, reps)))
        return 0

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import machine_info

    results: dict[str, Any] = {}
    for way in WAYS:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", way, "--reps", str(reps)]
        if args.quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"the {way} run failed ({proc.returncode})")
        results[way] = json.loads(proc.stdout.strip().splitlines()[-1])

    machine = machine_info()
    print(table(results, sizes))
    big = str(64 * MiB)
    ratio = (
        results["numpy"][big]["median_wall_per_transfer_s"]
        / results["pyarraypool"][big]["median_wall_per_transfer_s"]
    )
    print(
        f"\n64 MiB: pyarraypool {ratio:.1f}x less wall time per transfer (target >= 5x); "
        f"comm bytes per transfer with pyarraypool: 1 MiB "
        f"{_fmt_bytes(results['pyarraypool'][str(MiB)]['median_comm_bytes_per_transfer'])}, "
        f"64 MiB {_fmt_bytes(results['pyarraypool'][big]['median_comm_bytes_per_transfer'])}"
    )
    print(
        f"machine: {machine['cpu_model']}, {machine['cores']} cores, Python {machine['python']}, "
        f"numpy {machine['numpy']}, load {machine['load_avg']}; medians of {reps} repetitions"
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "reps": reps, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
