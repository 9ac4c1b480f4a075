"""End to end through a real multiprocessing Pool: pyarraypool next to its peers.

Under each start method ('fork', 'spawn', 'forkserver') a
`multiprocessing.get_context(method).Pool(2)` is created and warmed up with a
trivial map (its start-up is not timed; it is recorded apart). Then each
scenario runs each way, and the median wall time over the repetitions is
reported:

  S1  the seed's example: a 100x200x500 float64 array, one task per plane
      (100 tasks) writing x[i, :, :] = i, then the parent checks every plane.
  S2  200 tasks, each returning a fresh 1 MiB float64 array (filled with i+1);
      the parent reads each result (its sum).
  S3  5,000 tasks, each sending a 1 KiB float64 array to a worker and getting
      a 1 KiB array (x * 2 + 1) back, in Pool.map's default chunks.

The ways:

  pyarraypool   S1: make_transferable(arr), workers write the planes in place.
                S2: the worker returns pyarraypool.empty(...) filled in place.
                S3: make_transferable on each input in the parent; the worker
                    returns make_transferable(result).
  pickle        plain ndarrays through the Pool's pipes. S1: as the seed's
                main_with_pickle, each plane goes to a worker and comes back,
                and the parent stores it into the array.
  SharedMemory  stdlib multiprocessing.shared_memory, passed by name.
                S1: one segment for the whole array, created by the parent;
                    workers attach by name, write their plane, close.
                S2: the worker creates a segment, fills it, closes it and
                    returns its name; the parent attaches, sums, closes, unlinks.
                S3: one segment per array: the parent creates and fills one
                    per input; the worker attaches it, creates one for its
                    result and returns the name; the parent attaches, copies
                    the result out, closes and unlinks both.
  SharedArray   (S1 and S2, if the SharedArray package imports) the same as
                SharedMemory through SharedArray.create('shm://name') /
                attach / delete.

Timed: from the parent holding its inputs as ordinary ndarrays to the parent
holding usable results, plus the clean-up (releasing, closing, unlinking).
Not timed: the Pool's start-up, the resetting of inputs before a run, and the
verification of every result, which the parent does after every run (a wrong
result aborts the benchmark). Each way runs once untimed first (a warm-up,
also verified); ways whose warm-up took more than --slow-threshold seconds
get --slow-reps repetitions instead of --reps (the tables say how many).
The ways run interleaved, in a rotating order, so that drifting machine load
hits them alike.

The resource tracker is started before any Pool, so the workers share it
with the parent (otherwise every forked worker starts its own, which later
"cleans up" segments it does not own and floods stderr with warnings). Every
SharedMemory / SharedArray segment is unlinked; the program checks at the end
that none of the names it used is left in /dev/shm, and fails if one is.

Run: `make bench`, or `.venv/bin/python bench/bench_e2e.py [--quick]
[--methods fork,spawn] [--json build/bench_e2e.json]`.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
from machine import machine_info

import pyarraypool

try:
    import SharedArray as sa

    SA_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - any failure means "not available"
    sa = None
    SA_ERROR = (str(exc).splitlines() or [type(exc).__name__])[0]
    # `make bench` tries `pip install SharedArray` and keeps its output here.
    _log = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "build", "sharedarray-install.log"
    )
    try:
        with open(_log) as _f:
            _err = [ln.strip() for ln in _f if ln.lower().startswith("error")]
        if _err:
            SA_ERROR = f"pip install SharedArray: {_err[0]}"
    except OSError:
        pass

WORKERS = 2
S1_SHAPE = (100, 200, 500)
S2_TASKS = 200
S2_N = (1 << 20) // 8  # float64 elements in 1 MiB
S3_TASKS = 5000
S3_N = (1 << 10) // 8  # float64 elements in 1 KiB
TIMEOUT_S = 900.0  # a map that takes longer than this means a stuck worker
SA_PREFIX = f"e2e-bench-{os.getpid()}"

SCENARIOS: dict[str, dict[str, str]] = {
    "S1": {
        "title": "seed example: 100x200x500 float64 (80 MB), 100 tasks write a plane each",
        "short": "S1 seed example (80 MB, 100 tasks)",
    },
    "S2": {
        "title": "200 tasks each return a fresh 1 MiB float64 array",
        "short": "S2 200 x 1 MiB results",
    },
    "S3": {
        "title": "5,000 tasks each send a 1 KiB array and get a 1 KiB array back",
        "short": "S3 5,000 x 1 KiB round trips",
    },
}


class BenchmarkError(RuntimeError):
    pass


def pmap(pool: Any, fn: Callable[..., Any], items: list[Any], star: bool = False) -> list[Any]:
    """pool.map / pool.starmap (default chunks), with a timeout against a stuck worker."""
    job = pool.starmap_async(fn, items) if star else pool.map_async(fn, items)
    return job.get(TIMEOUT_S)  # type: ignore[no-any-return]


# ------------------------------------------------------------------ workers
# Module level, so that spawn and forkserver workers can unpickle them.


def warm_task(i: int) -> int:
    time.sleep(0.01)  # long enough that both workers take part
    return os.getpid()


def s1_pool_task(x: np.ndarray, i: int, value: float) -> None:
    x[i, :, :] = value  # the seed's task, unchanged


def s1_pickle_task(plane: np.ndarray, i: int, value: float) -> np.ndarray:
    plane[:, :] = value
    return plane


def s1_shm_task(name: str, shape: tuple[int, ...], dtype: str, i: int, value: float) -> None:
    seg = SharedMemory(name=name)
    try:
        x = np.ndarray(shape, dtype, buffer=seg.buf)
        x[i, :, :] = value
        del x
    finally:
        seg.close()


def s1_sa_task(name: str, i: int, value: float) -> None:
    x = sa.attach(name)
    x[i, :, :] = value
    del x


def s2_pool_task(i: int) -> np.ndarray:
    out = pyarraypool.empty((S2_N,), np.float64)
    out.fill(i + 1.0)
    return out


def s2_pickle_task(i: int) -> np.ndarray:
    out = np.empty((S2_N,), np.float64)
    out.fill(i + 1.0)
    return out


def s2_shm_task(i: int) -> str:
    seg = SharedMemory(create=True, size=S2_N * 8)
    x = np.ndarray((S2_N,), np.float64, buffer=seg.buf)
    x.fill(i + 1.0)
    del x
    seg.close()
    return seg.name


def s2_sa_task(token: str, i: int) -> str:
    name = f"shm://{token}-{i}"
    x = sa.create(name, (S2_N,), np.float64)
    x.fill(i + 1.0)
    del x
    return name


def s3_pool_task(x: np.ndarray) -> np.ndarray:
    return pyarraypool.make_transferable(x * 2.0 + 1.0)


def s3_pickle_task(x: np.ndarray) -> np.ndarray:
    return x * 2.0 + 1.0


def s3_shm_task(name: str) -> str:
    seg = SharedMemory(name=name)
    out = SharedMemory(create=True, size=S3_N * 8)
    x = np.ndarray((S3_N,), np.float64, buffer=seg.buf)
    y = np.ndarray((S3_N,), np.float64, buffer=out.buf)
    np.multiply(x, 2.0, out=y)
    y += 1.0
    del x, y
    seg.close()
    out.close()
    return out.name


# ------------------------------------------------------------------ parent side


def unlink_quietly(name: str) -> None:
    """Unlink a stdlib segment by name, after a failure (it may be gone already)."""
    try:
        seg = SharedMemory(name=name)
    except FileNotFoundError:
        return
    seg.close()
    seg.unlink()


class Stopwatch:
    """Accumulates the timed parts of one run."""

    def __init__(self) -> None:
        self.total = 0.0
        self._t0: float | None = None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        assert self._t0 is not None
        self.total += time.perf_counter() - self._t0
        self._t0 = None


class Data:
    """Inputs (made once per start method) and the names of every segment used."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.s1 = rng.random(S1_SHAPE)
        self.s1_expected = np.broadcast_to(
            np.arange(S1_SHAPE[0], dtype=np.float64)[:, None, None], S1_SHAPE
        )
        self.s3_in = [rng.random(S3_N) for _ in range(S3_TASKS)]
        self.s3_expected = [a * 2.0 + 1.0 for a in self.s3_in]
        self.names: set[str] = set()  # every /dev/shm name this program used
        self._seq = 0

    def token(self) -> str:
        self._seq += 1
        return f"{SA_PREFIX}-{self._seq}"

    def reset(self) -> None:
        # pickle's S1 writes the planes back into the input: make the next run
        # start from values that no plane should end with.
        self.s1.fill(-1.0)


