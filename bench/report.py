"""Write docs/benchmarks.md (and its plots) from the benchmarks' JSON files.

Reads, from --build (default build/):
  bench_python.json  per-array medians in one process (bench_python.py --json)
  bench_e2e.json     end-to-end medians through multiprocessing.Pool (bench_e2e.py)
  core_bench.json    the C++ core's Google Benchmark results (make core-bench),
                     if present
  bench_scale.json   bench/bench_scale.py's scale checks, if present
  dask_auto_bench.json  bench/dask_auto_bench.py (make bench-dask-auto), if present
  bench_auto.json    bench/bench_auto.py's auto-mode targets and threshold sweep
                     (make bench-auto), if present; if not, the auto-mode
                     section already in --out is kept (bench/report_auto.py)
and writes --out (default docs/benchmarks.md) with the machine, how to rerun,
every table, the targets with PASS/MISS computed from the data, and two PNG
plots (matplotlib) next to it. Missing inputs leave their sections empty and
their targets "n/a". `make bench` runs it last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Any

import report_auto
from machine import machine_info

PER_ARRAY_PNG = "bench_per_array.png"
E2E_PNG = "bench_e2e.png"

MK = "pyarraypool make_transferable+release"
EMPTY = "pyarraypool empty+release"
HRT = "pyarraypool handle round trip"
COPYTO = "np.copyto (memcpy floor)"
PICKLE = "pickle dumps+loads"
SHM = "stdlib SharedMemory create+attach+unlink"

E2E_WAYS = ["pyarraypool", "pickle", "SharedMemory", "SharedArray"]
E2E_SHORT = {
    "S1": "S1 seed example (80 MB, 100 tasks)",
    "S2": "S2 200 x 1 MiB results",
    "S3": "S3 5,000 x 1 KiB round trips",
}


# ------------------------------------------------------------------ formatting


def sig3(x: float) -> str:
    """Three significant digits, trailing zeros kept (0.400, 12.0, 655)."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    decimals = max(0, 2 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def fmt_us(us: float) -> str:
    if us >= 1000:
        return f"{sig3(us / 1000)} ms"
    return f"{sig3(us)} us"


def fmt_s(s: float) -> str:
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 0.01:
        return f"{s * 1e3:.0f} ms"
    return f"{s * 1e3:.2f} ms"


def fmt_ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{sig3(ns / 1e6)} ms"
    if ns >= 1e3:
        return f"{sig3(ns / 1e3)} us"
    return f"{sig3(ns)} ns"


def fmt_rate(x: float) -> str:
    if x >= 1e6:
        return f"{sig3(x / 1e6)} M/s"
    if x >= 1e3:
        return f"{sig3(x / 1e3)} k/s"
    return f"{sig3(x)} /s"


def fmt_bytes(n: int | None) -> str:
    if not n:
        return "?"
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def fmt_figure(key: str, v: Any) -> str:
    """A value of bench_scale.json, by the suffix of its key."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if key.endswith("bytes"):
        return fmt_bytes(int(v))
    if key.endswith("_s") or key == "seconds":
        return fmt_s(float(v))
    return f"{v:,}" if isinstance(v, int) else sig3(v)


def verdict(ok: bool | None, parts: dict[str, bool] | None = None) -> str:
    """PASS / MISS / n/a; with parts (condition -> met), a MISS names what was missed."""
    if parts is not None:
        ok = all(parts.values())
    if ok is None:
        return "n/a"
    if ok:
        return "**PASS**"
    missed = [k for k, v in (parts or {}).items() if not v]
    return "**MISS**" + (f" ({'; '.join(missed)})" if missed else "")


def load(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None


# ------------------------------------------------------------------ C++ core


_NS = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}


def core_medians(core: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The median aggregate of every benchmark, times in ns, with a short name."""
    if not core:
        return []
    out = []
    for b in core.get("benchmarks", []):
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        scale = _NS.get(b.get("time_unit", "ns"), 1.0)
        run = b.get("run_name", b["name"])
        short = "/".join(
            p
            for p in run.split("/")
            if not re.match(r"(min_time|repeats|real_time$|iterations)", p)
        )
        out.append(
            {
                **b,
                "short": short,
                "real_ns": b["real_time"] * scale,
                "cpu_ns": b["cpu_time"] * scale,
            }
        )
    return out


