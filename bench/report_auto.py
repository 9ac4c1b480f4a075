"""The auto-mode section of docs/benchmarks.md, from build/bench_auto.json.

bench/bench_auto.py takes minutes and is not part of `make bench`, so its
section lives between two markers: `make bench-auto` (report.py --only-auto)
replaces just that part of the existing file, and a full `make bench` keeps
the section as it was when there is no build/bench_auto.json to render it from.
"""

from __future__ import annotations

from typing import Any

BEGIN = "<!-- bench_auto: begin (bench/report_auto.py) -->"
END = "<!-- bench_auto: end -->"


def _ms(s: float) -> str:
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 0.01:
        return f"{s * 1e3:.0f} ms"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def _verdict(parts: dict[str, bool]) -> str:
    missed = [k for k, ok in parts.items() if not ok]
    return "**PASS**" if not missed else "**MISS** (" + "; ".join(missed) + ")"


def target_rows(doc: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(id, target, measured, verdict) for targets A-D of bench_auto.py."""
    t = doc.get("targets")
    if not t:
        return [("A-D", "auto-mode targets", "not run", "n/a")]
    tol = doc["no_slower_tolerance"]
    rows = []
    for key, label in (("A", "returning 16 MiB"), ("B", "sending 16 MiB")):
        r = t[key]
        rows.append(
            (
                key,
                f"ProcessPoolExecutor(2) spawn, {label}: on >=5x faster than off",
                f"{r['speedup']:.1f}x ({_ms(r['median_off_s'])} off, {_ms(r['median_on_s'])} on)",
                _verdict({">=5x": r["speedup"] >= 5}),
            )
        )
    parts, measured = {}, []
    for key in ("C-return", "C-send"):
        r = t[key]
        ratio = r["median_pair_ratio_on_off"]
        parts[f"{key} on/off {ratio:.3f} > {1 + tol:.2f}"] = ratio <= 1 + tol
        measured.append(
            f"{key[2:]}: on/off {ratio:.3f} by pairs, {1 / r['speedup']:.3f} by medians "
            f"({_ms(r['median_off_s'])} off, {_ms(r['median_on_s'])} on)"
        )
    rows.append(
        (
            "C",
            f"the same with 64 KiB: on no slower than off (median of paired on/off <= {1 + tol:.2f})",
            "; ".join(measured),
            _verdict(parts),
        )
    )
    r = t["D"]
    rows.append(
        (
            "D",
            "joblib.Parallel(n_jobs=2), 64 MiB in and out: on faster than loky's memmapping, "
            "nothing left in /dev/shm or the temp folder",
            f"{r['speedup']:.2f}x ({_ms(r['median_off_s'])} off, {_ms(r['median_on_s'])} on); "
            f"left behind: {', '.join(r['leftovers']) or 'nothing'}",
            _verdict({"faster": r["speedup"] > 1, "nothing left": not r["leftovers"]}),
        )
    )
    return rows


def section(doc: dict[str, Any] | None) -> list[str]:
    L = [BEGIN, "## Auto mode (`PYARRAYPOOL_AUTO`) on unchanged programs", ""]
    if not doc:
        return L + ["No `build/bench_auto.json`: run `make bench-auto`.", "", END]
    m = doc["machine"]
    parts = {k: doc[k]["run"] for k in ("targets", "sweep") if k in doc}
    L += [
        "`bench/bench_auto.py` (`make bench-auto`) runs `bench/auto_workload.py`, a program "
        "that never imports pyarraypool, once with `PYARRAYPOOL_AUTO` in its environment (on) "
        "and once without (off), alternating, the order flipped every other pair. The program "
        "times its transfer loop; the start-up (creating the executor, warm-up tasks) is "
        "reported apart. The targets run with the default threshold, the sweep with "
        "a 1-byte threshold (every size; the value is below).",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, Python {m['python']}, numpy {m['numpy']}.",
        "",
    ]
    for k, r in parts.items():
        L.append(
            f"- {k}: run {r['date']}, `PYARRAYPOOL_AUTO={r['auto']}`, {r['reps']} pairs, "
            f"load average {r['load_start'][0]} at the start, {r['load_end'][0]} at the end"
            + (", `--quick`" if r["quick"] else "")
            + "."
        )
    L.append("")
    shims = sorted({r["pythonpath"] for r in parts.values() if r.get("pythonpath")})
    if shims:
        L += [
            f"> **Provisional:** these runs had `{', '.join(shims)}` on `PYTHONPATH`, a "
            "development stand-in for auto mode, not the package's own mechanism.",
            "",
        ]
    if any(r["quick"] for r in parts.values()):
        L += ["> **Smoke run** (`--quick`): the verdicts are not to be quoted.", ""]
    t = doc.get("targets")
    if t:
        L += [
            "| workload | off (median) | on (median) | off / on | on / off, median of pairs "
            "| off runs' MAD / median | start-up off / on | load averages |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for key, r in ((k, v) for k, v in t.items() if k != "run"):
            L.append(
                f"| {key}: {r['title']} | {_ms(r['median_off_s'])} | {_ms(r['median_on_s'])} "
                f"| {r['speedup']:.2f}x | {r['median_pair_ratio_on_off']:.3f} "
                f"| {r.get('off_mad_rel', float('nan')):.1%} "
                f"| {_ms(r['median_startup_off_s'])} / {_ms(r['median_startup_on_s'])} "
                f"| {', '.join(f'{x:g}' for x in r['loads'])} |"
            )
        L.append("")
    L += ["| # | target | measured | result |", "|---|---|---|---|"]
    for row in target_rows(doc):
        L.append("| " + " | ".join(row) + " |")
    L += [
        "",
        f'"No slower" (C) allows {doc["no_slower_tolerance"]:.0%}: each on run is divided by '
        "the off run next to it, and the median of those ratios must be at most "
        f"{1 + doc['no_slower_tolerance']:.2f}. Pairs cancel the drift of a shared machine's "
        "load; the tolerance stands for the noise left between two runs of the same program "
        "on this shared machine (the off runs' own MAD / median, in the table, shows it).",
        "",
    ]
    s = doc.get("sweep")
    if s:
        L += [
            "### Threshold sweep",
            "",
            "Median time per round trip of a uint8 array, auto forced on for every size "
            "(a 1-byte threshold) against off: a multiprocessing `Pipe` to a spawn child "
            "that sends back what it got, and `ProcessPoolExecutor(2)` (spawn) whose task "
            "returns its input. on/off is the median of the paired ratios (each on run over "
            "the off run next to it), the statistic of target C.",
            "",
        ]
        apis = list(s["apis"])
        L += [
            "| size | " + " | ".join(f"{a} off | {a} on | {a} on/off" for a in apis) + " |",
            "|---|" + "---:|" * (3 * len(apis)),
        ]
        for n in s["sizes"]:
            cells = []
            for a in apis:
                r = s["apis"][a]["per_size"][str(n)]
                cells += [
                    _ms(r["median_off_s"]),
                    _ms(r["median_on_s"]),
                    f"{r['median_pair_ratio_on_off']:.2f}",
                ]
            L.append(f"| {_size(n)} | " + " | ".join(cells) + " |")
        L.append("")
        for a in apis:
            c = s["apis"][a]["crossover_bytes"]
            L.append(
                f"- {a}: on is no slower from "
                + (f"**{_size(c)}** up" if c else "no size (it loses at the largest)")
                + "."
            )
        rec = s.get("recommended_threshold_bytes")
        L += [
            "",
            "The smallest threshold with which auto mode was no slower than off at every "
            "measured size for both, in this run (the larger crossover): "
            + (f"**{_size(rec)}** ({rec} bytes)." if rec else "none found.")
            + " Below 64 KiB a round trip costs tens of microseconds either way and the "
            "ratios move from run to run with the machine's load: judge the default from "
            "several runs (`make bench-auto BENCH_AUTO_ARGS='--only sweep'`), not one.",
            "",
        ]
    return L + [END]


def splice(old: str, new_section: str) -> str:
    """old with its auto-mode section replaced (or, if it has none, put before ## Targets)."""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        return head + new_section + rest.split(END, 1)[1]
    at = old.find("\n## Targets")
    if at < 0:
        return old.rstrip("\n") + "\n\n" + new_section + "\n"
    return old[: at + 1] + new_section + "\n\n" + old[at + 1 :]


def existing(path: str) -> str | None:
    """The auto-mode section of the file at path, markers included, if it has one."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    if BEGIN not in text or END not in text:
        return None
    return BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END
