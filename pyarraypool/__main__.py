"""Command line: ``python -m pyarraypool {stats,clean}``.

``stats`` shows the pools of this user found in /dev/shm (or only
``--pool TOKEN``): a summary table with one row per pool, then for each pool
its memory, its blocks by size class, each attached process with what it
holds, and the pickles pending (made, not loaded yet) with their age.
``--json`` prints the same as a list with one object per pool: the fields of
:class:`pyarraypool.PoolStats` (``pool``, ``used_bytes``, ``capacity_bytes``,
``live_blocks``, ``pending_transfers``, ``processes``, ...) plus
``instance``, ``created``, ``size_classes``, ``holdings``, ``pending``,
``pending_bytes`` and ``oldest_pending_age``. ``--watch [SECONDS]`` redraws
every SECONDS (default 2) until Ctrl-C (into a file or a pipe: one plain
snapshot after another); with ``--json`` it prints one JSON line per refresh
instead.

``clean`` removes the segments of pools whose processes are all dead (left by
programs that were killed); ``--dry-run`` only lists them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import _api, _core

SHM_DIR = "/dev/shm"
_CONTROL = re.compile(r"^pyarraypool-([0-9a-f]{32})$")


def pool_tokens() -> list[str]:
    """Tokens of the pools of this user that have a control segment in /dev/shm."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    uid = os.geteuid()
    tokens = []
    for name in sorted(names):
        m = _CONTROL.match(name)
        if not m:
            continue
        try:
            if os.stat(os.path.join(SHM_DIR, name)).st_uid != uid:
                continue
        except OSError:
            continue  # removed meanwhile
        tokens.append(m.group(1))
    return tokens


def inspect(token: str) -> dict[str, Any] | None:
    """The detailed snapshot of the pool `token`, or None if it does not exist (any more)."""
    d = _core._inspect(token, True)
    if d is None:
        return None
    # _inspect attached as an observer (Pool::attach_observer): this process
    # is not among the pool's processes, pids or holdings.
    d.pop("transfer_timeout_ns", None)
    return d


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


_COLUMNS = (
    ("POOL", lambda d: d["pool"]),
    ("PROCS", lambda d: str(d["processes"])),
    ("USED", lambda d: human(d["used_bytes"])),
    ("FREE", lambda d: human(d["free_bytes"])),
    ("CAPACITY", lambda d: human(d["capacity_bytes"])),
    ("RESERVED", lambda d: human(d["reserved_bytes"])),
    ("RETURNED", lambda d: human(d["returned_bytes"])),
    ("MAX", lambda d: human(d["max_bytes"])),
    ("SEGMENTS", lambda d: str(d["segments"])),
    ("BLOCKS", lambda d: str(d["live_blocks"])),
    ("PENDING", lambda d: str(d["pending_transfers"])),
)


def grid(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Columns two spaces apart: the first left-aligned, the others right-aligned."""
    cells = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        cols = zip(r[1:], widths[1:], strict=True)
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in cols]
        lines.append(indent + "  ".join(parts).rstrip())
    return lines


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The summary: one row per pool."""
    header = [title for title, _ in _COLUMNS]
    return "\n".join(grid(header, [[get(d) for _, get in _COLUMNS] for d in rows]))


MAX_PENDING_ROWS = 20


def format_detail(d: dict[str, Any]) -> str:
    """One pool's sections: memory, size classes, processes, pending transfers."""
    created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(d["created"]))
    segs = d["segments"]
    lines = [
        f"Pool {d['pool']}",
        f"  instance {d['instance']}, created {created}, "
        f"transfer_timeout {seconds(d['transfer_timeout'])}",
        f"  memory: {human(d['used_bytes'])} used + {human(d['free_bytes'])} free = "
        f"{human(d['capacity_bytes'])} capacity in {plural(segs, 'segment')} "
        f"(max_bytes {human(d['max_bytes'])}); largest free block "
        f"{human(d['largest_free_block'])}",
        f"  /dev/shm: {human(d['reserved_bytes'])} reserved now, "
        f"{human(d['returned_bytes'])} given back so far (decay {seconds(d['decay'])})",
        "",
        "  Blocks by size class (headers included)",
    ]
    classes = d["size_classes"]
    if classes:
        lines += grid(
            ["SIZE CLASS", "USED BLOCKS", "USED", "FREE BLOCKS", "FREE"],
            [[f"{human(c['min_size'])} - {human(c['max_size'] + 1)}", str(c["used_blocks"]),
              human(c["used_bytes"]), str(c["free_blocks"]), human(c["free_bytes"])]
             for c in classes],
            indent="    ")
    else:
        lines.append("    (no segments)")
    lines += ["", "  Processes (a block held by several counts for each)"]
    holdings = d["holdings"]
    if holdings:
        lines += grid(
            ["PID", "BLOCKS", "HELD", "NOTE"],
            [[str(h["pid"]), str(h["blocks"]), human(h["bytes"]),
              "fork child being started" if h["reserved"] else ""] for h in holdings],
            indent="    ")
    else:
        lines.append("    (none attached)")
    pending = d["pending"]
    lines += ["", f"  Pending transfers: {plural(d['pending_transfers'], 'pickle')} made and not "
              f"loaded yet, on {plural(len(pending), 'block')} of {human(d['pending_bytes'])}"]
    if pending:
        lines += grid(
            ["BLOCK SIZE", "PICKLES", "AGE", "EXPIRES IN", "FROM PID"],
            [[human(t["block_size"]), str(t["pickles"]), seconds(t["age"]),
              seconds(t["expires_in"]), str(t["pid"]) if t["pid"] else "?"]
             for t in pending[:MAX_PENDING_ROWS]],
            indent="    ")
        if len(pending) > MAX_PENDING_ROWS:
            lines.append(f"    ... and {len(pending) - MAX_PENDING_ROWS} more (see --json)")
    return "\n".join(lines)