def core_find(meds: list[dict[str, Any]], family: str, **params: str) -> dict[str, Any] | None:
    for b in meds:
        parts = b["short"].split("/")
        if parts[0] != family:
            continue
        kv = dict(p.split(":", 1) for p in parts[1:] if ":" in p)
        if all(kv.get(k) == v for k, v in params.items()):
            return b
    return None


# ------------------------------------------------------------------ targets


def targets(
    bp: dict[str, Any] | None, e2e: dict[str, Any] | None, meds: list[dict[str, Any]]
) -> list[tuple[str, str, str, str]]:
    """(number, target, measured, verdict) rows."""
    rows: list[tuple[str, str, str, str]] = []
    r = bp["results"] if bp else None

    def na(num: str, text: str, why: str) -> None:
        rows.append((num, text, why, verdict(None)))

    t1 = "make_transferable+release 1 KiB: >=15x faster than stdlib SharedMemory, faster than a pickle round trip"
    if r:
        mk, shm, pk = r["1 KiB"][MK], r["1 KiB"][SHM], r["1 KiB"][PICKLE]
        rows.append(
            (
                "1",
                t1,
                f"{fmt_us(mk)}: {shm / mk:.0f}x faster than SharedMemory ({fmt_us(shm)}), "
                f"{pk / mk:.1f}x faster than pickle ({fmt_us(pk)})",
                verdict(
                    None, {">=15x SharedMemory": shm / mk >= 15, "faster than pickle": mk < pk}
                ),
            )
        )
    else:
        na("1", t1, "no bench_python.json")

    t2 = "handle round trip 16 MiB: within 2x of 1 KiB, >=100x faster than pickling 16 MiB, <=3 us"
    if r:
        h1, h16, pk16 = r["1 KiB"][HRT], r["16 MiB"][HRT], r["16 MiB"][PICKLE]
        rows.append(
            (
                "2",
                t2,
                f"{fmt_us(h16)} (1 KiB: {fmt_us(h1)}, {h16 / h1:.2f}x); "
                f"{pk16 / h16:.0f}x faster than pickling 16 MiB ({fmt_us(pk16)})",
                verdict(
                    None,
                    {
                        "within 2x of 1 KiB": h16 <= 2 * h1,
                        ">=100x pickle": pk16 / h16 >= 100,
                        "<=3 us": h16 <= 3.0,
                    },
                ),
            )
        )
    else:
        na("2", t2, "no bench_python.json")

    t3 = "make_transferable 16 MiB: <=1.3x np.copyto, >=5x faster than SharedMemory"
    if r:
        mk, cp, shm = r["16 MiB"][MK], r["16 MiB"][COPYTO], r["16 MiB"][SHM]
        rows.append(
            (
                "3",
                t3,
                f"{fmt_us(mk)}: {mk / cp:.2f}x np.copyto ({fmt_us(cp)}), "
                f"{shm / mk:.1f}x faster than SharedMemory ({fmt_us(shm)})",
                verdict(
                    None, {"<=1.3x np.copyto": mk <= 1.3 * cp, ">=5x SharedMemory": shm / mk >= 5}
                ),
            )
        )
    else:
        na("3", t3, "no bench_python.json")

    t4 = "empty 16 MiB: >=100x faster than make_transferable 16 MiB"
    if r:
        em, mk = r["16 MiB"][EMPTY], r["16 MiB"][MK]
        rows.append(
            (
                "4",
                t4,
                f"{fmt_us(em)}: {mk / em:.0f}x faster ({fmt_us(mk)})",
                verdict(mk / em >= 100),
            )
        )
    else:
        na("4", t4, "no bench_python.json")

    for num, fam, what in (
        ("5a", "BM_AllocFree", "allocator"),
        ("5b", "BM_PoolAllocFree", "pool, lock included"),
    ):
        t5 = (
            f"C++ alloc+free 1 KiB ({what}, {fam}): median <=100 ns, "
            "with 1e6 live <=1.5x with 1e3 live"
        )
        lo = core_find(meds, fam, size="1024", live="1000")
        hi = core_find(meds, fam, size="1024", live="1000000")
        if lo and hi:
            a, b = lo["real_ns"], hi["real_ns"]
            rows.append(
                (
                    num,
                    t5,
                    f"{fmt_ns(a)} with 1e3 live, {fmt_ns(b)} with 1e6 live ({b / a:.2f}x)",
                    verdict(
                        None,
                        {"<=100 ns": max(a, b) <= 100, "1e6 live <=1.5x 1e3 live": b <= 1.5 * a},
                    ),
                )
            )
        else:
            na(
                num,
                t5,
                "no core_bench.json" if not meds else f"{fam}/size:1024/live:1000|1000000 missing",
            )

    t6 = "two processes' combined pool alloc+free throughput >= one process's"
    one = core_find(meds, "BM_PoolAllocFreeOneProcess")
    two = core_find(meds, "BM_PoolAllocFreeTwoProcesses")
    if one and two and "items_per_second" in one and "items_per_second" in two:
        a, b = one["items_per_second"], two["items_per_second"]
        cpus = f", cpus_used {two['cpus_used']:.2f}" if "cpus_used" in two else ""
        rows.append(
            (
                "6",
                t6,
                f"two: {fmt_rate(b)}, one: {fmt_rate(a)} ({b / a:.2f}x{cpus})",
                verdict(b >= a),
            )
        )
    else:
        na("6", t6, "no core_bench.json" if not meds else "BM_PoolAllocFree*Process* missing")

    t7 = {
        "S1": "S1: no slower than SharedMemory, >=10x faster than pickle",
        "S2": "S2: <=0.5x SharedMemory",
        "S3": "S3: no slower than pickle",
    }
    if e2e and e2e.get("methods"):
        for method, m in e2e["methods"].items():
            for scen, text in t7.items():
                res = m["scenarios"].get(scen)
                label = f"{text} ({method})"
                if not res or "pyarraypool" not in res:
                    na("7", label, "not run")
                    continue
                p = res["pyarraypool"]["median_s"]
                shm = res.get("SharedMemory", {}).get("median_s")
                pk = res.get("pickle", {}).get("median_s")
                if scen == "S1" and shm and pk:
                    rows.append(
                        (
                            "7",
                            label,
                            f"{fmt_s(p)}: {shm / p:.1f}x faster than SharedMemory "
                            f"({fmt_s(shm)}), {pk / p:.1f}x faster than pickle ({fmt_s(pk)})",
                            verdict(
                                None,
                                {
                                    "no slower than SharedMemory": p <= shm,
                                    ">=10x pickle": pk / p >= 10,
                                },
                            ),
                        )
                    )
                elif scen == "S2" and shm:
                    rows.append(
                        (
                            "7",
                            label,
                            f"{fmt_s(p)} = {p / shm:.2f}x SharedMemory ({fmt_s(shm)})",
                            verdict(p <= 0.5 * shm),
                        )
                    )
                elif scen == "S3" and pk:
                    rows.append(
                        (
                            "7",
                            label,
                            f"{fmt_s(p)} = {p / pk:.2f}x pickle ({fmt_s(pk)})",
                            verdict(p <= pk),
                        )
                    )
                else:
                    na("7", label, "a peer is missing")
    else:
        na("7", "S1/S2/S3 under each start method", "no bench_e2e.json")
    return rows