def check(ok: bool, what: str) -> None:
    if not ok:
        raise BenchmarkError(f"wrong result: {what}")


def check_planes(x: np.ndarray, d: Data, way: str) -> None:
    check(
        x.shape == S1_SHAPE and np.array_equal(x, d.s1_expected),
        f"S1 {way}: the parent does not see every plane the workers wrote",
    )


def check_sums(sums: list[float], way: str) -> None:
    check(
        len(sums) == S2_TASKS and all(s == (i + 1.0) * S2_N for i, s in enumerate(sums)),
        f"S2 {way}: a result does not hold what its worker wrote",
    )


def check_s3(res: list[np.ndarray], d: Data, way: str) -> None:
    check(
        len(res) == S3_TASKS
        and all(np.array_equal(r, e) for r, e in zip(res, d.s3_expected, strict=True)),
        f"S3 {way}: a result is not 2 * x + 1 of its input",
    )


# S1 -------------------------------------------------------------------------


def s1_pyarraypool(pool: Any, d: Data, sw: Stopwatch) -> None:
    sw.start()
    x = pyarraypool.make_transferable(d.s1)
    pmap(pool, s1_pool_task, [(x, i, float(i)) for i in range(S1_SHAPE[0])], star=True)
    sw.stop()
    check(isinstance(x, pyarraypool.TransferableArray), "S1 pyarraypool: not a pool array")
    check_planes(x, d, "pyarraypool")
    sw.start()
    del x
    sw.stop()


