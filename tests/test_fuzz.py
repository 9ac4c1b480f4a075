"""Hostile handles, fuzzed with atheris (libFuzzer) for a bounded time.

Contract points 11 and 17 (see /work/shared/guide/contract.md): whatever
bytes arrive where a handle is expected, loading gives InvalidHandleError,
StaleHandleError, or an array that is exactly the view the handle describes,
inside its block. Never a crash. test_handles.py has hand-written and
hypothesis-made damage; here libFuzzer mutates for FUZZ_SECONDS per target,
in a child program with a pool of its own, and fails on a crash, on any
other exception, or on an array that reaches outside its block.

Targets:
- ``rebuild``: ``_core._rebuild(data, dtype)`` with raw fuzzer bytes, and
  with real handles of a few pool arrays (views, 0-d, empty, structured,
  big-endian) overwritten, truncated or extended by fuzzer bytes;
- ``pickle``: ``pickle.loads`` of real pickles of those arrays with the
  handle inside mutated (in place, or re-pickled when its length changed
  with protocols 2 to 5), then possibly the pickle cut short. The pickle's
  own opcodes are not mutated: the pickle module is documented as unsafe
  for hostile data (a flipped byte can become LONG_BINPUT 0x50604394 and
  make CPython grow its memo to gigabytes; a mangled dtype state makes
  numpy 2.4 raise SystemError) — that is not pyarraypool's to defend.
  A pickle cut short must fail with pickle.UnpicklingError or EOFError; an
  intact pickle (only the handle inside it mutated) with one of the two
  handle errors, nothing else.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap

import pytest
from helpers import fresh_env, pool_files, stress

FUZZ_SECONDS = stress(18, 6)

try:
    import atheris  # noqa: F401
except ImportError:  # pragma: no cover - the Makefile's venv installs it
    atheris = None

HARNESS = r'''
import pickle, struct, sys
import atheris
import numpy as np

with atheris.instrument_imports():
    import pyarraypool
    from pyarraypool import InvalidHandleError, StaleHandleError, _core

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:
    byte_bounds = np.byte_bounds

TARGET = sys.argv.pop(1)
CORPUS = sys.argv.pop(1)
SECONDS = float(sys.argv.pop(1))

base = pyarraypool.make_transferable(np.arange(240, dtype="<i4").reshape(4, 6, 10),
                                     transfer_required=False)
others = [
    pyarraypool.make_transferable(np.arange(50.0, dtype=">f8"), transfer_required=False),
    pyarraypool.make_transferable(np.array(3.5), transfer_required=False),
    pyarraypool.make_transferable(np.zeros((0, 5)), transfer_required=False),
    pyarraypool.make_transferable(
        np.array([(1, 2.0), (3, 4.0)], dtype=[("i", "<i2"), ("f", "<f8")]),
        transfer_required=False),
]
ARRAYS = [base, base[1], base[:, ::2, 1:7], base.T, base[..., 0], base[::-1]] + others
HANDLES, DTYPES, PICKLES = [], [], []
for a in ARRAYS:
    fn, (h, d) = a.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    assert fn is _core._rebuild
    HANDLES.append(h)
    DTYPES.append(np.dtype(d))
    PICKLES.append(pickle.dumps(a, protocol=pickle.HIGHEST_PROTOCOL))
    assert PICKLES[-1].count(h) == 1
EXTRA_DTYPES = [np.dtype(t) for t in ("u1", "<i2", "<i4", ">f8", "<c16", "V3", "S5", "<f4")]
ALL_DTYPES = DTYPES + EXTRA_DTYPES
HANDLE_ERRORS = (InvalidHandleError, StaleHandleError)
DIMS = 80  # where a handle's shape and strides start (csrc/core/handle.hpp)
PICKLE_ERRORS = (pickle.UnpicklingError, EOFError)    # a pickle cut short
# The pool state the fuzzing must not change.
START = pyarraypool.stats()
COUNTS = {"loaded": 0, "loaded-mutated": 0, "refused": 0, "pickle-refused": 0}


def check_loaded(y, handle, dtype):
    """y came from `handle`: exactly the view it describes, inside its block."""
    assert isinstance(y, pyarraypool.TransferableArray), type(y)
    ndim = handle[6]
    assert len(handle) == DIMS + 16 * ndim
    ref, gen, view_off, _ = struct.unpack_from("<QQQQ", handle, 24)
    shape = struct.unpack_from(f"<{ndim}q", handle, DIMS)
    strides = struct.unpack_from(f"<{ndim}q", handle, DIMS + 8 * ndim)
    blk = _core._block_of(y)
    assert blk is not None
    assert (blk.segment, blk.offset, blk.generation) == (ref >> 48, ref & ((1 << 48) - 1), gen)
    assert y.dtype == dtype, (y.dtype, dtype)
    assert y.shape == shape and y.strides == strides, (y.shape, shape, y.strides, strides)
    assert y.ctypes.data == blk.address + view_off
    if y.size:
        lo, hi = byte_bounds(y)
        assert blk.address <= lo and hi <= blk.address + blk.capacity, (
            lo - blk.address, hi - blk.address, blk.capacity)
        first = tuple(0 if s >= 0 else n - 1 for n, s in zip(y.shape, y.strides))
        last = tuple(n - 1 if s >= 0 else 0 for n, s in zip(y.shape, y.strides))
        y[first].tobytes()
        y[last].tobytes()


def mutate(fdp, h):
    kind = fdp.ConsumeIntInRange(0, 4)
    if kind in (0, 1) and len(h) < DIMS:
        kind = 3
    if kind == 0:                       # overwrite a few bytes
        b = bytearray(h)
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            b[fdp.ConsumeIntInRange(0, len(b) - 1)] = fdp.ConsumeInt(1) & 0xFF
        return bytes(b)
    if kind == 1:                       # set one 8-byte field (header or dims)
        fields = [f for f in [24, 32, 40, 48, 56] + list(range(64, len(h), 8)) if f + 8 <= len(h)]
        at = fields[fdp.ConsumeIntInRange(0, len(fields) - 1)]
        b = bytearray(h)
        if fdp.ConsumeBool():
            old = struct.unpack_from("<q", b, at)[0]
            struct.pack_into("<q", b, at, max(-(1 << 63), min((1 << 63) - 1,
                             old + fdp.ConsumeIntInRange(-4096, 4096))))
        else:
            struct.pack_into("<Q", b, at, fdp.ConsumeInt(8) % (1 << 64))
        return bytes(b)
    if kind == 2:                       # cut short
        return h[:fdp.ConsumeIntInRange(0, len(h))]
    if kind == 3:                       # extend, or a new ndim and new dims
        if fdp.ConsumeBool():
            return h + fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 48))
        ndim = fdp.ConsumeIntInRange(0, 8)
        dims = [fdp.ConsumeInt(8) for _ in range(2 * ndim)]
        return h[:6] + bytes([ndim]) + h[7:DIMS] + struct.pack(f"<{2 * ndim}q", *dims)
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))   # raw bytes


def one_rebuild(data):
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    i = fdp.ConsumeIntInRange(0, len(ARRAYS) - 1)
    if mode == 0:                       # raw bytes as the handle
        handle = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 256))
    else:
        handle = HANDLES[i]
        for _ in range(mode):
            handle = mutate(fdp, handle)
    dtype = DTYPES[i] if fdp.ConsumeBool() else ALL_DTYPES[
        fdp.ConsumeIntInRange(0, len(ALL_DTYPES) - 1)]
    try:
        y = _core._rebuild(handle, dtype)
    except HANDLE_ERRORS:
        COUNTS["refused"] += 1
        return
    check_loaded(y, handle, dtype)
    if handle == HANDLES[i] and dtype == DTYPES[i]:
        assert np.array_equal(y, ARRAYS[i])
        assert y.size == 0 or np.shares_memory(y, ARRAYS[i])   # empty arrays share nothing
        COUNTS["loaded"] += 1
    else:
        COUNTS["loaded-mutated"] += 1


def one_pickle(data):
    fdp = atheris.FuzzedDataProvider(data)
    i = fdp.ConsumeIntInRange(0, len(ARRAYS) - 1)
    h, blob = HANDLES[i], PICKLES[i]
    bad = h
    for _ in range(fdp.ConsumeIntInRange(0, 2)):
        bad = mutate(fdp, bad)
    if len(bad) == len(h):              # spliced in place: the real pickle's framing
        blob = blob.replace(h, bad)
    else:                               # re-pickled, as a sender would
        class R:
            def __reduce__(self):
                return _core._rebuild, (bad, DTYPES[i])
        blob = pickle.dumps(R(), protocol=fdp.ConsumeIntInRange(2, pickle.HIGHEST_PROTOCOL))
    damaged = False
    what = fdp.ConsumeIntInRange(0, 2)
    if what == 1:                     # cut short
        n = fdp.ConsumeIntInRange(0, len(blob) - 1)
        blob, damaged = blob[:n], True
    try:
        y = pickle.loads(blob)
    except HANDLE_ERRORS:
        COUNTS["refused"] += 1
        return
    except PICKLE_ERRORS:
        if not damaged:
            raise                       # an intact pickle must fail with a handle error
        COUNTS["pickle-refused"] += 1
        return
    if not isinstance(y, pyarraypool.TransferableArray):
        assert damaged, type(y)         # a mangled pickle may build something else
        return
    if not damaged:
        check_loaded(y, bad, DTYPES[i])
    else:
        blk = _core._block_of(y)
        lo, hi = byte_bounds(y) if y.size else (blk.address, blk.address)
        assert blk.address <= lo and hi <= blk.address + blk.capacity
    COUNTS["loaded" if bad == h and not damaged else "loaded-mutated"] += 1


def finish():
    # libFuzzer ends a run with C exit(), which skips Python's atexit (and so
    # the pool's leave-at-exit): the harness ends the run itself instead.
    import gc, os
    gc.collect()
    s = pyarraypool.stats()
    assert (s.used_bytes, s.live_blocks, s.pending_transfers) == (
        START.used_bytes, START.live_blocks, START.pending_transfers), (START, s)
    _core._verify()
    print("COUNTS", COUNTS, flush=True)
    sys.stderr.flush()
    _core._shutdown()                   # the last process: unlinks the pool's segments
    os._exit(0)


import time
DEADLINE = time.monotonic() + SECONDS


def timed(target):
    def run(data):
        if time.monotonic() > DEADLINE:
            finish()
        target(data)
    return run


# Coverage feedback for libFuzzer: the harness's own branches (the core is C++
# and not instrumented; pyarraypool's Python modules are, by instrument_imports).
for _f in (mutate, check_loaded, one_rebuild, one_pickle):
    globals()[_f.__name__] = atheris.instrument_func(_f)

print("TOKEN", _core._pool_token(), flush=True)
atheris.Setup([sys.argv[0], CORPUS] + sys.argv[1:],
              timed(one_rebuild if TARGET == "rebuild" else one_pickle))
atheris.Fuzz()
'''


def _seeds(corpus) -> None:
    """A few inputs that decode to each array's intact handle and pickle."""
    os.makedirs(corpus, exist_ok=True)
    for i in range(11):
        for j, raw in enumerate([bytes([1, i, 1]) + bytes(64), bytes([i, 0, 0, 0]) + bytes(32),
                                 bytes([0, i]) + b"PAPH\x02" + bytes(106)]):
            with open(os.path.join(corpus, f"seed-{i}-{j}"), "wb") as f:
                f.write(raw)


