"""The pool against a model (issue "3 of 5 - Hardening").

A hypothesis RuleBasedStateMachine drives the real pool of the pytest process
and two long-lived helper processes (multiprocessing "fork", talking over
Pipes) through allocations, frees, views, pickles (transfers), loads, helper
holds and drops, helper deaths (SIGKILL or a clean exit) and collect(), and
after every step checks the pool against a plain Python model:

- accounting: stats() live_blocks, used_bytes, pending_transfers and
  pending_blocks move from the baseline by exactly the model's sums;
- every block an array here or in a helper lives on: used, check_ok, the same
  (segment, offset, generation) as when it was allocated, size and capacity,
  the transfer_required flag, `pending` equal to the model's count and
  `holders` equal to the model's bitmask (this process's slot iff an array
  here lives on it; a helper's slot iff that live helper holds it, by a load
  or by inheriting it at its fork);
- layout: payloads 64-byte aligned, blocks 64-byte multiples, no two live
  blocks of a segment overlap, capacity >= the request;
- contents: every array, here and in the helpers, still shows its own bytes;
- handles: a pickle of a block the model says is freed raises
  StaleHandleError, here and in a helper, and never yields an array;
- generations: every allocation gets a generation larger than every one seen
  before (so a reused (segment, offset) gets a new one), except a block this
  process takes back from its local cache of blocks that never left it
  (never pickled, not held at a fork): it keeps its generation, since no
  handle of it can exist. The model knows exactly which blocks qualify;
- `_core._verify()` passes.

Only test hooks of the binding are used (`_test_block_info`, `_block_of`,
`_verify`); nothing in the allocator knows it is being tested.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
import pickle
import signal
import traceback
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import pyarraypool
from pyarraypool import _core

HEADER = 64
ALIGN = 64
FLAG_TRANSFER_REQUIRED = 1
MAX_REQUEST = 256 * 1024
N_HELPERS = 2
REPLY_TIMEOUT = 30.0

CTX = multiprocessing.get_context("fork")
IDS = itertools.count(1)  # keys of local arrays and of helper-held arrays
SEEDS = itertools.count(1)  # one content pattern per allocation

SIZES = st.one_of(
    st.integers(0, 512),
    st.integers(0, MAX_REQUEST),
    # edges: empty, one byte, around the 64-byte granule, the local cache's
    # largest block (64 KiB payload), the largest request
    st.sampled_from([0, 1, 63, 64, 65, 4032, 4096, 65472, 65536, 65537, MAX_REQUEST]),
)
HOW = st.sampled_from(["empty", "zeros", "make_transferable"])


def pattern(n: int, seed: int) -> np.ndarray:
    """The bytes allocation `seed` is filled with (a plain, private array)."""
    return np.frombuffer(np.random.default_rng(seed).bytes(n), dtype=np.uint8).copy()


def byte_extent(arr: np.ndarray) -> tuple[int, int]:
    """[lo, hi) addresses of the bytes an array can reach."""
    lo = hi = arr.__array_interface__["data"][0]
    if arr.size == 0:
        return lo, lo
    for n, s in zip(arr.shape, arr.strides, strict=True):
        if s < 0:
            lo += (n - 1) * s
        else:
            hi += (n - 1) * s
    return lo, hi + arr.itemsize


def describe(arr: Any) -> dict[str, Any]:
    """What the pool says about the block of a pool array, and where the
    array's bytes are (runs here and in the helpers)."""
    info = dict(_core._test_block_info(arr))
    blk = _core._block_of(arr)
    info["is_transferable"] = type(arr) is pyarraypool.TransferableArray
    info["address"] = blk.address
    info["block_ref"] = (blk.segment, blk.offset, blk.generation, blk.capacity)
    info["extent"] = byte_extent(arr)
    info["shape"] = arr.shape
    info["strides"] = arr.strides
    return info


# --- the helper processes ----------------------------------------------------