def s1_pickle(pool: Any, d: Data, sw: Stopwatch) -> None:
    arr = d.s1
    sw.start()
    planes = pmap(
        pool, s1_pickle_task, [(arr[i], i, float(i)) for i in range(S1_SHAPE[0])], star=True
    )
    for i, plane in enumerate(planes):
        arr[i] = plane
    del planes
    sw.stop()
    check_planes(arr, d, "pickle")


def s1_shm(pool: Any, d: Data, sw: Stopwatch) -> None:
    arr = d.s1
    sw.start()
    seg = SharedMemory(create=True, size=arr.nbytes)
    d.names.add(seg.name)
    x: np.ndarray | None = None
    try:
        x = np.ndarray(arr.shape, arr.dtype, buffer=seg.buf)
        x[...] = arr
        pmap(
            pool,
            s1_shm_task,
            [(seg.name, arr.shape, arr.dtype.str, i, float(i)) for i in range(S1_SHAPE[0])],
            star=True,
        )
        sw.stop()
        check_planes(x, d, "SharedMemory")
        sw.start()
    finally:
        x = None
        seg.close()
        seg.unlink()
    sw.stop()


def s1_sa(pool: Any, d: Data, sw: Stopwatch) -> None:
    arr = d.s1
    token = d.token()
    name = f"shm://{token}"
    d.names.add(token)
    sw.start()
    x = sa.create(name, arr.shape, arr.dtype)
    try:
        x[...] = arr
        pmap(pool, s1_sa_task, [(name, i, float(i)) for i in range(S1_SHAPE[0])], star=True)
        sw.stop()
        check_planes(x, d, "SharedArray")
        sw.start()
    finally:
        sa.delete(name)
    del x
    sw.stop()


# S2 -------------------------------------------------------------------------


def s2_pyarraypool(pool: Any, d: Data, sw: Stopwatch) -> None:
    sw.start()
    res = pmap(pool, s2_pool_task, list(range(S2_TASKS)))
    sums = [float(r.sum()) for r in res]
    sw.stop()
    check(
        all(isinstance(r, pyarraypool.TransferableArray) for r in res),
        "S2 pyarraypool: a result is not a pool array",
    )
    check_sums(sums, "pyarraypool")
    sw.start()
    del res
    sw.stop()