def gather(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """Snapshots of the pools asked for, and the warnings met on the way."""
    tokens = [args.pool] if args.pool is not None else pool_tokens()
    rows, problems = [], []
    for token in tokens:
        try:
            d = inspect(token)
        except _core.PoolError as e:
            problems.append(f"warning: cannot inspect pool {token}: {e}")
            continue
        if d is not None:
            rows.append(d)
    return rows, problems


def render(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return f"no pyarraypool pools in {SHM_DIR}"
    return "\n\n".join([format_table(rows)] + [format_detail(d) for d in rows])


def cmd_stats(args: argparse.Namespace) -> int:
    if args.pool is not None and not _CONTROL.match("pyarraypool-" + args.pool):
        print(f"error: {args.pool!r} is not a pool token (32 hex digits)", file=sys.stderr)
        return 2
    if args.watch is not None:
        # time.sleep() takes at most about 292 years; a day is plenty.
        if not 0 < args.watch <= 86_400:
            print("error: --watch takes a number of seconds above 0 and at most 86400",
                  file=sys.stderr)
            return 2
        return watch(args)
    rows, problems = gather(args)
    for p in problems:
        print(p, file=sys.stderr)
    if args.pool is not None and not rows:
        print(f"error: no pool {args.pool} in {SHM_DIR}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    else:
        print(render(rows))
    return 0


def watch(args: argparse.Namespace) -> int:
    """Redraws until Ctrl-C (SIGINT), which ends it with status 0.

    On a terminal each snapshot replaces the last; into a file or a pipe the
    snapshots follow one another, plain text, each after a blank line and
    starting with its timestamp line (escape codes would litter the file).
    """
    terminal = sys.stdout.isatty()
    try:
        while True:
            rows, problems = gather(args)
            if args.json:
                out = json.dumps(rows, sort_keys=True)
            else:
                now = time.strftime("%Y-%m-%d %H:%M:%S")
                body = render(rows)
                if args.pool is not None and not rows:
                    body = f"no pool {args.pool} in {SHM_DIR} (any more)"
                header = f"pyarraypool stats at {now}, every {args.watch:g} s"
                if terminal:
                    header = "\x1b[H\x1b[2J" + header + " (Ctrl-C to quit)"
                out = "\n".join([header, *problems, "", body]) + ("" if terminal else "\n")
            sys.stdout.write(out + "\n")
            sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def cmd_clean(args: argparse.Namespace) -> int:
    names = _core._clean(bool(args.dry_run))
    verb = "would remove" if args.dry_run else "removed"
    for name in names:
        print(f"{verb} {SHM_DIR}/{name}")
    if not names:
        print("nothing to clean: no segments of dead pyarraypool programs")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pyarraypool",
        description="Inspect and clean up pyarraypool shared-memory pools.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stats", help="show the pools of this user")
    p.add_argument("--pool", metavar="TOKEN", help="only the pool with this token")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                   help="redraw every SECONDS (default 2) until Ctrl-C")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("clean", help="remove segments left by dead programs")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")
    p.set_defaults(func=cmd_clean)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The commands read no setting: a PYARRAYPOOL_* variable that cannot be
    # read is only worth a warning here (the program it was meant for gets
    # a ValueError at its first use of the pool).
    for problem in _api.env_problems():
        print(f"warning: {problem}", file=sys.stderr)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