def helper_main(conn) -> None:
    """A forked helper: it holds every block its parent held at the fork (the
    inherited arrays stay referenced by the parent's frames copied into it)
    plus the handles it loads, until it drops them or dies."""
    probe = pyarraypool.empty(1, dtype=np.uint8, transfer_required=False)
    slot = _core._test_block_info(probe)["my_slot"]
    del probe
    pyarraypool.collect()  # empties this process's local cache: the probe is freed
    conn.send((os.getpid(), slot))
    held: dict[int, Any] = {}
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        op = msg[0]
        try:
            if op == "load":
                _, hkey, data = msg
                arr = pickle.loads(data)
                held[hkey] = arr
                reply: tuple = ("ok", describe(arr), zlib.crc32(arr.tobytes()))
                del arr
            elif op == "drop":
                del held[msg[1]]
                reply = ("ok",)
            elif op == "pickle":
                reply = ("ok", pickle.dumps(held[msg[1]]))
            elif op == "alloc":
                _, hkey, n, seed, tr, keep = msg
                arr = pyarraypool.empty(n, dtype=np.uint8, transfer_required=tr)
                arr[...] = pattern(n, seed)
                data = pickle.dumps(arr)
                reply = ("ok", data, describe(arr))
                if keep:
                    held[hkey] = arr
                del arr
            elif op == "describe":
                reply = ("ok", {k: (describe(a), zlib.crc32(a.tobytes())) for k, a in held.items()})
            elif op == "reset":
                held.clear()
                reply = ("ok",)
            elif op == "exit":
                held.clear()
                conn.send(("ok",))
                return
            else:
                reply = ("error", f"unknown op {op!r}")
        except pyarraypool.StaleHandleError as e:
            reply = ("stale", str(e))
        except BaseException as e:  # reported to the parent, which fails the step
            reply = ("error", repr(e))
        conn.send(reply)


# --- the model ----------------------------------------------------------------


@dataclass(eq=False)
class MBlock:
    """One allocation, as the model sees it."""

    seg: int
    off: int
    gen: int
    size: int  # whole block, header included
    capacity: int
    requested: int
    tr: bool
    expected: np.ndarray = field(repr=False)  # the bytes it was filled with
    pending: int = 0
    alive: bool = True
    # Known to another process: pickled, or held here when a helper forked.
    # A block freed unshared may come back from this process's local cache.
    shared: bool = False

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.seg, self.off, self.gen)


@dataclass(eq=False)
class Helper:
    proc: Any
    conn: Any
    pid: int
    slot: int
    inherited: set = field(default_factory=set)  # MBlocks held since the fork
    held: dict = field(default_factory=dict)  # hkey -> (MBlock, expected view, crc)

    def holds(self, b: MBlock) -> bool:
        return b in self.inherited or any(v[0] is b for v in self.held.values())