def s2_pickle(pool: Any, d: Data, sw: Stopwatch) -> None:
    sw.start()
    res = pmap(pool, s2_pickle_task, list(range(S2_TASKS)))
    sums = [float(r.sum()) for r in res]
    sw.stop()
    check_sums(sums, "pickle")
    sw.start()
    del res
    sw.stop()


def s2_shm(pool: Any, d: Data, sw: Stopwatch) -> None:
    sw.start()
    names = pmap(pool, s2_shm_task, list(range(S2_TASKS)))
    sums = []
    done = 0
    try:
        for name in names:
            seg = SharedMemory(name=name)
            x = np.ndarray((S2_N,), np.float64, buffer=seg.buf)
            sums.append(float(x.sum()))
            del x
            seg.close()
            seg.unlink()
            done += 1
    finally:
        for name in names[done:]:  # only after a failure
            unlink_quietly(name)
    sw.stop()
    d.names.update(names)
    check_sums(sums, "SharedMemory")


def s2_sa(pool: Any, d: Data, sw: Stopwatch) -> None:
    token = d.token()
    d.names.update(f"{token}-{i}" for i in range(S2_TASKS))
    sw.start()
    names: list[str] = []
    sums: list[float] = []
    try:
        names = pmap(pool, s2_sa_task, [(token, i) for i in range(S2_TASKS)], star=True)
        for name in names:
            x = sa.attach(name)
            sums.append(float(x.sum()))
            del x
            sa.delete(name)
    finally:
        if len(names) != S2_TASKS or len(sums) != S2_TASKS:  # only after a failure
            for i in range(S2_TASKS):
                try:
                    sa.delete(f"shm://{token}-{i}")
                except OSError:
                    pass
    sw.stop()
    check_sums(sums, "SharedArray")


# S3 -------------------------------------------------------------------------


def s3_pyarraypool(pool: Any, d: Data, sw: Stopwatch) -> None:
    sw.start()
    ins = [pyarraypool.make_transferable(a) for a in d.s3_in]
    res = pmap(pool, s3_pool_task, ins)
    sw.stop()
    check(
        all(isinstance(r, pyarraypool.TransferableArray) for r in res),
        "S3 pyarraypool: a result is not a pool array",
    )
    check_s3(res, d, "pyarraypool")
    sw.start()
    del ins, res
    sw.stop()


def s3_pickle(pool: Any, d: Data, sw: Stopwatch) -> None:
    sw.start()
    res = pmap(pool, s3_pickle_task, d.s3_in)
    sw.stop()
    check_s3(res, d, "pickle")
    sw.start()
    del res
    sw.stop()


def s3_shm(pool: Any, d: Data, sw: Stopwatch) -> None:
    sw.start()
    segs: list[SharedMemory] = []
    names: list[str] = []
    res: list[np.ndarray] = []
    try:
        for a in d.s3_in:
            seg = SharedMemory(create=True, size=a.nbytes)
            segs.append(seg)
            np.ndarray(a.shape, a.dtype, buffer=seg.buf)[...] = a
        names = pmap(pool, s3_shm_task, [seg.name for seg in segs])
        for name in names:
            out = SharedMemory(name=name)
            res.append(np.ndarray((S3_N,), np.float64, buffer=out.buf).copy())
            out.close()
            out.unlink()
    finally:
        for seg in segs:
            seg.close()
            seg.unlink()
        for name in names[len(res) :]:  # only after a failure
            unlink_quietly(name)
    sw.stop()
    d.names.update(seg.name for seg in segs)
    d.names.update(names)
    check_s3(res, d, "SharedMemory")
    sw.start()
    del res
    sw.stop()


RUNS: dict[str, dict[str, Callable[[Any, Data, Stopwatch], None]]] = {
    "S1": {
        "pyarraypool": s1_pyarraypool,
        "pickle": s1_pickle,
        "SharedMemory": s1_shm,
        "SharedArray": s1_sa,
    },
    "S2": {
        "pyarraypool": s2_pyarraypool,
        "pickle": s2_pickle,
        "SharedMemory": s2_shm,
        "SharedArray": s2_sa,
    },
    "S3": {"pyarraypool": s3_pyarraypool, "pickle": s3_pickle, "SharedMemory": s3_shm},
}
WAYS = ["pyarraypool", "pickle", "SharedMemory", "SharedArray"]


