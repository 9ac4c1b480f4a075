"""Draw the documentation's pictures into docs/images/ (run by `make diagrams`).

Every fact drawn here comes from the C++ core: the offsets of the control
segment (csrc/core/pool_internal.hpp, ControlHeader), the block header
(csrc/core/block_header.hpp), the handle (csrc/core/handle.hpp), the lock
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
        "allocate: set bit W",
        "{W}",
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
        "{W}",
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
        "clear bit W: still used, a pickle is pending",
        "{ }",
        1,
    )

    y -= 1.1
    step(y, 7)
    acts_on_block(
        R,
        y,
        "unpickle → _rebuild(handle, dtype):\nchecks pool id, generation, bounds",
        C_POOL,
        "set bit P and pending − 1 in one critical section",
        "{P}",
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
        "clear bit P: no holder, nothing pending",
        "{ }",
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
    W, H = 13.0, 8.6
    fig, ax = new_axes(W, H)
    heading(ax, H, "Control segment  /dev/shm/pyarraypool-<token>   (80 KiB, mode 0600)")
    # (label, byte offset, drawn width, color)
    parts = [
        (
            "header\nmagic, layout version,\npool id, instance id,\nprogram root (pid,\nstart time), settings,\nstate, needs_repair",
            "0",
            2.1,
            C_PARENT,
        ),
        ("lock word\n(own cache\nline)", "128", 1.1, C_WARN),
        (
            "process table\n128 slots × 32 B:\nid = pid<<2 | kind,\nstart time, reservation",
            "192",
            2.3,
            C_WORKER,
        ),
        (
            "segment table\ncount; size and name\nnonce of each of up to\n4096 data segments;\nretired epoch",
            "4288",
            2.5,
            C_POOL,
        ),
        (
            "allocator index (TLSF)\nfirst-level bitmap,\n40 second-level bitmaps,\n40 × 32 free-list heads",
            "69888",
            2.6,
            C_SHM,
        ),
        ("counters\ncapacity, used,\nlive blocks, pending,\nnext generation", "80296", 1.8, C_FREE),
    ]
    x, y0, h = 0.3, H - 2.55, 1.75
    for label, off, w, color in parts:
        box(ax, x, y0, w, h, label, color, size=8.2)
        ax.text(x + 0.03, y0 + h + 0.05, off, fontsize=7.5, color="#555555", va="bottom")
        x += w
    ax.text(
        x - 0.03, y0 + h + 0.05, "80384", fontsize=7.5, color="#555555", va="bottom", ha="right"
    )
    note(
        ax,
        0.3,
        y0 - 0.25,
        "Byte offsets from csrc/core/pool_internal.hpp (ControlHeader); not to scale. "
        "Everything from the allocator index down is read and written only under the lock.",
        size=8,
    )

    ys = H - 4.05
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
        "segment_bytes each (64 MiB by default; smaller when /dev/shm has no room for a whole "
        "one); an array larger than segment_bytes gets a segment of its own",
        fontsize=8.5,
        va="center",
    )
    hs = 0.75
    cells = [
        ("hdr", 0.55, C_WARN),
        ("payload (array A)", 3.0, C_SHM),
        ("hdr", 0.55, C_WARN),
        ("payload (B)", 1.4, C_SHM),
        ("hdr", 0.55, C_WARN),
        ("free block (on a TLSF free list)", 3.6, C_FREE),
        ("hdr", 0.55, C_WARN),
        ("payload", 1.45, C_SHM),
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
        ("0–7\nsize | used bit\n(commit word)", 1.8),
        ("8–15\nsize of the\nprevious block", 1.35),
        ("16–23\ngeneration\n(unique per\nallocation)", 1.45),
        ("24–39\nholders: 1 bit per process slot\n(free block: free-list links)", 2.65),
        ("40–43\npending\npickles", 1.0),
        ("44–47\nflags (low 8 bits);\nnewest pending\npickle's sender\npid (high 24)", 1.65),
        ("48–55\npending\ndeadline (ns)", 1.3),
        ("56–63\ncheck =\nhash(offset, gen)", 1.4),
    ]
    x = 0.3
    for label, w in fields:
        box(ax, x, yh, w, 1.1, label, C_WARN, size=8.2)
        x += w
    note(
        ax,
        0.3,
        yh - 0.12,
        "A used block stays used while holders ≠ 0 or pending > 0. The fields are changed only "
        "under the pool lock, except the size word, whose single stores are the allocator's commit points.",
        size=8,
    )
    save(fig, "segment_layout.png", out)


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
    node(y3, "set the contended bit, then\nfutex_wait(word, 10 ms)")
    exit_to_held(y3, "woken, word reads 0:\nCAS 0 → me | contended")
    down(y2 - bh / 2, y3 + bh / 2, "still taken")
    y4 = y3 - 1.2
    node(y4, "slept 10 ms, word unchanged:\nis the owner alive? (process table)", C_SHM, h=0.7)
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
        "rebuild the allocator index and counters from the\nsegments; clear dead slots' bits; free their slots",
        C_WARN,
        h=1.05,
    )
    down(y5 - 0.35, y6 + 0.525, "")
    exit_to_held(y6, "repaired", "lock held")

    xt = 8.95
    texts = [
        (
            "Liveness probe (process_table.cpp)",
            "The owner is dead when /proc/<pid> is gone, is a\nzombie, or has another start time than the one its\n"
            "slot recorded (the pid was reused by a newer process).",
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
        "A block's life: holders (one bit per process slot) and pending (pickles not yet loaded)",
    )
    ax.text(
        0.3,
        H - 0.7,
        "A used block stays used while holders ≠ ∅ or pending > 0; the operation that makes "
        "both false frees it in the same critical section.",
        fontsize=9,
        va="center",
    )

    sw, sh = 3.0, 0.95
    pos = {"free": (1.9, 6.2), "held": (6.5, 8.0), "both": (6.5, 4.4), "flight": (11.0, 6.2)}
    labels = {
        "free": ("free", "on a TLSF free list"),
        "held": ("held", "holders ≠ ∅, pending = 0"),
        "both": ("held and in flight", "holders ≠ ∅, pending > 0"),
        "flight": ("in flight only", "holders = ∅, pending > 0"),
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
        "allocate: empty, zeros,\nmake_transferable\n(the allocator's bit,\na new generation)",
    )
    # held -> free
    edge((hx - sw / 2, hy - 0.3), (fx + 0.6, fy + sh / 2))
    label(3.55, 6.95, "the last holder\nreleases or dies\n(pending = 0)", ha="left")
    # what keeps a block held
    label(
        hx,
        hy + 0.95,
        "another process loads a handle, or a fork child inherits: set its bit\n"
        "a process drops its last array while others remain: clear its bit\n"
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
        "a load sets the loader's bit\nand consumes the last\npending count; or the\n"
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
        "a process loads a handle:\nits bit set, pending − 1\n"
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
        "Dead processes. A process killed without leaving keeps its slot and its bits. The survivor "
        "that notices (after taking the lock from a dead owner,\nin collect(), stats(), or when the pool is out "
        "of room) clears every dead slot's bit in every block, drops expired pending counts, frees\nwhat is "
        "left unused and releases the dead slots. Dead means: the slot's pid is gone, is a zombie, or has "
        "another start time.",
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
    handle_format(args.out)
    futex_lock(args.out)
    refcount_states(args.out)


if __name__ == "__main__":
    main()