def dask_auto_targets(res: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """The Dask auto mode target (issue 11) from dask_auto_bench.json."""
    text = (
        "Dask LocalCluster (2 processes): (x + x.T).sum(), 16384^2 float64 in 4096^2 chunks: "
        "auto mode >=2x faster than without; comm bytes <=1% of the array bytes moved"
    )
    if not res or res.get("quick"):
        return [("D1", text, "no full run of dask_auto_bench.json", verdict(None))]
    off, auto = res["ways"]["off"], res["ways"]["auto"]
    fraction = res["comm_fraction_auto"]
    measured = (
        f"{fmt_s(auto['median_wall_s'])} vs {fmt_s(off['median_wall_s'])}: "
        f"{res['speedup']:.2f}x; comm bytes {100 * fraction:.3f}% of "
        f"{fmt_bytes(int(auto['median_moved_bytes']))} moved"
    )
    return [("D1", text, measured,
             verdict(None, {"2x": res["speedup"] >= 2.0, "1% comm": fraction <= 0.01}))]


def dask_auto_section(res: dict[str, Any]) -> list[str]:
    L = [
        "## Dask auto mode",
        "",
        "From `build/dask_auto_bench.json` (`bench/dask_auto_bench.py`, `make bench-dask-auto`): "
        f"`(x + x.T).sum()` on a {res['n']} x {res['n']} float64 dask.array in "
        f"{res['chunk']} x {res['chunk']} chunks, LocalCluster(processes=True, n_workers=2, "
        "threads_per_worker=1); auto mode off and on alternate on one cluster, medians of "
        f"{res['reps']} repetitions each. Comm bytes: every byte the TCP comms of the workers, "
        "the client and the scheduler wrote during the compute; array bytes moved: what the "
        "workers' get_data served (Dask's transfer_outgoing_bytes_total). Generation only: "
        "x.sum(), where no chunk moves. "
        f"Machine load average at the end: {res.get('machine', {}).get('load_avg', 'n/a')}.",
        "",
        "| way | wall | comm bytes | array bytes moved | chunks by handle | generation only |",
        "|---|---|---|---|---|---|",
    ]
    for way in ("off", "auto"):
        w = res["ways"][way]
        L.append(
            f"| {way} | {fmt_s(w['median_wall_s'])} | {fmt_bytes(int(w['median_comm_bytes']))} "
            f"| {fmt_bytes(int(w['median_moved_bytes']))} | {w['median_sent_by_handle']:.0f} "
            f"| {fmt_s(w['generation_only']['wall_s'])} |"
        )
    off, auto = res["ways"]["off"], res["ways"]["auto"]
    L += [
        "",
        "Where the time goes (worker seconds, medians, from Dask's task stream): fetching "
        f"chunks from the other worker {fmt_s(off.get('median_transfer_s', 0))} off, "
        f"{fmt_s(auto.get('median_transfer_s', 0))} auto; the tasks that add a chunk to a "
        f"transposed one and sum it {fmt_s(off.get('median_compute_sum_s', 0))} off, "
        f"{fmt_s(auto.get('median_compute_sum_s', 0))} auto; generating the chunks "
        f"{fmt_s(off.get('median_compute_random_sample_s', 0))} off, "
        f"{fmt_s(auto.get('median_compute_random_sample_s', 0))} auto (plus the generation "
        "fused into other tasks). See docs/dask.md, \"Auto mode\", for why the wall time "
        "gains less than the transfers.",
        "",
    ]
    return L


# ------------------------------------------------------------------ plots


def plot_per_array(bp: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = bp["sizes"]
    labels = list(sizes)
    xs = [sizes[s] for s in labels]
    fig, ax = plt.subplots(figsize=(8, 5.2))
    styles = {
        COPYTO: ("k", "--"),
        PICKLE: ("tab:orange", "-"),
        SHM: ("tab:red", "-"),
        MK: ("tab:blue", "-"),
        EMPTY: ("tab:cyan", "-"),
        HRT: ("tab:green", "-"),
    }
    for way in bp["ways"]:
        color, ls = styles.get(way, (None, "-"))
        ax.plot(
            xs,
            [bp["results"][s][way] for s in labels],
            marker="o",
            color=color,
            linestyle=ls,
            label=way,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, labels)
    ax.set_xlabel("array size")
    ax.set_ylabel("median time per array (us, log)")
    ax.set_title("Cost per array, one process" + (" (--quick)" if bp.get("quick") else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_e2e(e2e: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    methods = list(e2e["methods"])
    scens = list(e2e["scenarios"])
    colors = {
        "pyarraypool": "tab:blue",
        "pickle": "tab:orange",
        "SharedMemory": "tab:red",
        "SharedArray": "tab:purple",
    }
    fig, axes = plt.subplots(1, len(scens), figsize=(4.2 * len(scens), 4.6), squeeze=False)
    for ax, scen in zip(axes[0], scens, strict=True):
        ways = [
            w
            for w in E2E_WAYS
            if any(w in e2e["methods"][m]["scenarios"].get(scen, {}) for m in methods)
        ]
        width = 0.8 / max(len(ways), 1)
        lowest, highest = math.inf, 0.0
        for j, w in enumerate(ways):
            xs, ys = [], []
            for i, m in enumerate(methods):
                r = e2e["methods"][m]["scenarios"].get(scen, {}).get(w)
                if r:
                    xs.append(i + (j - (len(ways) - 1) / 2) * width)
                    ys.append(r["median_s"] * 1e3)
            bars = ax.bar(xs, ys, width=width, color=colors.get(w), label=w)
            ax.bar_label(
                bars,
                labels=[f"{y:.0f}" if y >= 10 else f"{y:.1f}" for y in ys],
                fontsize=6,
                padding=1,
            )
            lowest = min([lowest, *ys])
            highest = max([highest, *ys])
        ax.set_xticks(range(len(methods)), methods)
        ax.set_yscale("log")
        # Bars on a log axis start from a round decade, not from an arbitrary low edge.
        ax.set_ylim(10 ** math.floor(math.log10(lowest)), highest * 1.6)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("median wall time (ms, log)")
        ax.set_title(E2E_SHORT.get(scen, scen), fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(
        "End to end through multiprocessing.Pool(2): median wall time per scenario run"
        + (" (--quick)" if e2e.get("quick") else "")
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ document


def machine_section(
    bp: dict[str, Any] | None, e2e: dict[str, Any] | None, core: dict[str, Any] | None
) -> list[str]:
    m: dict[str, Any] = (e2e or {}).get("machine") or (bp or {}).get("machine") or machine_info()
    out = [
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m['cpu_model']} |",
        f"| cores | {m['cores']} |",
        f"| memory | {fmt_bytes(m.get('mem_total_bytes'))} (/dev/shm {fmt_bytes(m.get('dev_shm_bytes'))}) |",
        f"| kernel | Linux {m['kernel']} |",
        f"| Python | {m['python']} |",
        f"| numpy | {m['numpy']} |",
    ]
    runs = []
    for name, doc in (("bench_python", bp), ("bench_e2e", e2e)):
        if doc and doc.get("machine"):
            dm = doc["machine"]
            load = dm.get("load_avg")
            runs.append(
                f"{name} {dm.get('date', '?')}"
                + (f" (load average {load[0]})" if load else "")
                + (", --quick" if doc.get("quick") else "")
            )
    if core and core.get("context"):
        c = core["context"]
        load = c.get("load_avg")
        runs.append(
            f"core_bench {c.get('date', '?')}" + (f" (load average {load[0]:.2f})" if load else "")
        )
    if runs:
        out.append(f"| runs | {'; '.join(runs)} |")
    out.append("")
    return out


MIB = 1 << 20


def memory_targets(mem: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """The memory targets of issue 12 (M1-M3, R) from bench_memory.json."""
    rows: list[tuple[str, str, str, str]] = []
    texts = {
        "M1": "peak /dev/shm <= 1.05x live bytes + 8 MiB",
        "M2": "after 3 s idle with everything dropped: /dev/shm and the parent's RssShmem <= 8 MiB each",
        "M3": "64 MiB make_transferable into a growing pool <= 1.25x a copy into fresh numpy memory",
        "R": "a loop making and dropping 64 MiB arrays <= 1.2x memcpy (np.copyto into a warm array)",
    }
    if not mem:
        return [(k, t, "no build/bench_memory.json", verdict(None)) for k, t in texts.items()]
    for name, label in (("pool2", "200 x 1 MiB through Pool(2)"), ("mixed", "mixed sizes")):
        r = mem[name]
        bound = 1.05 * r["live"] + 8 * MIB
        rows.append(("M1", f"{texts['M1']} ({label})",
                     f"{fmt_bytes(r['peak_shm'])} for {fmt_bytes(r['live'])} live "
                     f"(bound {fmt_bytes(int(bound))}; load {r['loadavg']})",
                     verdict(r["peak_shm"] <= bound)))
    for name, label in (("pool2", "after Pool(2)"), ("mixed", "after mixed sizes")):
        r = mem[name]
        rows.append(("M2", f"{texts['M2']} ({label})",
                     f"/dev/shm {fmt_bytes(r['idle_shm'])}, RssShmem {fmt_bytes(r['idle_rss_shmem'])}",
                     verdict(None, {"/dev/shm": r["idle_shm"] <= 8 * MIB,
                                    "RssShmem": r["idle_rss_shmem"] <= 8 * MIB})))
    g = mem["grow"]
    ratio = g["pool_ms"] / g["fresh_ms"]
    small = ""
    if "small_pages_ms" in g:
        small = (f"; fresh anonymous memory of 4 KiB pages {g['small_pages_ms']:.1f} ms: "
                 f"{g['pool_ms'] / g['small_pages_ms']:.2f}x (see Memory)")
    rows.append(("M3", texts["M3"],
                 f"{g['pool_ms']:.1f} ms vs {g['fresh_ms']:.1f} ms (numpy's huge pages): "
                 f"{ratio:.2f}x{small} (load {g['loadavg']})",
                 verdict(None, {"1.25x": ratio <= 1.25})))
    s = mem["steady"]
    ratio = s["pool_ms"] / s["memcpy_ms"]
    rows.append(("R", texts["R"],
                 f"{s['pool_ms']:.1f} ms vs {s['memcpy_ms']:.1f} ms: {ratio:.2f}x; "
                 f"given back meanwhile: {fmt_bytes(s['returned']) if s['returned'] else '0 B'}",
                 verdict(None, {"1.2x": ratio <= 1.2, "nothing given back": s["returned"] == 0})))
    return rows


def build(args: argparse.Namespace) -> str:
    bp = load(os.path.join(args.build, "bench_python.json"))
    e2e = load(os.path.join(args.build, "bench_e2e.json"))
    core = load(os.path.join(args.build, "core_bench.json"))
    mem = load(os.path.join(args.build, "bench_memory.json"))
    meds = core_medians(core)
    docs_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(docs_dir, exist_ok=True)

    L: list[str] = [
        "# Benchmarks",
        "",
        "Generated by `bench/report.py` from `build/bench_python.json`, "
        "`build/bench_e2e.json` and `build/core_bench.json`; do not edit by hand: "
        "rerun `make bench`.",
        "",
    ]
    quick = [n for n, d in (("bench_python", bp), ("bench_e2e", e2e)) if d and d.get("quick")]
    if quick:
        L += [
            f"> **Smoke run:** {', '.join(quick)} ran with `--quick` (few repetitions): "
            "the numbers are noisy and the verdicts below are not to be quoted.",
            "",
        ]
    L += machine_section(bp, e2e, core)

    L += [
        "## How to rerun",
        "",
        "```sh",
        "make bench             # core-bench, bench_python/e2e/scale/memory, then this report",
        "make bench-memory      # the memory targets (M1-M3, R) alone",
        "make bench-growth-floor  # what 64 MiB of fresh pages cost, every way (M3's floor)",
        "make bench-auto        # auto mode (A-D, threshold sweep)",
        "make bench-dask-auto   # D1",
        "```",
        "",
        "`make bench` runs, in order: `make core-bench` (the C++ core under Google Benchmark, "
        "to `build/core_bench.json`), `bench/bench_python.py --json build/bench_python.json`, "
        "`bench/bench_e2e.py --json build/bench_e2e.json`, `bench/bench_scale.py`, "
        "`bench/bench_memory.py` (which runs `build/growth_floor`), and `bench/report.py`, which "
        "rewrites this file and its plots from every `build/*.json` there is (the auto-mode "
        "and Dask sections come from their own targets' files). On the 2-core development "
        "machine it takes about ten minutes and needs a `/dev/shm` of more than 8 GiB. Run it on "
        "an otherwise idle machine: every figure is a median, but the "
        "two-process and end-to-end benchmarks need both cores. "
        "`bench/bench_e2e.py --quick --methods fork` is a smoke test of a few seconds.",
        "",
    ]

    # -- per array
    L += ["## Per array, in one process", ""]
    if bp:
        sizes = list(bp["sizes"])
        L += [
            "Median time to share one float64 array and drop it (`bench/bench_python.py`): "
            "create, copy in, attach, release; the handle round trip is `pickle.loads(pickle.dumps(x))` "
            "of an array already in the pool (what a worker's attach costs).",
            "",
            "| way | " + " | ".join(sizes) + " |",
            "|---|" + "---:|" * len(sizes),
        ]
        for way in bp["ways"]:
            L.append(
                f"| {way} | " + " | ".join(fmt_us(bp["results"][s][way]) for s in sizes) + " |"
            )
        L.append("")
        plot_per_array(bp, os.path.join(docs_dir, PER_ARRAY_PNG))
        L += [f"![cost per array vs array size]({PER_ARRAY_PNG})", ""]
    else:
        L += ["No `build/bench_python.json`.", ""]

    # -- end to end
    L += ["## End to end through `multiprocessing.Pool(2)`", ""]
    if e2e and e2e.get("methods"):
        L += [
            "`bench/bench_e2e.py`: a `multiprocessing.get_context(method).Pool(2)`, started and "
            "warmed up before any timing. Each scenario runs each way once untimed, then "
            f"{e2e['reps']} timed repetitions (ways slower than {e2e['slow_threshold_s']:g} s: "
            f"{e2e['slow_reps']}; a cell says when it differs), interleaved. Timed: from inputs as "
            "plain ndarrays in the parent to usable results in the parent, plus the clean-up; not "
            "timed: verifying every result, which the parent does after every run. "
            "Each cell is the warm median, and in brackets the cold figure: the first, "
            "untimed run of that way (first-touch page faults, a pool that grows, "
            "lazily mapped segments).",
            "",
        ]
        for s, sc in e2e["scenarios"].items():
            L.append(f"- **{s}**: {sc['title']}.")
        L += [
            "",
            "Ways: **pyarraypool** (S1 `make_transferable` and in-place writes; S2 the worker "
            "returns `pyarraypool.empty(...)` filled in place; S3 `make_transferable` of each "
            "input, the worker returns `make_transferable(result)`); **pickle** (plain ndarrays "
            "through the Pool's pipes; in S1 each plane travels to its worker and back, as the "
            "seed's `main_with_pickle`); **SharedMemory** (stdlib, passed by name: S1 one segment "
            "for the array; S2 the worker creates a segment and returns its name, the parent "
            "attaches, sums, unlinks; S3 one segment per input and per result)"
            + (
                "; **SharedArray** (S1 and S2, `SharedArray.create('shm://...')` / `attach` / "
                "`delete`)."
                if e2e["sharedarray"].get("available")
                else "."
            ),
            "",
        ]
        sa_info = e2e["sharedarray"]
        if sa_info.get("available"):
            L += [
                f"SharedArray {sa_info.get('version') or ''} installed with "
                "`.venv/bin/pip install SharedArray`.",
                "",
            ]
        else:
            L += [
                f"SharedArray is not in these runs: it did not install or import (`{sa_info.get('error')}`).",
                "",
            ]
        for method, m in e2e["methods"].items():
            ways = [w for w in E2E_WAYS if any(w in r for r in m["scenarios"].values())]
            peers = [w for w in ways if w != "pyarraypool"]
            L += [
                f"### {method}",
                "",
                f"Pool(2) start-up, not included: {fmt_s(m['pool_startup_s'])}.",
                "",
                "| scenario | "
                + " | ".join(ways)
                + " | "
                + " | ".join(f"{p} / pyarraypool" for p in peers)
                + " |",
                "|---|" + "---:|" * (len(ways) + len(peers)),
            ]
            for scen, r in m["scenarios"].items():
                cells = []
                for w in ways:
                    if w not in r:
                        cells.append("-")
                        continue
                    c = fmt_s(r[w]["median_s"])
                    if r[w]["reps"] != e2e["reps"]:
                        c += f" ({r[w]['reps']} reps)"
                    if "warmup_s" in r[w]:
                        c += f" (cold {fmt_s(r[w]['warmup_s'])})"
                    cells.append(c)
                ratios = [
                    f"{r[p]['median_s'] / r['pyarraypool']['median_s']:.1f}x"
                    if p in r and "pyarraypool" in r
                    else "-"
                    for p in peers
                ]
                L.append(f"| {E2E_SHORT.get(scen, scen)} | " + " | ".join(cells + ratios) + " |")
            L.append("")
        L += [
            "The ratios are the peer's median over pyarraypool's: above 1, pyarraypool is faster.",
            "",
        ]
        plot_e2e(e2e, os.path.join(docs_dir, E2E_PNG))
        L += [f"![end-to-end scenarios]({E2E_PNG})", ""]
    else:
        L += ["No `build/bench_e2e.json`.", ""]

    # -- C++ core
    L += ["## C++ core (Google Benchmark)", ""]
    if meds:
        L += [
            "Medians of the repetitions in `build/core_bench.json` (`bench/core_bench.cpp` "
            "describes each benchmark). `cpus_used` below 2 in a two-thread or two-process "
            "benchmark means the machine was busy with other work.",
            "",
            "| benchmark | real time | CPU time | items/s | cpus_used |",
            "|---|---:|---:|---:|---:|",
        ]
        for b in meds:
            ips = fmt_rate(b["items_per_second"]) if "items_per_second" in b else ""
            cpus = f"{b['cpus_used']:.2f}" if "cpus_used" in b else ""
            L.append(
                f"| {b['short']} | {fmt_ns(b['real_ns'])} | {fmt_ns(b['cpu_ns'])} | {ips} | {cpus} |"
            )
        L.append("")
    else:
        L += [
            "No `build/core_bench.json` (`make core-bench` needs Google Benchmark: "
            "`make bench-tools`).",
            "",
        ]

    # -- scale checks (bench/bench_scale.py), if present
    if mem and mem.get("growth_floor"):
        floor = mem["growth_floor"]
        base = floor[0]["ms"]
        L += [
            "## Memory: what fresh pages cost (M3)",
            "",
            "From `build/bench_memory.json` (`make bench-memory`, which runs "
            "`bench/growth_floor.cpp`): 64 MiB of fresh memory filled by a copy, each way this "
            "kernel offers, with no pool around it, medians of 9. numpy asks for transparent huge "
            "pages for large arrays (32 faults of 2 MiB); this /dev/shm is a tmpfs without "
            "`huge=`, so every shared-memory way pays for 16,384 pages of 4 KiB, each "
            "allocated, cleared and mapped on its own. No way to fill such pages comes within "
            "1.25x numpy's: M3 cannot pass on this /dev/shm, whatever the pool does "
            "(docs/design.md, \"Memory\").",
            "",
            "| way | median | / numpy's way |",
            "|---|---:|---:|",
        ]
        for row in floor:
            L.append(f"| {row['way']} | {row['ms']:.1f} ms | {row['ms'] / base:.2f}x |")
        L.append("")
    scale = load(os.path.join(args.build, "bench_scale.json"))
    if scale:
        L += [
            "## Scale checks",
            "",
            "From `build/bench_scale.json` (`bench/bench_scale.py`, run by `make bench`; "
            "`BENCH_SCALE_ARGS=--skip-16g` skips the 16 GiB pool). Each check runs for "
            "real: a million arrays live at once, 32 processes attached to one pool, and a "
            "pool of 16 GiB whose every page is touched.",
            "",
            "| check | figures |",
            "|---|---|",
        ]
        for name, res in scale.items():
            figs = (
                ", ".join(f"{k} {fmt_figure(k, v)}" for k, v in res.items())
                if isinstance(res, dict)
                else str(res)
            )
            L.append(f"| {name.replace('_', ' ')} | {figs} |")
        L.append("")

    dask_auto = load(os.path.join(args.build, "dask_auto_bench.json"))
    if dask_auto:
        L += dask_auto_section(dask_auto)
    # -- auto mode (bench/bench_auto.py): from build/bench_auto.json, else as it was
    auto = load(os.path.join(args.build, "bench_auto.json"))
    kept = None if auto else report_auto.existing(args.out)
    L += [kept, ""] if kept else report_auto.section(auto) + [""]

    # -- targets
    L += [
        "## Targets",
        "",
        "Each verdict is computed by `bench/report.py` from the figures above; "
        "the auto-mode targets (A-D) are in their own section above.",
        "",
        "| # | target | measured | result |",
        "|---|---|---|---|",
    ]
    for num, text, measured, v in (targets(bp, e2e, meds) + dask_auto_targets(dask_auto)
                                   + memory_targets(mem)):
        L.append(f"| {num} | {text} | {measured} | {v} |")
    L.append("")
    return "\n".join(L)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--build", default="build", help="directory of the JSON inputs (default build)")
    ap.add_argument(
        "--out", default="docs/benchmarks.md", help="the report (default docs/benchmarks.md)"
    )
    ap.add_argument(
        "--only-auto",
        action="store_true",
        help="rewrite only the auto-mode section from build/bench_auto.json (make bench-auto)",
    )
    args = ap.parse_args()
    if args.only_auto:
        with open(args.out) as f:
            old = f.read()
        auto = load(os.path.join(args.build, "bench_auto.json"))
        text = report_auto.splice(old, "\n".join(report_auto.section(auto)))
    else:
        text = build(args)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