def run_once(fn: Callable[[Any, Data, Stopwatch], None], pool: Any, d: Data) -> float:
    d.reset()
    gc.collect()
    sw = Stopwatch()
    fn(pool, d, sw)
    return sw.total


def run_scenario(pool: Any, d: Data, scen: str, args: argparse.Namespace) -> dict[str, Any]:
    ways = [w for w in WAYS if w in RUNS[scen] and (w != "SharedArray" or sa is not None)]
    want = {w: args.reps for w in ways}
    warm: dict[str, float] = {}
    for w in ways:
        warm[w] = run_once(RUNS[scen][w], pool, d)
        if warm[w] > args.slow_threshold:
            want[w] = min(args.reps, args.slow_reps)
    samples: dict[str, list[float]] = {w: [] for w in ways}
    for r in range(max(want.values())):
        k = r % len(ways)
        for w in ways[k:] + ways[:k]:
            if len(samples[w]) < want[w]:
                samples[w].append(run_once(RUNS[scen][w], pool, d))
    out: dict[str, dict[str, Any]] = {}
    for w in ways:
        out[w] = {
            "median_s": statistics.median(samples[w]),
            "min_s": min(samples[w]),
            "max_s": max(samples[w]),
            "reps": len(samples[w]),
            "samples_s": samples[w],
            "warmup_s": warm[w],
            "verified": True,  # every run was checked; a wrong result raises
        }
        print(
            f"  {scen} {w:>12}: median {fmt_s(out[w]['median_s']):>9} over {len(samples[w])} "
            f"(min {fmt_s(out[w]['min_s'])}, max {fmt_s(out[w]['max_s'])})",
            flush=True,
        )
    return out


def run_method(method: str, d: Data, args: argparse.Namespace) -> dict[str, Any]:
    ctx = multiprocessing.get_context(method)
    t0 = time.perf_counter()
    pool = ctx.Pool(WORKERS)
    try:
        pids = set(pool.map(warm_task, range(4 * WORKERS), chunksize=1))
        startup = time.perf_counter() - t0
        print(
            f"{method}: Pool({WORKERS}) up in {fmt_s(startup)} (not timed below), "
            f"{len(pids)} workers answered",
            flush=True,
        )
        res = {s: run_scenario(pool, d, s, args) for s in args.scenarios}
    finally:
        pool.close()
        pool.join()
    return {"pool_startup_s": startup, "scenarios": res}


def fmt_s(s: float) -> str:
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 0.01:
        return f"{s * 1e3:.0f} ms"
    return f"{s * 1e3:.2f} ms"


def markdown(doc: dict[str, Any]) -> str:
    """One table per start method: medians, and pyarraypool's speed-up over each peer."""
    lines = []
    for method, m in doc["methods"].items():
        ways = [w for w in WAYS if any(w in r for r in m["scenarios"].values())]
        peers = [w for w in ways if w != "pyarraypool"]
        lines.append(
            f"**{method}** (Pool({doc['workers']}) start-up {fmt_s(m['pool_startup_s'])}, "
            "not included)\n"
        )
        lines.append(
            "| scenario | "
            + " | ".join(ways)
            + " | "
            + " | ".join(f"{p} / pyarraypool" for p in peers)
            + " |"
        )
        lines.append("|---|" + "---:|" * (len(ways) + len(peers)))
        for scen, r in m["scenarios"].items():
            cells = []
            for w in ways:
                if w in r:
                    c = fmt_s(r[w]["median_s"])
                    if r[w]["reps"] != doc["reps"]:
                        c += f" ({r[w]['reps']} reps)"
                    cells.append(c)
                else:
                    cells.append("-")
            ratios = []
            for p in peers:
                if p in r and "pyarraypool" in r:
                    ratios.append(f"{r[p]['median_s'] / r['pyarraypool']['median_s']:.1f}x")
                else:
                    ratios.append("-")
            lines.append(f"| {SCENARIOS[scen]['short']} | " + " | ".join(cells + ratios) + " |")
        lines.append("")
    return "\n".join(lines)