def step(fn):
    """Wraps a rule or the invariant: the model is not known to match the
    pool until the invariant has passed again; and if the step fails, its
    frames are cleared, so that the exception hypothesis keeps does not keep
    pool arrays alive into later examples (they would change their
    accounting when finally dropped)."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        self.consistent = False
        try:
            return fn(self, *args, **kwargs)
        except BaseException as e:
            if e.__traceback__ is not None:
                traceback.clear_frames(e.__traceback__.tb_next)
            raise

    return wrapper


SPARE_HELPERS: list[Helper] = []  # helpers that hold nothing, for the next example


def kill_helper(h: Helper) -> None:
    if h.proc.is_alive():
        os.kill(h.pid, signal.SIGKILL)
    h.proc.join(REPLY_TIMEOUT)
    h.conn.close()


def mismatch(what: str, actual: Any, expected: Any) -> str:
    return f"{what}: pool says {actual!r}, model says {expected!r}"


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.local: dict[int, tuple[Any, MBlock, np.ndarray]] = {}  # id -> (array, block, expected)
        self.pickles: list[tuple[bytes, MBlock, np.ndarray]] = []
        self.blocks: list[MBlock] = []  # alive in the model
        self.dead: list[MBlock] = []
        # Blocks freed while unshared: this process's cache may hand them back.
        self.cacheable: set[tuple[int, int, int]] = set()
        self.last_gen_at: dict[tuple[int, int], int] = {}
        self.helpers: list[Helper | None] = [None] * N_HELPERS
        self.consistent = False
        pyarraypool.collect()
        probe = pyarraypool.empty(1, dtype=np.uint8, transfer_required=False)
        info = _core._test_block_info(probe)
        self.my_slot = info["my_slot"]
        self.max_gen = info["generation"]
        del probe
        try:
            for i in range(N_HELPERS):
                self.helpers[i] = self.spare_or_new_helper()
        except BaseException:
            self.stop_helpers()
            raise
        pyarraypool.collect()
        self.base = pyarraypool.stats()

    # --- helpers ---

    def spare_or_new_helper(self) -> Helper:
        while SPARE_HELPERS:
            h = SPARE_HELPERS.pop()
            if h.proc.is_alive():
                return h
            kill_helper(h)
        return self.start_helper()

    def start_helper(self) -> Helper:
        parent_conn, child_conn = CTX.Pipe()
        proc = CTX.Process(target=helper_main, args=(child_conn,), daemon=True)
        # The child inherits (and the pool marks it as holding) every block
        # an array of this process lives on at the fork.
        inherited = {b for b in self.blocks if self.i_hold(b)}
        for b in inherited:
            b.shared = True  # held at a fork: the child holds it too
        if inherited:
            event("a forked helper inherits blocks")
        proc.start()
        child_conn.close()
        assert parent_conn.poll(REPLY_TIMEOUT), "a helper did not start"
        pid, slot = parent_conn.recv()
        assert slot != self.my_slot
        for h in self.helpers:
            if h is not None:
                assert slot != h.slot, f"helper {pid} got the slot {slot} of live helper {h.pid}"
        return Helper(proc, parent_conn, pid, slot, inherited)

    def stop_helpers(self, keep_clean: bool = False) -> None:
        """Kills the helpers; with `keep_clean`, those that inherited nothing
        drop what they hold and wait for the next example instead."""
        for i, h in enumerate(self.helpers):
            if h is None:
                continue
            self.helpers[i] = None
            if keep_clean and not h.inherited and h.proc.is_alive():
                assert (_got := self.ask(h, "reset")) == (_want := ("ok",)), mismatch(
                    f"helper {h.pid} reset", _got, _want
                )
                h.held.clear()
                SPARE_HELPERS.append(h)
            else:
                kill_helper(h)

    def ask(self, h: Helper, *msg: Any) -> tuple:
        h.conn.send(msg)
        assert h.conn.poll(REPLY_TIMEOUT), f"helper {h.pid} did not answer {msg[0]!r}"
        return h.conn.recv()

    def live_helpers(self) -> list[Helper]:
        return [h for h in self.helpers if h is not None]

    def helpers_holding(self) -> list[int]:
        return [i for i, h in enumerate(self.helpers) if h is not None and h.held]

    # --- model bookkeeping ---

    def i_hold(self, b: MBlock) -> bool:
        return any(e[1] is b for e in self.local.values())

    def holders_mask(self, b: MBlock) -> int:
        mask = (1 << self.my_slot) if self.i_hold(b) else 0
        for h in self.live_helpers():
            if h.holds(b):
                mask |= 1 << h.slot
        return mask

    def settle(self) -> None:
        """A block is used while holders != 0 or pending > 0."""
        for b in list(self.blocks):
            if b.pending == 0 and self.holders_mask(b) == 0:
                b.alive = False
                self.blocks.remove(b)
                self.dead.append(b)
                if not b.shared:
                    self.cacheable.add(b.key)

    def new_block(self, info: dict, requested: int, tr: bool, expected: np.ndarray) -> MBlock:
        assert info["used"] and info["check_ok"], info
        seg, off, gen = info["segment"], info["offset"], info["generation"]
        if (seg, off, gen) in self.cacheable:
            # Taken back from this process's cache: same block, same generation.
            self.cacheable.discard((seg, off, gen))
            event("a block came back from the local cache")
            for dead in self.dead:
                if dead.key == (seg, off, gen):
                    self.dead.remove(dead)  # its old pickles: none exist
                    break
            return self._register_block(info, requested, tr, expected)
        assert gen > self.max_gen, (
            f"allocation at (segment {seg}, offset {off}) got generation {gen}, "
            f"not larger than {self.max_gen} seen before"
        )
        prev = self.last_gen_at.get((seg, off))
        assert prev is None or gen != prev, (
            f"(segment {seg}, offset {off}) was reused with its old generation {gen}"
        )
        self.max_gen = gen
        self.last_gen_at[(seg, off)] = gen
        return self._register_block(info, requested, tr, expected)

    def _register_block(self, info: dict, requested: int, tr: bool, expected: np.ndarray) -> MBlock:
        seg, off, gen = info["segment"], info["offset"], info["generation"]
        assert info["capacity"] >= requested, info
        assert (_got := info["size"]) == (_want := info["capacity"] + HEADER), mismatch(
            "block size", _got, _want
        )
        assert (_got := bool(info["flags"] & FLAG_TRANSFER_REQUIRED)) == (_want := tr), mismatch(
            "transfer_required flag", _got, _want
        )
        for other in self.blocks:
            if other.seg == seg:
                assert off + info["size"] <= other.off or other.off + other.size <= off, (
                    f"new block [{off}, {off + info['size']}) overlaps live block "
                    f"[{other.off}, {other.off + other.size}) in segment {seg}"
                )
        b = MBlock(seg, off, gen, info["size"], info["capacity"], requested, tr, expected)
        self.blocks.append(b)
        return b

    def check_block(self, info: dict, b: MBlock, expected: np.ndarray, where: str) -> None:
        assert b.alive, f"{where}: an array lives on block {b.key}, which the model has freed"
        assert info["used"], f"{where}: block {b.key} is not used"
        assert info["check_ok"], f"{where}: block {b.key} fails its header check"
        assert (_got := (info["segment"], info["offset"], info["generation"])) == (
            _want := b.key
        ), mismatch(f"{where}: block", _got, _want)
        assert (_got := info["block_ref"]) == (_want := (b.seg, b.off, b.gen, b.capacity)), (
            mismatch(f"{where}: _Block", _got, _want)
        )
        assert (_got := (info["size"], info["capacity"])) == (_want := (b.size, b.capacity)), (
            mismatch(f"{where}: size, capacity", _got, _want)
        )
        assert (_got := bool(info["flags"] & FLAG_TRANSFER_REQUIRED)) == (_want := b.tr), mismatch(
            f"{where}: transfer_required", _got, _want
        )
        assert (_got := info["pending"]) == (_want := b.pending), mismatch(
            f"{where}: pending of {b.key}", _got, _want
        )
        assert (_got := info["holders"]) == (_want := self.holders_mask(b)), mismatch(
            f"{where}: holders of {b.key}", _got, _want
        )
        assert info["is_transferable"], f"{where}: not a TransferableArray"
        assert info["address"] % ALIGN == 0, f"{where}: payload at {info['address']:#x}"
        lo, hi = info["extent"]
        assert info["address"] <= lo <= hi <= info["address"] + b.capacity, (
            f"{where}: array bytes [{lo:#x}, {hi:#x}) outside the payload of {b.key}"
        )
        assert (_got := info["shape"]) == (_want := expected.shape), mismatch(
            f"{where}: shape", _got, _want
        )
        # strides matter only along axes with more than one element
        assert (
            _got := [s for n, s in zip(info["shape"], info["strides"], strict=True) if n > 1]
        ) == (
            _want := [s for n, s in zip(expected.shape, expected.strides, strict=True) if n > 1]
        ), mismatch(f"{where}: strides", _got, _want)

    # --- rules: this process ---

    def alloc_here(self, n: int, tr: bool, how: str) -> None:
        expected = pattern(n, next(SEEDS))
        if how == "make_transferable":
            arr = pyarraypool.make_transferable(expected, transfer_required=tr)
        else:
            make = pyarraypool.empty if how == "empty" else pyarraypool.zeros
            arr = make(n, dtype=np.uint8, transfer_required=tr)
            if how == "zeros":
                assert not arr.any(), "zeros() returned a block that is not zeroed"
            arr[...] = expected
        assert type(arr) is pyarraypool.TransferableArray
        info = _core._test_block_info(arr)
        assert (_got := info["pending"]) == (_want := 0), mismatch(
            "pending of a new block", _got, _want
        )
        assert (_got := info["holders"]) == (_want := 1 << self.my_slot), mismatch(
            "holders of a new block", _got, _want
        )
        b = self.new_block(info, n, tr, expected)
        self.local[next(IDS)] = (arr, b, expected)

    @rule(n=SIZES, tr=st.booleans(), how=HOW)
    @step
    def alloc(self, n, tr, how):
        self.alloc_here(n, tr, how)

    @precondition(lambda self: self.local)
    @rule(data=st.data())
    @step
    def free(self, data):
        lid = data.draw(st.sampled_from(sorted(self.local)), label="array")
        del self.local[lid]
        self.settle()

    @precondition(lambda self: self.local)
    @rule(data=st.data())
    @step
    def free_block(self, data):
        """Drop every array here on one block."""
        lid = data.draw(st.sampled_from(sorted(self.local)), label="array")
        b = self.local[lid][1]
        for k in [k for k, e in self.local.items() if e[1] is b]:
            del self.local[k]
        self.settle()

    @precondition(lambda self: self.local)
    @rule(data=st.data(), how=HOW)
    @step
    def free_then_alloc_same(self, data, how):
        """Drop an array and at once allocate one of the same request (the
        local cache's favourite pattern; no stats() in between)."""
        lid = data.draw(st.sampled_from(sorted(self.local)), label="array")
        _, b, _ = self.local.pop(lid)
        self.settle()
        self.alloc_here(b.requested, b.tr, how)

    @precondition(lambda self: self.local)
    @rule(data=st.data())
    @step
    def view(self, data):
        lid = data.draw(st.sampled_from(sorted(self.local)), label="array")
        arr, b, expected = self.local[lid]
        sl = data.draw(st.slices(expected.shape[0]), label="slice")
        v = arr[sl]
        assert type(v) is pyarraypool.TransferableArray
        self.local[next(IDS)] = (v, b, expected[sl])

    @precondition(lambda self: self.local)
    @rule(data=st.data(), times=st.integers(1, 3))
    @step
    def pickle_here(self, data, times):
        lid = data.draw(st.sampled_from(sorted(self.local)), label="array")
        arr, b, expected = self.local[lid]
        b.shared = True
        for _ in range(times):
            payload = pickle.dumps(arr)
            assert len(payload) < 1024, f"a handle pickles to {len(payload)} bytes"
            if b.tr:
                b.pending += 1
            self.pickles.append((payload, b, expected))

    @precondition(lambda self: self.pickles)
    @rule(data=st.data())
    @step
    def load_here(self, data):
        i = data.draw(st.integers(0, len(self.pickles) - 1), label="pickle")
        payload, b, expected = self.pickles[i]
        if not b.alive:
            event("load here: stale")
            self.expect_stale_here(payload, b)
            return
        event("load here: live")
        arr = pickle.loads(payload)
        assert type(arr) is pyarraypool.TransferableArray
        blk = _core._block_of(arr)
        assert (_got := (blk.segment, blk.offset, blk.generation)) == (_want := b.key), mismatch(
            "loaded block", _got, _want
        )
        assert np.array_equal(arr, expected), f"a load of {b.key} shows other bytes"
        if b.tr and b.pending > 0:
            b.pending -= 1
        self.local[next(IDS)] = (arr, b, expected)

    def expect_stale_here(self, payload: bytes, b: MBlock) -> None:
        try:
            arr = pickle.loads(payload)
        except pyarraypool.StaleHandleError:
            return
        blk = _core._block_of(arr)
        got = None if blk is None else (blk.segment, blk.offset, blk.generation)
        shown = np.asarray(arr).tobytes()[:16]
        del arr, blk
        raise AssertionError(
            f"a pickle of freed block {b.key} loaded: got block {got}, first bytes {shown!r}"
        )

    @precondition(lambda self: self.blocks)
    @rule()
    @step
    def collect(self):
        assert (_got := pyarraypool.collect()) == (_want := 0), mismatch(
            "bytes collect() freed with nothing dead", _got, _want
        )

    # --- rules: the helpers ---

    def helper_load(self, which: int, payload: bytes, b: MBlock, expected: np.ndarray) -> None:
        h = self.helpers[which]
        assert h is not None
        hkey = next(IDS)
        reply = self.ask(h, "load", hkey, payload)
        event("helper load: " + ("live" if b.alive else "stale"))
        if not b.alive:
            assert reply[0] == "stale", (
                f"helper {h.pid} loaded a pickle of freed block {b.key}: {reply[:2]!r}"
            )
            return
        assert reply[0] == "ok", f"helper {h.pid} could not load {b.key}: {reply!r}"
        _, info, crc = reply
        if b.tr and b.pending > 0:
            b.pending -= 1
        want_crc = zlib.crc32(expected.tobytes())
        h.held[hkey] = (b, expected, want_crc)
        self.check_block(info, b, expected, f"helper {h.pid} load")
        assert crc == want_crc, f"helper {h.pid} sees other bytes in {b.key}"

    @precondition(lambda self: self.local)
    @rule(data=st.data(), which=st.integers(0, N_HELPERS - 1))
    @step
    def send_to_helper(self, data, which):
        lid = data.draw(st.sampled_from(sorted(self.local)), label="array")
        arr, b, expected = self.local[lid]
        b.shared = True
        payload = pickle.dumps(arr)
        del arr
        if b.tr:
            b.pending += 1
        self.helper_load(which, payload, b, expected)

    @precondition(lambda self: self.pickles)
    @rule(data=st.data(), which=st.integers(0, N_HELPERS - 1))
    @step
    def send_pickle_to_helper(self, data, which):
        i = data.draw(st.integers(0, len(self.pickles) - 1), label="pickle")
        payload, b, expected = self.pickles[i]
        self.helper_load(which, payload, b, expected)

    @precondition(lambda self: self.helpers_holding())
    @rule(data=st.data())
    @step
    def helper_drop(self, data):
        which = data.draw(st.sampled_from(self.helpers_holding()), label="helper")
        h = self.helpers[which]
        hkey = data.draw(st.sampled_from(sorted(h.held)), label="held")
        assert (_got := self.ask(h, "drop", hkey)) == (_want := ("ok",)), mismatch(
            f"helper {h.pid} drop", _got, _want
        )
        del h.held[hkey]
        self.settle()

    @precondition(lambda self: self.helpers_holding())
    @rule(data=st.data())
    @step
    def helper_pickles(self, data):
        """A helper pickles an array it holds and sends the pickle here."""
        which = data.draw(st.sampled_from(self.helpers_holding()), label="helper")
        h = self.helpers[which]
        hkey = data.draw(st.sampled_from(sorted(h.held)), label="held")
        reply = self.ask(h, "pickle", hkey)
        assert reply[0] == "ok", reply
        b, expected, _ = h.held[hkey]
        if b.tr:
            b.pending += 1
        self.pickles.append((reply[1], b, expected))

    @rule(which=st.integers(0, N_HELPERS - 1), n=SIZES, tr=st.booleans(), keep=st.booleans())
    @step
    def helper_allocates(self, which, n, tr, keep):
        """A helper allocates, fills and pickles an array (a worker's
        result), keeps it or drops it at once, and sends the pickle here."""
        h = self.helpers[which]
        assert h is not None
        seed = next(SEEDS)
        hkey = next(IDS)
        reply = self.ask(h, "alloc", hkey, n, seed, tr, keep)
        assert reply[0] == "ok", reply
        _, payload, info = reply
        assert (_got := info["pending"]) == (_want := 1 if tr else 0), mismatch(
            "pending of a helper's new pickled block", _got, _want
        )
        assert (_got := info["holders"]) == (_want := 1 << h.slot), mismatch(
            "holders of a helper's new block", _got, _want
        )
        assert (_got := info["my_slot"]) == (_want := h.slot), mismatch(
            "helper's slot", _got, _want
        )
        assert info["address"] % ALIGN == 0, info
        b = self.new_block(info, n, tr, pattern(n, seed))
        b.shared = True  # pickled by the helper
        b.pending = 1 if tr else 0
        if keep:
            h.held[hkey] = (b, b.expected, zlib.crc32(b.expected.tobytes()))
        self.pickles.append((payload, b, b.expected))
        self.settle()

    @precondition(lambda self: self.local or self.helpers_holding())
    @rule(which=st.integers(0, N_HELPERS - 1), graceful=st.booleans())
    @step
    def helper_dies(self, which, graceful):
        """SIGKILL (or a clean exit), then collect(): what it held goes back
        (what it still held at a clean exit, once it is gone); a replacement
        is forked (and inherits what this process holds)."""
        h = self.helpers[which]
        assert h is not None
        if graceful:
            assert (_got := self.ask(h, "exit")) == (_want := ("ok",)), mismatch(
                f"helper {h.pid} exit", _got, _want
            )
        else:
            os.kill(h.pid, signal.SIGKILL)
        h.proc.join(REPLY_TIMEOUT)
        assert h.proc.exitcode is not None, f"helper {h.pid} did not end"
        h.conn.close()
        self.helpers[which] = None
        before = {b: b.alive for b in self.blocks}
        self.settle()
        freed = sum(b.size for b in before if not b.alive)
        # A clean exit gives back what the helper's code released before it
        # (its local cache included), but no hold of an array still alive at
        # exit (those it inherited at the fork): threads may still touch them
        # then. Once the process is gone, this collect() reclaims them, as it
        # reclaims everything a killed helper held.
        left_at_exit = sum(b.size for b in before if not b.alive and b in h.inherited)
        assert (_got := pyarraypool.collect()) == (
            _want := left_at_exit if graceful else freed
        ), mismatch("bytes collect() freed", _got, _want)
        assert h.pid not in pyarraypool.stats().pids
        self.helpers[which] = self.start_helper()

    # --- the invariant ---

    @invariant()
    @step
    def pool_matches_model(self):
        s = pyarraypool.stats()  # empties this process's local cache first
        alive = self.blocks
        assert (_got := s.live_blocks - self.base.live_blocks) == (_want := len(alive)), mismatch(
            "live_blocks delta", _got, _want
        )
        assert (_got := s.used_bytes - self.base.used_bytes) == (
            _want := sum(b.size for b in alive)
        ), mismatch("used_bytes delta", _got, _want)
        assert (_got := s.pending_transfers - self.base.pending_transfers) == (
            _want := sum(b.pending for b in alive)
        ), mismatch("pending_transfers delta", _got, _want)
        assert (_got := s.pending_blocks - self.base.pending_blocks) == (
            _want := sum(1 for b in alive if b.pending)
        ), mismatch("pending_blocks delta", _got, _want)
        assert (_got := s.processes) == (_want := self.base.processes), mismatch(
            "processes", _got, _want
        )
        for h in self.live_helpers():
            assert h.pid in s.pids, f"live helper {h.pid} missing from stats().pids"

        # layout: aligned, no overlap
        by_place = sorted(alive, key=lambda b: (b.seg, b.off))
        for b in by_place:
            assert b.off % ALIGN == 0 and b.size % ALIGN == 0, b.key
            assert b.capacity >= b.requested, b.key
        for a, b in itertools.pairwise(by_place):
            if a.seg == b.seg:
                assert a.off + a.size <= b.off, (
                    f"live blocks {a.key} [{a.off}, {a.off + a.size}) and {b.key} "
                    f"[{b.off}, {b.off + b.size}) overlap"
                )

        # every array here
        for lid, (arr, b, expected) in self.local.items():
            self.check_block(describe(arr), b, expected, f"array {lid}")
            assert np.array_equal(arr, expected), f"array {lid} on {b.key} lost its bytes"

        # every array in the helpers (asked all at once)
        asked = [h for h in self.live_helpers() if h.held]
        for h in asked:
            h.conn.send(("describe",))
        for h in asked:
            assert h.conn.poll(REPLY_TIMEOUT), f"helper {h.pid} did not answer 'describe'"
            reply = h.conn.recv()
            assert reply[0] == "ok", reply
            assert (_got := set(reply[1])) == (_want := set(h.held)), mismatch(
                f"helper {h.pid} arrays", _got, _want
            )
            for hkey, (info, crc) in reply[1].items():
                b, expected, want_crc = h.held[hkey]
                self.check_block(info, b, expected, f"helper {h.pid} array {hkey}")
                assert (_got := info["my_slot"]) == (_want := h.slot), mismatch(
                    "helper's slot", _got, _want
                )
                assert crc == want_crc, f"helper {h.pid} array {hkey} on {b.key} lost its bytes"

        for b in alive:
            holders = self.holders_mask(b)
            if holders.bit_count() >= 2:
                event(f"a block with {holders.bit_count()} holders")
            if b.pending >= 2:
                event("a block with pending >= 2")
            if b.pending and not holders:
                event("a block kept only by pending")

        _core._verify()
        self.consistent = True

    # --- teardown ---

    def teardown(self):
        consistent = self.consistent
        try:
            self.stop_helpers(keep_clean=consistent)
            self.local.clear()
            # Load every pickle until its block has no pending count left.
            try:
                for payload, _, _ in self.pickles:
                    for _ in range(1000):
                        try:
                            arr = pickle.loads(payload)
                        except pyarraypool.StaleHandleError:
                            break
                        pending = _core._test_block_info(arr)["pending"]
                        del arr
                        if pending == 0:
                            break
            except Exception:
                if consistent:
                    raise
                # else: the step that failed is the error to report
            self.pickles.clear()
        finally:
            self.stop_helpers()
        pyarraypool.collect()
        if consistent:
            s = pyarraypool.stats()
            assert (_got := (s.used_bytes, s.live_blocks, s.pending_transfers)) == (
                _want := (self.base.used_bytes, self.base.live_blocks, self.base.pending_transfers)
            ), mismatch(
                "pool after teardown (used_bytes, live_blocks, pending_transfers)", _got, _want
            )
            _core._verify()


SETTINGS = settings(
    max_examples=80,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_pool_against_model():
    try:
        run_state_machine_as_test(PoolMachine, settings=SETTINGS)
    finally:
        while SPARE_HELPERS:
            kill_helper(SPARE_HELPERS.pop())
        pyarraypool.collect()
