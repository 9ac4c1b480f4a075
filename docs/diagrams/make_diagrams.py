"""Draw the documentation's pictures into docs/images/ (run by `make diagrams`).

Every fact drawn here comes from the C++ core: the offsets of the control
segment (csrc/core/pool_internal.hpp, ControlHeader), the block header
(csrc/core/block_header.hpp), the process slots (csrc/core/process_table.hpp),
liveness (csrc/core/liveness.hpp), hold lists (csrc/core/hold_list.hpp,
pool_holds.cpp), the handle (csrc/core/handle.hpp), the lock
(csrc/core/futex_lock.*) and the lifetime protocol (csrc/core/pool.hpp).
The PNGs are committed, so `make docs` never needs to draw them.

    python docs/diagrams/make_diagrams.py [--out DIR]
"""

# The pictures carry whole sentences of text: long lines are allowed here.
# ruff: noqa: E501

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "images"
DPI = 130

# One palette for every picture.
C_PARENT = "#dbe9f6"
C_POOL = "#e8e1f3"
C_WORKER = "#dff0d8"
C_SHM = "#fdf1d6"
C_FREE = "#eeeeee"
C_WARN = "#f8d7da"
C_EDGE = "#444444"
C_ARROW = "#1f3b73"


def new_axes(width: float, height: float) -> tuple[plt.Figure, plt.Axes]:
    """A figure whose data coordinates are inches, origin bottom left."""
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    return fig, ax


