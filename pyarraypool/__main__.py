"""Command line: ``python -m pyarraypool {stats,clean}``.

``stats`` shows the pools of this user found in /dev/shm (or only
``--pool TOKEN``) as a table, or as JSON with ``--json``: a list with one
object per pool holding ``pool``, ``used_bytes``, ``capacity_bytes``,
``live_blocks``, ``pending_transfers``, ``processes`` and the other fields of
:class:`pyarraypool.PoolStats`.

``clean`` removes the segments of pools whose processes are all dead (left by
programs that were killed); ``--dry-run`` only lists them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from . import _core

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
    """Statistics of the pool `token`, or None if it does not exist (any more)."""
    d = _core._inspect(token)
    if d is None:
        return None
    # Inspecting attaches this process for a moment: it is not one of the
    # program's processes.
    me = os.getpid()
    pids = [p for p in d.get("pids", []) if p != me]
    if len(pids) != len(d.get("pids", [])):
        d["processes"] = max(0, int(d["processes"]) - 1)
    d["pids"] = pids
    d.pop("transfer_timeout_ns", None)
    return d


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


_COLUMNS = (
    ("POOL", lambda d: d["pool"]),
    ("PROCS", lambda d: str(d["processes"])),
    ("USED", lambda d: human(d["used_bytes"])),
    ("CAPACITY", lambda d: human(d["capacity_bytes"])),
    ("MAX", lambda d: human(d["max_bytes"])),
    ("SEGMENTS", lambda d: str(d["segments"])),
    ("BLOCKS", lambda d: str(d["live_blocks"])),
    ("PENDING", lambda d: str(d["pending_transfers"])),
)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    cells = [[title for title, _ in _COLUMNS]]
    cells += [[get(d) for _, get in _COLUMNS] for d in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(_COLUMNS))]
    lines = []
    for r in cells:
        cols = zip(r[1:], widths[1:], strict=True)
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in cols]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace) -> int:
    if args.pool is not None:
        if not _CONTROL.match("pyarraypool-" + args.pool):
            print(f"error: {args.pool!r} is not a pool token (32 hex digits)", file=sys.stderr)
            return 2
        tokens = [args.pool]
    else:
        tokens = pool_tokens()
    rows = []
    for token in tokens:
        try:
            d = inspect(token)
        except _core.PoolError as e:
            print(f"warning: cannot inspect pool {token}: {e}", file=sys.stderr)
            continue
        if d is not None:
            rows.append(d)
    if args.pool is not None and not rows:
        print(f"error: no pool {args.pool} in {SHM_DIR}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    elif rows:
        print(format_table(rows))
    else:
        print(f"no pyarraypool pools in {SHM_DIR}")
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
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("clean", help="remove segments left by dead programs")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")
    p.set_defaults(func=cmd_clean)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