def dev_shm_left(names: set[str]) -> list[str]:
    return sorted(n for n in names if os.path.exists(os.path.join("/dev/shm", n.lstrip("/"))))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 2 repetitions (1 for slow ways), noisy numbers",
    )
    ap.add_argument(
        "--methods",
        default="fork,spawn,forkserver",
        help="comma-separated start methods (default: fork,spawn,forkserver)",
    )
    ap.add_argument("--scenarios", default="S1,S2,S3", help="comma-separated (default: S1,S2,S3)")
    ap.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed repetitions per way (default 7; 2 with --quick)",
    )
    ap.add_argument(
        "--slow-reps",
        type=int,
        default=None,
        help="repetitions for ways whose warm-up run exceeds --slow-threshold (default 3; 1 with --quick)",
    )
    ap.add_argument("--slow-threshold", type=float, default=1.0, help="seconds (default 1.0)")
    ap.add_argument(
        "--json",
        metavar="PATH",
        default="build/bench_e2e.json",
        help="where to write the results (default build/bench_e2e.json)",
    )
    args = ap.parse_args()
    args.reps = args.reps or (2 if args.quick else 7)
    args.slow_reps = args.slow_reps or (1 if args.quick else 3)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.scenarios = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    for m in args.methods:
        if m not in multiprocessing.get_all_start_methods():
            ap.error(f"unknown start method {m!r}")
    for s in args.scenarios:
        if s not in RUNS:
            ap.error(f"unknown scenario {s!r}")

    # S3's SharedMemory way holds 5,000 segments (one fd each) open at once.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want_fds = 2 * S3_TASKS + 1024
    if soft != resource.RLIM_INFINITY and soft < want_fds:
        new = want_fds if hard == resource.RLIM_INFINITY else min(want_fds, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want_fds and "S3" in RUNS:
            RUNS["S3"].pop("SharedMemory")
            print(f"note: open-file limit {new} < {want_fds}: S3 runs without SharedMemory")

    # One resource tracker for the parent and every worker (see the docstring).
    resource_tracker.ensure_running()

    if sa is None:
        print(f"note: SharedArray is not available ({SA_ERROR}); running without it")
    used_before = pyarraypool.stats().used_bytes
    d = Data()
    doc: dict[str, Any] = {
        "benchmark": "bench_e2e",
        "description": "median wall time per scenario run through multiprocessing Pool(2)",
        "unit": "s",
        "quick": args.quick,
        "reps": args.reps,
        "slow_reps": args.slow_reps,
        "slow_threshold_s": args.slow_threshold,
        "warmup_runs": 1,
        "workers": WORKERS,
        "machine": machine_info(),
        "scenarios": {s: SCENARIOS[s] for s in args.scenarios},
        "ways": WAYS,
        "sharedarray": (
            {"available": True, "version": getattr(sa, "__version__", None)}
            if sa is not None
            else {"available": False, "error": SA_ERROR}
        ),
        "methods": {},
    }
    try:
        from importlib.metadata import version

        doc["sharedarray"]["version"] = version("SharedArray")
    except Exception:  # noqa: BLE001
        pass
    status = 0
    try:
        for method in args.methods:
            doc["methods"][method] = run_method(method, d, args)
    except BenchmarkError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        status = 1
    finally:
        left = dev_shm_left(d.names)
        for n in left:  # remove them, but still fail
            try:
                os.unlink(os.path.join("/dev/shm", n))
            except OSError:
                pass
    del d
    gc.collect()
    used_after = pyarraypool.stats().used_bytes
    doc["dev_shm_left"] = left
    doc["pool_used_bytes"] = {"before": used_before, "after": used_after}
    if left:
        print(
            f"FAILED: these segments were left in /dev/shm (now removed): {left[:10]}",
            file=sys.stderr,
        )
        status = 1
    if used_after != used_before:
        print(
            f"FAILED: the pool holds {used_after - used_before} more bytes than before",
            file=sys.stderr,
        )
        status = 1
    if status:
        return status
    print()
    if args.quick:
        print(f"--quick: {args.reps} repetitions ({args.slow_reps} for slow ways): noisy numbers\n")
    print(markdown(doc))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