def box(ax, x, y, w, h, text="", color="white", size=9, weight="normal", rounded=False, **kw):
    """A rectangle with centred text; (x, y) is its bottom-left corner."""
    if rounded:
        patch = FancyBboxPatch(
            (x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec=C_EDGE, lw=1
        )
    else:
        patch = Rectangle((x, y), w, h, fc=color, ec=C_EDGE, lw=1)
    ax.add_patch(patch)
    if text:
        ax.text(
            x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, weight=weight, **kw
        )


def arrow(
    ax, x0, y0, x1, y1, text="", color=C_ARROW, style="-|>", ls="-", size=8.5, above=True, rad=0.0
):
    ax.add_patch(
        FancyArrowPatch(
            (x0, y0),
            (x1, y1),
            arrowstyle=style,
            mutation_scale=12,
            color=color,
            lw=1.3,
            ls=ls,
            connectionstyle=f"arc3,rad={rad}",
        )
    )
    if text:
        dy = 0.09 if above else -0.09
        ax.text(
            (x0 + x1) / 2,
            (y0 + y1) / 2 + dy,
            text,
            ha="center",
            va="bottom" if above else "top",
            fontsize=size,
            color=color,
        )


def heading(ax, height: float, text: str) -> None:
    """The picture's bold title line, at its top left."""
    ax.text(0.3, height - 0.35, text, fontsize=11, weight="bold", va="center")


def note(ax, x: float, y: float, text: str, size: float = 8.0, va: str = "top") -> None:
    """A grey explanatory sentence."""
    ax.text(x, y, text, fontsize=size, color="#333333", va=va)


def save(fig, name: str, out: Path) -> None:
    path = out / name
    fig.savefig(path, dpi=DPI, facecolor="white")
    plt.close(fig)
    print(f"wrote {path}")


# --- 1. a worker returns an array ------------------------------------------------


def lifetime_sequence(out: Path) -> None:
    W, H = 13.5, 11.2
    fig, ax = new_axes(W, H)
    lanes = {
        "parent": (1.55, "Parent process\n(main thread)", C_PARENT),
        "handler": (4.65, "Parent process\n(Pool's result-handler thread)", C_POOL),
        "worker": (7.75, "Worker process", C_WORKER),
        "block": (11.6, "Block header in /dev/shm", C_SHM),
    }
    top = H - 0.3
    for x, title, color in lanes.values():
        box(ax, x - 1.35, top - 0.7, 2.7, 0.7, title, color, size=9.5, weight="bold", rounded=True)
        ax.plot([x, x], [1.0, top - 0.7], color="#888888", ls="--", lw=1, zorder=0)

    P, R, Wk, B = (lanes[k][0] for k in ("parent", "handler", "worker", "block"))
    sw = 3.4  # width of a block-state box

    def state(y, op, holders, pending, color=C_SHM):
        """The block's header after operation `op`, on the block's lifeline."""
        box(ax, B - sw / 2, y - 0.36, sw, 0.72, "", color)
        ax.text(
            B, y + 0.15, op, ha="center", va="center", fontsize=8, style="italic", color=C_ARROW
        )
        ax.text(
            B,
            y - 0.17,
            f"holders = {holders}    pending = {pending}",
            ha="center",
            va="center",
            fontsize=8.8,
            weight="bold",
        )

    def act(x, y, text, color, w=2.9):
        box(ax, x - w / 2, y - 0.3, w, 0.6, text, color, size=8.4)
        return x + w / 2

    def acts_on_block(x, y, text, color, op, holders, pending, w=2.9):
        """An action on a lifeline, and the block header it leaves behind."""
        right = act(x, y, text, color, w=w)
        arrow(ax, right, y, B - sw / 2, y)
        state(y, op, holders, pending)

    def step(y, n):
        ax.text(0.1, y, f"{n}", ha="left", va="center", fontsize=10, weight="bold", color="#555555")

    y = top - 1.15
    step(y, 1)
    arrow(ax, P, y, Wk, y, "pool.apply_async(work, (i,)): the task is pickled and sent to a worker")

    y -= 0.95
    step(y, 2)
    acts_on_block(
        Wk,
        y,
        "out = pyarraypool.empty(shape)",
        C_WORKER,
        "allocate: W's hold list names it",
        "1 (W)",
        0,
    )

    y -= 0.95
    step(y, 3)
    act(Wk, y, "out[...] = result   (written in place)", C_WORKER)

    y -= 0.95
    step(y, 4)
    acts_on_block(
        Wk,
        y,
        "return out  →  pickled:\nout.__reduce__()",
        C_WORKER,
        "pending + 1, deadline = now + transfer_timeout",
        "1 (W)",
        1,
    )

    y -= 1.1
    step(y, 5)
    arrow(
        ax,
        Wk,
        y,
        R,
        y,
        "result pipe: (_rebuild, (handle, dtype))\n80 + 16·ndim bytes of handle, never the data",
    )

    y -= 0.95
    step(y, 6)
    acts_on_block(
        Wk,
        y,
        "the worker drops `out`\n(its _Block is deallocated)",
        C_WORKER,
        "W drops its hold: still used, a pickle is pending",
        "0",
        1,
    )

    y -= 1.1
    step(y, 7)
    acts_on_block(
        R,
        y,
        "unpickle → _rebuild(handle, dtype):\nchecks pool id, generation, bounds",
        C_POOL,
        "P's list names it; holders + 1, pending − 1 at once",
        "1 (P)",
        0,
        w=3.0,
    )

    y -= 1.1
    step(y, 8)
    arrow(ax, R, y, P, y, "result.get() returns a TransferableArray\non the same memory (no copy)")

    y -= 0.95
    step(y, 9)
    acts_on_block(
        P,
        y,
        "the parent drops its\nlast array on the block",
        C_PARENT,
        "P drops its hold: no holder, nothing pending",
        "0",
        0,
        w=2.6,
    )
    box(
        ax,
        B - sw / 2,
        y - 1.15,
        sw,
        0.5,
        "block freed (back to the allocator)",
        C_FREE,
        size=9,
        weight="bold",
    )
    arrow(ax, B, y - 0.36, B, y - 0.65)

    note(
        ax,
        0.1,
        0.15,
        "Steps 6 and 7 may happen in either order: the pending count, not the worker, keeps the block alive"
        " until the parent loads the handle.\nA pickle that is never loaded stops counting after"
        " transfer_timeout (300 s by default), and in any case when the program ends.",
        size=8.8,
        va="bottom",
    )
    save(fig, "lifetime_sequence.png", out)


# --- 2. segments -------------------------------------------------------------------


def segment_layout(out: Path) -> None:
    W, H = 13.0, 10.2
    fig, ax = new_axes(W, H)
    heading(
        ax,
        H,
        "Control segment  /dev/shm/pyarraypool-<token>   (17,117,184 bytes, sparse; mode 0600)",
    )
    # (label, byte offset, drawn width, color)
    parts = [
        (
            "header\nmagic, layout version 8,\npool id, instance id,\nprogram root (pid,\nstart time, pid ns), settings,\nstate, needs_repair,\ncheck key",
            "0",
            2.0,
            C_PARENT,
        ),
        ("lock word\n(own cache\nline)", "128", 1.05, C_WARN),
        (
            "process table\n4096 slots × 64 B:\nid = pid<<2 | kind,\nhold list ref + length,\ninline capacity, exiting,\nprogram",
            "192",
            2.45,
            C_WORKER,
        ),
        (
            "segment table\ncount; size and name\nnonce of each of up to\n4096 data segments;\nretired epoch",
            "262336",
            2.45,
            C_POOL,
        ),
        (
            "allocator index (TLSF)\nfirst-level bitmap,\n40 second-level bitmaps,\n40 × 32 free-list heads",
            "327936",
            2.5,
            C_SHM,
        ),
        (
            "counters\ncapacity, used,\nlive blocks, pending,\nnext generation,\nnext expiry, returned,\nrecent peak; decay,\ndecay due",
            "338344",
            1.85,
            C_FREE,
        ),
    ]
    x, y0, h = 0.3, H - 2.65, 1.85
    for label, off, w, color in parts:
        box(ax, x, y0, w, h, label, color, size=8.2)
        ax.text(x + 0.03, y0 + h + 0.05, off, fontsize=7.5, color="#555555", va="bottom")
        x += w
    ax.text(
        x - 0.03, y0 + h + 0.05, "338496", fontsize=7.5, color="#555555", va="bottom", ha="right"
    )

    # The slot pages after the header.
    yp = y0 - 1.25
    pages = [
        ("(padding to\na page)", "338496", 1.3, C_FREE),
        ("slot 0's page\n256 hold entries\n{block ref, generation}", "339968", 2.35, C_WORKER),
        ("slot 1's page\n256 hold entries", "344064", 2.0, C_WORKER),
        ("slot 2's page\n(never claimed:\nno memory)", "348160", 2.0, "white"),
        ("…", "", 1.2, "white"),
        ("slot 4095's page", "17113088", 2.0, "white"),
    ]
    x = 0.3
    for label, off, w, color in pages:
        box(ax, x, yp, w, 0.9, label, color, size=8.2)
        if off:
            ax.text(x + 0.03, yp + 0.95, off, fontsize=7.5, color="#555555", va="bottom")
        x += w
    ax.text(x - 0.03, yp + 0.95, "17117184", fontsize=7.5, color="#555555", va="bottom", ha="right")
    note(
        ax,
        0.3,
        yp - 0.12,
        "Byte offsets from csrc/core/pool_internal.hpp (ControlHeader, slot_page_offset); not to scale. "
        "Everything from the allocator index down, and the hold entries, are\nread and written only under the lock. "
        "Creation reserves the header's 83 pages (fallocate); a slot's 4 KiB page is reserved when a process "
        "first claims that slot,\nso a pool costs memory for the slots ever used. A list longer than 256 "
        "entries moves to a pool block (see the hold-list picture).",
        size=8,
    )

    ys = H - 5.65
    ax.text(
        0.3,
        ys + 0.55,
        "Data segment n  /dev/shm/pyarraypool-<token>-<n>-<random nonce>",
        fontsize=11,
        weight="bold",
        va="center",
    )
    ax.text(
        0.3,
        ys + 0.2,
        "segment_bytes each (64 MiB by default), sparse: a page is reserved when a block first "
        "covers it, and given back once free for `decay`; an array larger than segment_bytes "
        "gets a segment of its own",
        fontsize=8.5,
        va="center",
    )
    hs = 0.75
    cells = [
        ("hdr", 0.55, C_WARN),
        ("payload (array A)", 2.7, C_SHM),
        ("hdr", 0.55, C_WARN),
        ("payload (B)", 1.2, C_SHM),
        ("hdr", 0.55, C_WARN),
        ("free block (on a TLSF free list)", 3.1, C_FREE),
        ("hdr", 0.55, C_WARN),
        ("a hold list\n(kFlagHoldList)", 1.5, C_WORKER),
        ("hdr", 0.55, C_WARN),
        ("payload", 0.9, C_SHM),
    ]
    x = 0.3
    for label, w, color in cells:
        box(ax, x, ys - hs, w, hs, label, color, size=8.5)
        x += w
    ax.text(0.3, ys - hs - 0.1, "offset 0", fontsize=7.5, color="#555555", va="top")
    ax.text(x, ys - hs - 0.1, "segment size", fontsize=7.5, color="#555555", va="top", ha="right")
    note(
        ax,
        0.3,
        ys - hs - 0.38,
        "Blocks tile the segment: each is a 64-byte header and a payload, every size a "
        "multiple of 64, so every payload is 64-byte aligned.\nRecovery walks this chain by the size words "
        "alone and rebuilds the free lists.  A block is named by (segment << 48) | offset: no pointers "
        "in shared memory.",
        size=8,
    )

    # The header, enlarged.
    yh = 1.0
    ax.text(
        0.3,
        yh + 1.45,
        "hdr: the block header (64 bytes; csrc/core/block_header.hpp)",
        fontsize=11,
        weight="bold",
        va="center",
    )
    fields = [
        ("0–7\nsize | used bit\n(commit word)", 1.45),
        ("8–15\nsize of the\nprevious block", 1.25),
        ("16–23\ngeneration\n(unique per\nallocation)", 1.2),
        ("24–27\nholders:\nhow many slots\nhold it", 1.3),
        ("28–31\nlist_owner:\nhold list's\nslot + 1", 1.2),
        ("32–39\nunused", 0.85),
        ("40–43\npending\npickles", 0.95),
        (
            "44–47\nflags (low 8:\ntransfer_required,\nhold list); newest\npending sender\npid (high 24)",
            1.55,
        ),
        ("48–55\npending\ndeadline (ns)", 1.15),
        ("56–63\ncheck = keyed\nhash(offset,\ngen)", 1.2),
    ]
    x = 0.3
    for label, w in fields:
        box(ax, x, yh, w, 1.1, label, C_WARN, size=7.8)
        x += w
    ax.text(
        0.3 + 1.45 + 1.25 + 1.2 + 1.3 + 0.6,
        yh - 0.02,
        "free block: bytes 24–39 are its free-list links (next, prev); 16–23 and 56–63 the range of "
        "its pages that may be returned, 40–47 a seal, 48–55 since when it is free",
        fontsize=7.8,
        color="#555555",
        va="top",
        ha="center",
    )
    note(
        ax,
        0.3,
        yh - 0.3,
        "A used block stays used while holders > 0 or pending > 0. The fields are changed only "
        "under the pool lock, except the size word, whose single stores are the allocator's commit points.",
        size=8,
    )
    save(fig, "segment_layout.png", out)


# --- 2b. liveness ---------------------------------------------------------------------


def liveness_locks(out: Path) -> None:
    W, H = 13.0, 7.75
    fig, ax = new_axes(W, H)
    heading(
        ax,
        H,
        "Who is alive: an OFD write lock on one byte of the control file per slot (csrc/core/liveness.*)",
    )
    # The control file's first bytes, as lock ranges.
    yb, cw = H - 1.55, 0.95
    x0 = 3.2
    ax.text(
        0.3,
        yb + 0.22,
        "control file, byte\n(lock range = slot)",
        fontsize=8.5,
        va="center",
    )
    states = [
        ("0", C_WORKER),
        ("1", C_WORKER),
        ("2", C_WORKER),
        ("3", "white"),
        ("4", "white"),
        ("…", "white"),
        ("4095", "white"),
    ]
    for i, (label, color) in enumerate(states):
        box(ax, x0 + i * cw, yb, cw, 0.45, label, color, size=8.5)
    ax.text(
        x0 + 7 * cw + 0.2,
        yb + 0.22,
        "green: locked by a live process\nwhite: no lock (free or dead slot)",
        fontsize=8,
        va="center",
    )
    bx = {i: x0 + (i + 0.5) * cw for i in range(7)}

    # Processes, each with its descriptions of the control file; the locks
    # are drawn from the top of the process to its byte.
    def process(x, y, w, title, color, descs):
        hgt = 0.5 + 0.55 * len(descs)
        box(ax, x, y - hgt, w, hgt, "", color, rounded=True)
        ax.text(x + 0.12, y - 0.22, title, fontsize=9, weight="bold", va="center")
        for k, (text, dcolor) in enumerate(descs):
            dy = y - 0.55 - 0.55 * k
            box(ax, x + 0.15, dy - 0.4, w - 0.3, 0.45, text, dcolor, size=7.8)

    def lock(x, y, byte, label, ls="-"):
        arrow(ax, x, y, bx[byte], yb, ls=ls)
        ax.text(x + 0.08, y + 0.12, label, fontsize=8, color=C_ARROW, va="bottom")

    yp = yb - 1.15
    process(
        0.3,
        yp,
        3.3,
        "parent, slot 0",
        C_PARENT,
        [
            ("A: mapped (mmap), never locked", "white"),
            ("B (O_CLOEXEC): locks byte 0", C_WORKER),
            ("C: locks byte 1 for the child it forks", C_WORKER),
        ],
    )
    lock(1.4, yp, 0, "B")
    lock(3.0, yp, 1, "C", ls="--")
    process(
        3.9,
        yp,
        2.7,
        "fork child, slot 1",
        C_WORKER,
        [
            ("A: inherited with the mapping", "white"),
            ("C: inherited, now its own", C_WORKER),
        ],
    )
    lock(5.1, yp, 1, "C")
    process(
        6.9,
        yp,
        2.9,
        "worker (spawned), slot 2",
        C_WORKER,
        [
            ("its own mapped description", "white"),
            ("its own lock description", C_WORKER),
        ],
    )
    lock(8.2, yp, 2, "")
    process(
        10.1,
        yp,
        2.6,
        "killed, slot 3",
        C_WARN,
        [("its lock description:\nclosed by the kernel", "white")],
    )
    ax.plot([11.4, bx[3]], [yp, yb], color="#a33", ls=":", lw=1.3)
    ax.text(11.5, yp + 0.12, "lock gone", fontsize=8, color="#a33", va="bottom")

    # The rules.
    yt = H - 5.1
    rules = [
        (
            "Alive",
            "A slot's owner is alive exactly while its byte is locked. Any process asks with F_OFD_GETLK "
            "through its own description;\nthe kernel answers. No pid is looked up: pid namespaces and "
            "pid reuse do not enter into it. If the kernel cannot answer, the owner counts as alive.",
        ),
        (
            "Dead",
            "The kernel drops an OFD lock when the last descriptor of its description closes: at death "
            "(SIGKILL, os._exit, a crash)\nand at exec (O_CLOEXEC). The slot's id stays set, its byte "
            "unlocked: a survivor sees that and reclaims what the slot's hold list names.",
        ),
        (
            "Why B and not A",
            "A shared mapping keeps the description it was made from alive, in fork children too: a lock "
            "on A would outlive the process.\nSo A is only mapped and B is only locked; nothing locks "
            "through a description that was ever mapped.",
        ),
        (
            "fork",
            "Before the fork the parent opens C, locks the child's byte through it and copies its hold list "
            "to that slot. The child inherits\nA, B and C; inside fork() (pthread_atfork) it closes its "
            "copy of B and keeps C; the parent closes its copy of C. The reservation lives\nexactly as long "
            "as the child, and ends with its exec.",
        ),
    ]
    for title, body in rules:
        ax.text(0.3, yt, title, fontsize=9.5, weight="bold", va="top")
        ax.text(2.1, yt, body, fontsize=8.4, va="top")
        yt -= 0.2 + 0.19 * (body.count("\n") + 1)
    save(fig, "liveness_locks.png", out)


# --- 2c. hold lists --------------------------------------------------------------------


def hold_lists(out: Path) -> None:
    W, H = 13.0, 8.7
    fig, ax = new_axes(W, H)
    heading(
        ax,
        H,
        "What each process holds: hold lists in the slots, a holder count in each block (csrc/core/hold_list.hpp)",
    )
    # Slots (left).
    sx, sw, sh = 0.3, 3.3, 0.95
    slots = [
        ("slot 0  parent, pid 100", "holds_ref = nil (its page)\nholds_length = 3", C_PARENT),
        ("slot 1  worker, pid 107", "holds_ref = block L\nholds_length = 300", C_WORKER),
        ("slot 2  child of 100 (reserved)", "holds_ref = nil (its page)\nholds_length = 3", C_POOL),
    ]
    ytop = H - 1.2
    ax.text(sx, ytop + 0.15, "process table (64 B per slot)", fontsize=9.5, weight="bold")
    slot_y = []
    for i, (title, body, color) in enumerate(slots):
        y = ytop - (i + 1) * (sh + 0.9)
        box(ax, sx, y, sw, sh, "", color)
        ax.text(sx + 0.1, y + sh - 0.2, title, fontsize=8.6, weight="bold", va="center")
        ax.text(sx + 0.1, y + 0.33, body, fontsize=8.2, va="center")
        slot_y.append(y + sh / 2)

    # Lists (middle): two slot pages and one list block.
    lx, lw, eh = 4.5, 3.3, 0.34

    def entries(y, title, rows, color):
        ax.text(lx, y + 0.12, title, fontsize=8.6, weight="bold", va="bottom")
        ends = []
        for k, text in enumerate(rows):
            ey = y - (k + 1) * eh
            box(ax, lx, ey, lw, eh, text, color if text != "nil (dropped)" else C_FREE, size=8)
            ends.append((lx + lw, ey + eh / 2))
        return ends

    ya = slot_y[0] + 0.5
    e0 = entries(
        ya,
        "slot 0's page (256 entries)",
        ["[0] A, generation 7", "[1] nil (dropped)", "[2] B, generation 9"],
        C_PARENT,
    )
    yl = slot_y[1] + 0.5
    e1 = entries(
        yl,
        "block L: kFlagHoldList, list_owner = 2 (≥ 512 entries)",
        ["[0] A, generation 7", "[1] C, generation 12", "… [299]"],
        C_WORKER,
    )
    yc = slot_y[2] + 0.5
    e2 = entries(
        yc,
        "slot 2's page: the parent's copy",
        ["[0] A, generation 7", "[1] nil (dropped)", "[2] B, generation 9"],
        C_POOL,
    )
    for i, first in enumerate([ya, yl, yc]):
        arrow(ax, sx + sw, slot_y[i], lx, first - eh / 2, rad=0.0)

    # Blocks (right).
    bxx, bw, bh = 9.3, 3.3, 0.75
    blocks = {
        "A": ("block A  (generation 7)", "holders = 3   (slots 0, 1, 2)", H - 2.4),
        "B": ("block B  (generation 9)", "holders = 2   (slots 0, 2)", H - 4.4),
        "C": ("block C  (generation 12)", "holders = 1   (slot 1)", H - 6.4),
    }
    ax.text(bxx, H - 1.05, "array blocks (headers)", fontsize=9.5, weight="bold")
    bpos = {}
    for k, (title, body, y) in blocks.items():
        box(ax, bxx, y, bw, bh, "", C_SHM)
        ax.text(
            bxx + bw / 2, y + 0.52, title, fontsize=8.6, weight="bold", ha="center", va="center"
        )
        ax.text(bxx + bw / 2, y + 0.2, body, fontsize=8.4, ha="center", va="center")
        bpos[k] = (bxx, y + bh / 2)

    def link(p, k, color=C_ARROW):
        arrow(ax, p[0], p[1], bpos[k][0], bpos[k][1], color=color)

    link(e0[0], "A")
    link(e0[2], "B")
    link(e1[0], "A", "#2b6e2b")
    link(e1[1], "C", "#2b6e2b")
    link(e2[0], "A", "#6a3d9a")
    link(e2[2], "B", "#6a3d9a")

    note(
        ax,
        0.3,
        1.2,
        "A process names a block in its list once, however many arrays it has on it, in the same critical "
        "section that changes the block's count. A dropped hold leaves a nil entry,\n"
        "reused by the next hold. A list starts in the slot's own 4 KiB page (256 entries of 16 B); once that is "
        "full it moves to a pool block (kFlagHoldList) that doubles as\nneeded, switched by one store of "
        "holds_ref; when the process holds nothing it goes back to the page. The counts are derived: repair "
        "recounts every block from\nthe live slots' lists, and a dead slot's list says what to take back. Every "
        "entry is checked against its block (segment, offset, used, generation) before it is\nbelieved. A fork "
        "child's list starts as a copy of its parent's, at the same positions.",
        size=8.4,
    )
    save(fig, "hold_lists.png", out)


# --- 3. the handle ------------------------------------------------------------------


def handle_format(out: Path) -> None:
    W, H = 12.5, 8.6
    fig, ax = new_axes(W, H)
    heading(ax, H, "Handle (format 2): 80 + 16 × ndim bytes, little-endian (csrc/core/handle.hpp)")
    unit = 0.75  # inches per byte column
    x0, row_h = 1.0, 0.55
    ytop = H - 1.1
    for i in range(8):
        ax.text(
            x0 + (i + 0.5) * unit,
            ytop + 0.08,
            f"+{i}",
            ha="center",
            va="bottom",
            fontsize=8,
            color="#555555",
        )

    rows = [
        (
            "0",
            [
                ("magic 'PAPH'", 4, C_PARENT),
                ("version\n= 2", 1, C_PARENT),
                ("flags", 1, C_PARENT),
                ("ndim", 1, C_PARENT),
                ("0", 1, C_FREE),
            ],
        ),
        ("8", [("pool id: bytes 0–7 of the 128-bit pool token", 8, C_POOL)]),
        ("16", [("pool id: bytes 8–15", 8, C_POOL)]),
        (
            "24",
            [
                ("block ref: offset in segment (low 48 bits)", 6, C_SHM),
                ("segment\n(top 16 bits)", 2, C_SHM),
            ],
        ),
        ("32", [("generation of the block (u64)", 8, C_WARN)]),
        ("40", [("byte offset of the view in the block's payload (u64)", 8, C_WORKER)]),
        ("48", [("itemsize (u64)", 8, C_WORKER)]),
        ("56", [("reserved = 0", 8, C_FREE)]),
        ("64", [("pool instance id: bytes 0–7 (random, drawn when the pool was made)", 8, C_POOL)]),
        ("72", [("pool instance id: bytes 8–15", 8, C_POOL)]),
        ("80", [("shape[0] … shape[ndim−1]   (i64 each)", 8, C_WORKER)]),
        (
            "80 + 8·ndim",
            [("strides[0] … strides[ndim−1]   (i64 each, bytes, may be negative)", 8, C_WORKER)],
        ),
    ]
    y = ytop
    for off, cells in rows:
        y -= row_h
        ax.text(
            x0 - 0.1, y + row_h / 2, off, ha="right", va="center", fontsize=8.5, color="#555555"
        )
        x = x0
        for label, nbytes, color in cells:
            box(ax, x, y, nbytes * unit, row_h, label, color, size=8.2)
            x += nbytes * unit
    ax.text(
        x0 + 4.5 * unit,
        y - 0.15,
        "flags bit 0: transfer_required;  bit 1: read-only (the view loads read-only)",
        fontsize=8,
        va="top",
        ha="center",
        color="#333333",
    )

    xr = x0 + 8 * unit + 0.45
    notes = (
        "A pickle of a pool array is\n"
        "    (pyarraypool._core._rebuild, (handle, dtype))\n"
        "the dtype travelling beside it: its .str for a plain\n"
        "built-in dtype ('<f8'), else the dtype object (fields,\n"
        "metadata, user-defined dtypes such as bfloat16).\n\n"
        "Loading checks, before any array exists:\n"
        "  1. magic, version, flags, reserved bytes, ndim ≤ 64,\n"
        "     length = 80 + 16·ndim, shape ≥ 0, no overflow\n"
        "                                → InvalidHandleError\n"
        "  2. pool id and instance id = this process's pool\n"
        "     (a pool made again under the same name has\n"
        "     another instance)             → StaleHandleError\n"
        "  3. the segment exists and the header lies inside it\n"
        "                                → Stale/InvalidHandleError\n"
        "  4. the block is used, with this generation and its\n"
        "     check word                    → StaleHandleError\n"
        "  5. every byte the view can reach lies inside the\n"
        "     block's payload              → InvalidHandleError\n\n"
        "A freed and reused block has a new generation, so\n"
        "an old handle never shows another array's bytes."
    )
    ax.text(xr, ytop, notes, fontsize=8.4, va="top", ha="left", family="monospace")
    save(fig, "handle_format.png", out)


# --- 4. the lock -------------------------------------------------------------------


def futex_lock(out: Path) -> None:
    W, H = 13.0, 8.9
    fig, ax = new_axes(W, H)
    heading(ax, H, "The pool lock: one 32-bit word in the control segment (csrc/core/futex_lock.*)")
    yw = H - 1.25
    box(ax, 0.6, yw, 0.9, 0.55, "bit 31\ncontended", C_WARN, size=8.2)
    box(
        ax,
        1.5,
        yw,
        4.6,
        0.55,
        "bits 0–30: owner = process slot + 1   (0: free)",
        C_PARENT,
        size=8.5,
    )
    ax.text(
        6.35,
        yw + 0.27,
        "A shared futex (not FUTEX_PRIVATE): the waiters are other processes.\n"
        "The word names its owner, so a waiter can ask whether the owner is still alive.",
        fontsize=8.5,
        va="center",
    )

    cx, bw, bh = 2.95, 3.9, 0.62  # the acquire path, top to bottom
    held_x, held_w = 7.05, 1.55  # the "lock held" exits on the right

    def node(y, text, color=C_WORKER, h=bh):
        box(ax, cx - bw / 2, y - h / 2, bw, h, text, color, size=8.4, rounded=True)

    def exit_to_held(y, text, result="lock held"):
        arrow(ax, cx + bw / 2, y, held_x, y, text, size=8)
        box(
            ax,
            held_x,
            y - 0.27,
            held_w,
            0.54,
            result,
            C_POOL,
            size=8.4,
            weight="bold",
            rounded=True,
        )

    def down(y0, y1, text):
        arrow(ax, cx, y0, cx, y1)
        ax.text(cx + 0.08, (y0 + y1) / 2, text, fontsize=8, color=C_ARROW, va="center")

    y1 = yw - 0.75
    node(y1, "CAS 0 → me", C_PARENT)
    exit_to_held(y1, "succeeded")
    y2 = y1 - 1.05
    node(
        y2, "spin: 12 rounds, back-off 1, 2, 4 … 256 pauses;\nCAS 0 → me whenever the word reads 0"
    )
    exit_to_held(y2, "a CAS succeeded")
    down(y1 - bh / 2, y2 + bh / 2, "failed")
    y3 = y2 - 1.15
    node(
        y3,
        "set the contended bit, then futex_wait until\nthe slice's deadline (10 ms, CLOCK_MONOTONIC)",
    )
    exit_to_held(y3, "woken, word reads 0:\nCAS 0 → me | contended")
    down(y2 - bh / 2, y3 + bh / 2, "still taken")
    y4 = y3 - 1.2
    node(
        y4,
        "a whole slice, word unchanged: is the owner\nalive? (F_OFD_GETLK on its slot's byte)",
        C_SHM,
        h=0.7,
    )
    down(y3 - bh / 2, y4 + 0.35, "timed out")
    # alive: back to waiting
    lx = cx - bw / 2 - 0.3
    ax.plot([cx - bw / 2, lx, lx], [y4, y4, y3], color=C_ARROW, lw=1.3)
    arrow(ax, lx, y3, cx - bw / 2, y3)
    ax.text(
        lx - 0.07,
        (y3 + y4) / 2,
        "alive:\nwait\nagain",
        fontsize=8,
        color=C_ARROW,
        va="center",
        ha="right",
    )
    y5 = y4 - 1.25
    node(
        y5, "dead: CAS word (unchanged) → me | contended\n= Acquired::kFromDeadOwner", C_WARN, h=0.7
    )
    down(y4 - 0.35, y5 + 0.35, "dead")
    y6 = y5 - 1.3
    node(
        y6,
        "repair (needs_repair is set first, so a repair\ncut short is redone by the next owner):\n"
        "rebuild the allocator index and counters from the\nsegments; recount holders from the live hold lists;\nfree what dead slots alone held, and their slots",
        C_WARN,
        h=1.05,
    )
    down(y5 - 0.35, y6 + 0.525, "")
    exit_to_held(y6, "repaired", "lock held")

    xt = 8.95
    texts = [
        (
            "Liveness probe (liveness.cpp)",
            "The owner is alive while the kernel holds its lock\non its slot's byte of the control file; it drops it\n"
            "when the process dies or execs. No pid is looked up.",
        ),
        (
            "The deadline",
            "A slice ends at a CLOCK_MONOTONIC deadline that\nwake-ups and EINTR do not move: a signal every\n"
            "millisecond cannot put off the probe for ever.",
        ),
        (
            "Unlock",
            "Exchange the word with 0; if the contended bit was\nset, futex_wake one waiter.",
        ),
        (
            "Critical sections",
            "A few hundred nanoseconds: most waits end in the\nspin, without a system call. The lock is never held\n"
            "while calling into Python or copying array data.",
        ),
        (
            "The GIL",
            "Each operation first tries the lock once with the GIL\nheld and no system call; only if that fails does it\n"
            "release the GIL and wait as drawn here.",
        ),
    ]
    y = y1 + 0.3
    for title, body in texts:
        ax.text(xt, y, title, fontsize=9.5, weight="bold", va="top")
        ax.text(xt, y - 0.25, body, fontsize=8.4, va="top")
        y -= 0.35 + 0.19 * (body.count("\n") + 1) + 0.45
    save(fig, "futex_lock.png", out)


# --- 5. the refcount protocol ----------------------------------------------------------


def refcount_states(out: Path) -> None:
    W, H = 13.0, 10.4
    fig, ax = new_axes(W, H)
    heading(
        ax,
        H,
        "A block's life: holders (how many process slots hold it) and pending (pickles not yet loaded)",
    )
    ax.text(
        0.3,
        H - 0.7,
        "A used block stays used while holders > 0 or pending > 0; the operation that makes "
        "both zero frees it in the same critical section.",
        fontsize=9,
        va="center",
    )

    sw, sh = 3.0, 0.95
    pos = {"free": (1.9, 6.2), "held": (6.5, 8.0), "both": (6.5, 4.4), "flight": (11.0, 6.2)}
    labels = {
        "free": ("free", "on a TLSF free list"),
        "held": ("held", "holders > 0, pending = 0"),
        "both": ("held and in flight", "holders > 0, pending > 0"),
        "flight": ("in flight only", "holders = 0, pending > 0"),
    }
    colors = {"free": C_FREE, "held": C_WORKER, "both": C_POOL, "flight": C_SHM}
    for k, (x, y) in pos.items():
        title, sub = labels[k]
        box(ax, x - sw / 2, y - sh / 2, sw, sh, "", colors[k], rounded=True)
        ax.text(x, y + 0.14, title, ha="center", va="center", fontsize=10.5, weight="bold")
        ax.text(x, y - 0.2, sub, ha="center", va="center", fontsize=8.5)

    def edge(p0, p1, rad=0.0, color=C_ARROW):
        arrow(ax, p0[0], p0[1], p1[0], p1[1], rad=rad, color=color)

    def label(x, y, text, color=C_ARROW, ha="center"):
        ax.text(x, y, text, fontsize=8.2, color=color, ha=ha, va="center")

    (fx, fy), (hx, hy), (bx, by), (tx, ty) = pos["free"], pos["held"], pos["both"], pos["flight"]
    # free -> held
    edge((fx - 0.4, fy + sh / 2), (hx - sw / 2, hy + 0.15), rad=-0.3)
    label(
        1.75,
        7.85,
        "allocate: empty, zeros,\nmake_transferable\n(holders = 1, the allocator's;\na new generation)",
    )
    # held -> free
    edge((hx - sw / 2, hy - 0.3), (fx + 0.6, fy + sh / 2))
    label(3.55, 6.95, "the last holder\nreleases or dies\n(pending = 0)", ha="left")
    # what keeps a block held
    label(
        hx,
        hy + 0.95,
        "another process loads a handle, or a fork child inherits: holders + 1, named in its hold list\n"
        "a process drops its last array while others remain: holders − 1, its entry cleared\n"
        "pickling with transfer_required=False: nothing changes",
    )
    # held -> both
    edge((hx - 0.5, hy - sh / 2), (bx - 0.5, by + sh / 2))
    label(
        hx - 0.6,
        6.2,
        "pickling (__reduce__)\nwith transfer_required=True:\npending + 1, deadline =\n"
        "now + transfer_timeout",
        ha="right",
    )
    # both -> held
    edge((bx + 0.5, by + sh / 2), (hx + 0.5, hy - sh / 2))
    label(
        hx + 0.6,
        6.2,
        "a load adds the loader's\nhold and consumes the last\npending count; or the\n"
        "pending count expires",
        ha="left",
    )
    # both -> flight
    edge((bx + sw / 2, by), (tx - 0.3, ty - sh / 2), rad=0.25)
    label(9.0, 5.3, "every holder drops\nits arrays")
    # flight -> held
    edge((tx - 0.3, ty + sh / 2), (hx + sw / 2, hy), rad=0.25)
    label(
        10.85,
        7.85,
        "a process loads a handle:\nholders + 1, pending − 1\n"
        "(held and in flight while\npending stays > 0)",
    )
    # flight -> free, under everything
    edge((tx + 0.7, ty - sh / 2), (fx - 0.4, fy - sh / 2), rad=-0.5, color="#a33")
    label(
        6.5,
        2.85,
        "pending expired (the deadline passed; found by the next maintenance), or the program ends",
        color="#a33",
    )

    note(
        ax,
        0.3,
        2.2,
        "Dead processes. A process that is gone keeps its slot and its hold list (every process leaves them so at exit). The survivor that notices (after\n"
        "taking the lock from a dead owner, in collect(), stats(), when the pool is out of room, or taking a dead slot over) recounts every block's holders\n"
        "from the live slots' lists, drops expired pending counts, frees what is left unused and releases the dead slots. Dead means: the kernel no\n"
        "longer holds the slot's lock on its byte of the control file.",
        size=8.4,
    )
    note(
        ax,
        0.3,
        1.0,
        "Loading a handle whose block was freed (or freed and reused: a new generation) raises "
        "StaleHandleError. Pending counts are per block:\nloading one pickle twice consumes two counts.",
        size=8.4,
    )
    save(fig, "refcount_states.png", out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=OUT, help="directory for the PNGs (default docs/images)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lifetime_sequence(args.out)
    segment_layout(args.out)
    liveness_locks(args.out)
    hold_lists(args.out)
    handle_format(args.out)
    futex_lock(args.out)
    refcount_states(args.out)


if __name__ == "__main__":
    main()
