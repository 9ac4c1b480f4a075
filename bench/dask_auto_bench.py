"""Dask auto mode: ``(x + x.T).sum()`` on a LocalCluster, auto mode on and off in one run.

The workload of issue 11: a ``LocalCluster(processes=True, n_workers=2,
threads_per_worker=1)`` computes ``(x + x.T).sum()`` on
``da.random.random((16384, 16384), chunks=(4096, 4096))`` (2 GiB of float64,
sixteen 128 MiB chunks). ``x + x.T`` needs chunk (j, i) next to chunk (i, j),
so about half of the off-diagonal chunks cross from one worker to the other.

One cluster, ``pyarraypool.dask.install(client)`` once; the two ways alternate
on it, repetition by repetition (a fresh random array each time):

- ``off``: ``install(client)``: plain ndarrays go as Dask sends them (this
  workload makes no pool arrays, so this is Dask's own path);
- ``auto``: ``install(client, min_bytes=1 MiB)``: chunks go as private handles.

Measured per repetition:

- wall time of ``compute()`` (graph submission to result);
- comm bytes: every byte the TCP comms of the two workers and of this
  process (client and scheduler) handed to the kernel during the compute,
  counted by wrapping ``distributed.comm.tcp.TCP.write``
  (``pyarraypool._dask_meter``): messages, task graph, heartbeats, data;
- array bytes moved: what the workers served to other processes
  (``Worker.transfer_outgoing_bytes_total``, Dask's ``sizeof`` of the data its
  ``get_data`` sent), i.e. the chunk bytes that went between processes.

Also, once per way, the generation alone (``x.sum()``: no chunk moves) to
show the fixed cost. Results: medians; the ratio off/auto is of medians of
the same run.

Run: ``make bench-dask-auto`` or ``.venv/bin/python bench/dask_auto_bench.py
[--quick] [--reps N] [--json build/dask_auto_bench.json]``; needs about
8 GiB of /dev/shm and 10 GiB of memory (``--quick``: a 4096 x 4096 array).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

MiB = 1 << 20
WAYS = ("off", "auto")
MIN_BYTES = 1 * MiB


# -- run on the workers ---------------------------------------------------------


def meter_start() -> None:
    from pyarraypool import _dask_meter

    _dask_meter.start()


def meter_written() -> int:
    from pyarraypool import _dask_meter

    return _dask_meter.written()


def outgoing_bytes(dask_worker: Any) -> int:
    return int(dask_worker.transfer_outgoing_bytes_total)


def auto_counters() -> dict[str, int]:
    import pyarraypool.dask

    return pyarraypool.dask.counters()


# -- the run -----------------------------------------------------------------------


def _switch(client: Any, way: str) -> None:
    import pyarraypool.dask

    pyarraypool.dask.install(client, min_bytes=MIN_BYTES if way == "auto" else None)


def _measure(client: Any, make_x: Any, expr: Any) -> dict[str, float]:
    """One compute of expr(x) on a fresh x, with its comm and moved bytes."""
    import pyarraypool
    from pyarraypool import _dask_meter

    x = make_x()
    client.run(meter_start)
    _dask_meter.start()
    out0 = sum(client.run(outgoing_bytes).values())
    sent0 = sum(c["auto_sent_by_handle"] for c in client.run(auto_counters).values())
    from distributed import get_task_stream

    with get_task_stream(client) as ts:
        t0 = time.perf_counter()
        value = float(expr(x).compute())
        wall = time.perf_counter() - t0
    comm = sum(client.run(meter_written).values()) + _dask_meter.written()
    moved = sum(client.run(outgoing_bytes).values()) - out0
    sent = sum(c["auto_sent_by_handle"] for c in client.run(auto_counters).values()) - sent0
    assert value == value and value > 0, "no result"
    pending = pyarraypool.stats().pending_transfers
    assert pending == 0, f"{pending} pending transfers after the compute"
    return {
        "wall_s": wall,
        "comm_bytes": comm,
        "moved_bytes": moved,
        "sent_by_handle": sent,
        **_profile(ts.data),
    }


def _profile(stream: list[dict[str, Any]]) -> dict[str, float]:
    """Worker seconds by activity, from Dask's task stream: computing, by the
    kind of task (random_sample, add with a transpose, sum...), and fetching
    inputs from another worker (request to deserialized data)."""
    out: dict[str, float] = {}
    for task in stream:
        prefix = task["key"][0] if isinstance(task["key"], tuple) else task["key"]
        prefix = str(prefix).rsplit("-", 1)[0]
        for ss in task["startstops"]:
            name = f"compute_{prefix}_s" if ss["action"] == "compute" else f"{ss['action']}_s"
            out[name] = out.get(name, 0.0) + ss["stop"] - ss["start"]
    return out


def run(n: int, chunk: int, reps: int) -> dict[str, Any]:
    import dask
    import dask.array as da
    from distributed import Client, LocalCluster

    import pyarraypool
    import pyarraypool.dask

    # Before the cluster: its workers inherit the pool and its settings.
    # Segments of 1 GiB: a 128 MiB block does not make a segment of its own.
    pyarraypool.configure(max_bytes=os.environ.get("BENCH_POOL_MAX", "6G"),
                          segment_bytes=os.environ.get("BENCH_SEGMENT", "1G"))
    results: dict[str, Any] = {w: [] for w in WAYS}
    floor: dict[str, Any] = {w: [] for w in WAYS}
    with (
        dask.config.set({"distributed.worker.memory.spill": False}),
        LocalCluster(
            processes=True,
            n_workers=2,
            threads_per_worker=1,
            memory_limit="9GiB",
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        pyarraypool.dask.install(client)

        def make_x() -> Any:
            return da.random.random((n, n), chunks=(chunk, chunk))

        for rep in range(reps + 1):  # the first is a warm-up
            order = WAYS if rep % 2 == 0 else WAYS[::-1]
            for way in order:
                _switch(client, way)
                r = _measure(client, make_x, lambda x: (x + x.T).sum())
                if rep:
                    results[way].append(r)
                print(f"rep {rep} {way}: {r}", file=sys.stderr, flush=True)
        for way in WAYS:  # the fixed cost: generation (and a sum), nothing moves
            _switch(client, way)
            floor[way].append(_measure(client, make_x, lambda x: x.sum()))
        _switch(client, "off")
    out: dict[str, Any] = {"n": n, "chunk": chunk, "reps": reps, "ways": {}}
    for way in WAYS:
        rows = results[way]
        out["ways"][way] = {
            "reps": rows,
            "generation_only": floor[way][0],
            **{f"median_{k}": statistics.median(r.get(k, 0.0) for r in rows)
               for k in sorted({k for r in rows for k in r})},
        }
    off, auto = out["ways"]["off"], out["ways"]["auto"]
    out["speedup"] = off["median_wall_s"] / auto["median_wall_s"]
    out["comm_fraction_auto"] = auto["median_comm_bytes"] / auto["median_moved_bytes"]
    return out


def _gib(b: float) -> str:
    return f"{b / (1 << 30):.2f} GiB" if b >= (1 << 30) else f"{b / MiB:.1f} MiB" \
        if b >= MiB else f"{b / 1024:.1f} KiB"


def summary(res: dict[str, Any]) -> str:
    lines = [
        "| way | wall (median) | comm bytes | array bytes moved | comm / moved "
        "| chunks by handle | generation only (x.sum()) |",
        "|---|---|---|---|---|---|---|",
    ]
    for way in WAYS:
        w = res["ways"][way]
        lines.append(
            f"| {way} | {w['median_wall_s']:.2f} s | {_gib(w['median_comm_bytes'])} "
            f"| {_gib(w['median_moved_bytes'])} "
            f"| {100 * w['median_comm_bytes'] / w['median_moved_bytes']:.3f}% "
            f"| {w['median_sent_by_handle']:.0f} | {w['generation_only']['wall_s']:.2f} s |"
        )
    lines.append("\nworker seconds (medians), from Dask's task stream:")
    for way in WAYS:
        w = res["ways"][way]
        parts = [f"{k[len('median_'):-2]} {v:.2f}" for k, v in w.items()
                 if k.startswith("median_") and (k.startswith("median_compute_")
                                                 or k == "median_transfer_s")]
        lines.append(f"  {way}: " + ", ".join(parts))
    lines.append(
        f"\nspeedup (off / auto, medians): {res['speedup']:.2f}x (target >= 2x); "
        f"comm bytes with auto: {100 * res['comm_fraction_auto']:.3f}% of the array bytes "
        "moved (target <= 1%)"
    )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="a 4096 x 4096 array, 2 repetitions")
    ap.add_argument("--reps", type=int, help="timed repetitions per way (default 5; 2 --quick)")
    ap.add_argument("--json", help="write the results and the machine to this file")
    args = ap.parse_args()
    reps = args.reps or (2 if args.quick else 5)
    if reps < 1:
        ap.error("--reps must be at least 1")
    n, chunk = (4096, 1024) if args.quick else (16384, 4096)
    res = run(n, chunk, reps)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import machine_info

    machine = machine_info()
    res["quick"] = bool(args.quick)
    print(summary(res))
    print(
        f"machine: {machine['cpu_model']}, {machine['cores']} cores, Python {machine['python']}, "
        f"numpy {machine['numpy']}, load {machine['load_avg']}; medians of {reps} repetitions"
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": machine, **res}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