@pytest.mark.skipif(atheris is None, reason="atheris is not installed in this Python")
@pytest.mark.parametrize("target", ["rebuild", "pickle"])
def test_fuzzed_handles_never_crash_or_escape_their_block(target, tmp_path):
    script = tmp_path / "fuzz_handles.py"
    script.write_text(textwrap.dedent(HARNESS))
    corpus = tmp_path / "corpus"
    _seeds(corpus)
    proc = subprocess.run(
        [sys.executable, str(script), target, str(corpus), str(FUZZ_SECONDS),
         # a backstop only: the harness stops itself after FUZZ_SECONDS
         f"-max_total_time={FUZZ_SECONDS + 30}", "-timeout=10", "-rss_limit_mb=4096",
         f"-artifact_prefix={tmp_path}/", "-seed=1"],
        env=fresh_env(), capture_output=True, text=True, timeout=FUZZ_SECONDS + 60,
        cwd=str(tmp_path))
    out = proc.stdout + proc.stderr
    token = re.search(r"^TOKEN ([0-9a-f]{32})$", out, re.M)
    assert token, out[-3000:]
    token = token.group(1)
    left = pool_files(token)
    if proc.returncode != 0:
        # libFuzzer ended the child with C exit(), without the pool's
        # leave-at-exit: remove its (dead) pool so /dev/shm stays as found.
        for name in left:
            os.unlink("/dev/shm/" + name)
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "oom-",
                                                                             "timeout-")))
    assert proc.returncode == 0 and not crashes, (
        f"the fuzzer found a problem (exit {proc.returncode}; inputs {crashes} in {tmp_path})\n"
        + out[-6000:])
    line = next((ln for ln in out.splitlines() if ln.startswith("COUNTS ")), None)
    assert line, "the harness did not finish (pool balance, _verify)\n" + out[-3000:]
    counts = ast.literal_eval(line[len("COUNTS "):])
    runs = sum(counts.values())
    print(f"\n{target}: {runs} inputs in {FUZZ_SECONDS} s: {counts}")
    assert runs >= 10_000, counts
    assert counts["refused"] > 0 and counts["loaded"] + counts["loaded-mutated"] > 0, counts
    assert left == [], "the fuzzing program left its pool behind"
