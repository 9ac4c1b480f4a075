"""Auto mode: plain numpy arrays sent to other processes go through the pool.

Issue 11, section 2. With ``pyarraypool.install()`` (or ``PYARRAYPOOL_AUTO``
in an unchanged program), a plain ``np.ndarray`` of at least the threshold
that multiprocessing, concurrent.futures or joblib's loky backend sends
travels as a private handle: the receiver gets an exact ``np.ndarray`` in the
pool, its alone, and the wire carries a few hundred bytes. Everything else
(smaller arrays, subclasses, object dtypes, a full pool, plain pickle, files)
goes as before.

The channels run in this process with ``install()`` (the autouse balance
fixture then checks that every pool byte comes back); what an unchanged
program sees runs as a child program with the variable set.
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import pickle
import subprocess
import sys
import sysconfig
import tempfile
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
from helpers import fresh_env, run_python

import pyarraypool
from pyarraypool import _core

MIN = 64 << 10
BIG_N = 1 << 17  # float64: 1 MiB, over the threshold and over joblib's max_nbytes


def big(value: float = 0.0) -> np.ndarray:
    return np.arange(BIG_N, dtype=np.float64) + value


SMALL = np.arange(100, dtype=np.float64)  # 800 bytes: under the threshold


def in_pool(x: np.ndarray) -> bool:
    return _core._block_of(x) is not None


@pytest.fixture
def auto():
    """Auto mode on in this process (and so in the processes it starts), off after."""
    assert pyarraypool.installed() is None
    pyarraypool.install("64K")
    try:
        yield
    finally:
        pyarraypool.uninstall()
    assert "PYARRAYPOOL_AUTO" not in os.environ


# --- what a worker reports (module level: spawned workers import this file) --


def describe(x):
    """What the worker received, and a new array of the same size to send back."""
    seen = {"type": type(x), "in_pool": in_pool(x), "sum": float(x.sum())}
    return seen, x + 1


def check_received(seen, reply, sent):
    assert seen == {"type": np.ndarray, "in_pool": sent.nbytes >= MIN, "sum": float(sent.sum())}
    assert type(reply) is np.ndarray
    assert in_pool(reply) == (sent.nbytes >= MIN)
    np.testing.assert_array_equal(reply, sent + 1)


def pipe_child(conn):
    x = conn.recv()  # the parent overwrote its own array right after sending
    conn.send(describe(x))
    conn.close()


def queue_child(requests, replies):
    replies.put(describe(requests.get(timeout=60)))


# --- the wire, privacy, what stays by value ----------------------------------


def test_a_sent_array_is_a_small_private_handle_that_loads_once(auto):
    a = big()
    data = ForkingPickler.dumps(a)
    assert len(data) < 1000
    b = pickle.loads(data)
    assert type(b) is np.ndarray and in_pool(b)
    np.testing.assert_array_equal(b, a)
    a[:] = -1  # the sender's later writes do not reach the receiver
    assert b[5] == 5.0
    with pytest.raises(pyarraypool.StaleHandleError):
        pickle.loads(data)
    b[:] = 3  # and the receiver's array is its own to write
    pyarraypool.uninstall()
    assert len(ForkingPickler.dumps(a)) >= a.nbytes


def test_a_private_copy_loads_only_through_its_private_handle(auto):
    # Clearing the handle's private flag (byte 5 of the handle) must not turn
    # the receiver's own copy into a shared pool array that a second load
    # could reach: the block itself records that it is a private copy.
    data = bytes(ForkingPickler.dumps(big()))
    at = data.index(b"PAPH")
    assert data[at + 5] == 5  # transfer required | private
    tampered = data[:at + 5] + bytes([1]) + data[at + 6:]
    with pytest.raises(pyarraypool.InvalidHandleError):
        pickle.loads(tampered)
    b = pickle.loads(data)  # the refused load used nothing up
    assert type(b) is np.ndarray and b[5] == 5.0


@pytest.mark.parametrize("layout", ["fortran", "strided", "readonly"])
def test_any_layout_arrives_equal_and_writeable(auto, layout):
    a = np.arange(300 * 300, dtype=np.float64).reshape(300, 300)
    if layout == "fortran":
        a = np.asfortranarray(a)
    elif layout == "strided":
        a = a[::2, ::3]
    else:
        a.flags.writeable = False
    b = pickle.loads(ForkingPickler.dumps(a))
    assert type(b) is np.ndarray and in_pool(b) and b.flags.writeable
    np.testing.assert_array_equal(b, a)


def test_small_arrays_and_subclasses_go_by_value(auto, tmp_path):
    mm = np.memmap(tmp_path / "m.bin", dtype=np.float64, mode="w+", shape=(BIG_N,))
    mm[:] = 2.0
    cases = [SMALL, mm, big().view(np.recarray)]
    for a in cases:
        data = ForkingPickler.dumps(a)
        assert len(data) >= a.nbytes, type(a)
        b = pickle.loads(data)
        assert type(b) is type(a) and not in_pool(b)
        np.testing.assert_array_equal(b, a)
    del mm
    # A TransferableArray keeps its own behaviour: a shared handle, same type.
    t = pyarraypool.make_transferable(big())
    u = pickle.loads(ForkingPickler.dumps(t))
    assert type(u) is pyarraypool.TransferableArray
    assert _core._block_of(u) is _core._block_of(t)


def test_dtypes_the_pool_cannot_hold_go_by_value_with_a_debug_record(auto, caplog):
    dtypes = [np.dtype(object)]
    if hasattr(np.dtypes, "StringDType"):
        dtypes.append(np.dtypes.StringDType())
    for dtype in dtypes:
        a = np.array(["x" * 10] * (BIG_N // 8), dtype=dtype)
        with caplog.at_level(logging.DEBUG, logger="pyarraypool"):
            b = pickle.loads(ForkingPickler.dumps(a))
        assert type(b) is np.ndarray and not in_pool(b) and b.dtype == dtype
        np.testing.assert_array_equal(b, a)
    assert any("by value" in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.DEBUG for r in caplog.records)


def test_plain_pickle_files_and_copies_still_hold_the_data(auto, tmp_path):
    import joblib

    a = big(0.5)
    assert len(pickle.dumps(a)) >= a.nbytes
    with open(tmp_path / "a.pkl", "wb") as f:
        pickle.dump(a, f)
    joblib.dump(a, tmp_path / "a.joblib")
    np.save(tmp_path / "a.npy", a)
    for f in ("a.pkl", "a.joblib", "a.npy"):
        assert os.path.getsize(tmp_path / f) >= a.nbytes
    c = copy.deepcopy(a)
    assert type(c) is np.ndarray and not in_pool(c)
    # Loadable by a program that has no pool and no auto mode.
    out = run_python(
        f"""
        import pickle, sys, joblib, numpy as np
        d = {str(tmp_path)!r}
        with open(d + "/a.pkl", "rb") as f:
            arrays = [pickle.load(f), joblib.load(d + "/a.joblib"), np.load(d + "/a.npy")]
        expected = np.arange({BIG_N}, dtype=np.float64) + 0.5
        assert all((x == expected).all() for x in arrays)
        print("pyarraypool" in sys.modules)
        """
    )
    assert out.stdout.strip() == "False"


def pickler_state():
    """What auto mode changes, to compare before install() and after uninstall()."""
    import joblib._memmapping_reducer as jmr
    from joblib.externals.loky.backend import reduction as loky_reduction

    return (
        dict(ForkingPickler._extra_reducers),
        dict(loky_reduction._dispatch_table),
        vars(jmr.ArrayMemmapForwardReducer)["__call__"],
        jmr.reduce_array_memmap_backward,
        os.environ.get("PYARRAYPOOL_AUTO"),
        list(sys.meta_path),
    )


def test_install_uninstall_and_bad_thresholds():
    import joblib._memmapping_reducer as jmr

    saved = pickler_state()
    assert pyarraypool.installed() is None
    pyarraypool.install()
    assert pyarraypool.installed() == pyarraypool.DEFAULT_AUTO_MIN_BYTES == 65536
    assert os.environ["PYARRAYPOOL_AUTO"] == "65536"
    pyarraypool.install("1M")  # again: a new threshold
    assert pyarraypool.installed() == 1 << 20
    assert jmr.reduce_array_memmap_backward.min_bytes == 1 << 20
    a = np.zeros(200_000)  # 1.6 MB: over 1M
    b = pickle.loads(ForkingPickler.dumps(a))
    assert in_pool(b)
    assert not in_pool(pickle.loads(ForkingPickler.dumps(np.zeros(100_000))))
    pyarraypool.uninstall()
    pyarraypool.uninstall()  # a no-op
    assert pyarraypool.installed() is None
    assert pickler_state() == saved
    with pytest.raises(ValueError, match="size"):
        pyarraypool.install("lots")
    with pytest.raises(ValueError, match="positive"):
        pyarraypool.install(0)
    with pytest.raises(TypeError):
        pyarraypool.install(1.5)  # type: ignore[arg-type]
    assert pyarraypool.installed() is None


# --- every channel --------------------------------------------------------


@pytest.fixture
def fresh_forkserver():
    """A forkserver started now, with this process's environment.

    The forkserver of this pytest process may have started before install():
    its children would not be in auto mode (as in any program that used the
    forkserver before turning auto mode on). Stopped again after the test so
    that later tests do not get workers in auto mode.
    """
    multiprocessing.forkserver._forkserver._stop()
    yield
    multiprocessing.forkserver._forkserver._stop()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_pool_map_arguments_and_results(auto, method, request):
    if method == "forkserver":
        request.getfixturevalue("fresh_forkserver")
    sent = [big(1), SMALL, big(2)]
    with multiprocessing.get_context(method).Pool(2) as pool:
        out = pool.map(describe, sent)
        out += [pool.apply_async(describe, (big(3),)).get(timeout=60)]
    for (seen, reply), a in zip(out, sent + [big(3)], strict=True):
        check_received(seen, reply, a)


def test_process_arguments_under_spawn_and_pipe_privacy(auto):
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    first = big(4)
    p = ctx.Process(target=describe_and_send, args=(first, child))
    p.start()
    check_received(*parent.recv(), first)
    p.join(60)
    # Pipe: the parent writes its array right after sending it.
    p = ctx.Process(target=pipe_child, args=(child,))
    p.start()
    a = big(5)
    parent.send(a)
    expected = a.copy()
    a[:] = -7
    check_received(*parent.recv(), expected)
    p.join(60)
    assert p.exitcode == 0


def describe_and_send(x, conn):
    conn.send(describe(x))
    conn.close()


def test_queue_both_ways(auto):
    ctx = multiprocessing.get_context("fork")
    requests, replies = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=queue_child, args=(requests, replies))
    p.start()
    a = big(6)
    requests.put(a)
    check_received(*replies.get(timeout=60), a)
    p.join(60)
    assert p.exitcode == 0


def test_manager_list_and_dict_round_trip(auto):
    with multiprocessing.get_context("spawn").Manager() as manager:
        items, table = manager.list(), manager.dict()
        items.append(big(7))
        table["x"] = big(8)
        table["small"] = SMALL
        for got, expected in ((items[0], big(7)), (table["x"], big(8))):
            assert type(got) is np.ndarray and in_pool(got)  # the server sent it by handle
            np.testing.assert_array_equal(got, expected)
        assert not in_pool(table["small"])
        del got


def test_process_pool_executor_under_spawn(auto):
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        out = list(ex.map(describe, [big(9), SMALL]))
    check_received(*out[0], big(9))
    check_received(*out[1], SMALL)


def joblib_task(x):
    """describe(), plus the files that joblib's memmapping folders hold now."""
    from joblib._memmapping_reducer import SYSTEM_SHARED_MEM_FS

    files = []
    for root in {SYSTEM_SHARED_MEM_FS, tempfile.gettempdir()}:
        for name in os.listdir(root):
            if name.startswith("joblib_memmapping_folder_"):
                for _, _, names in os.walk(os.path.join(root, name)):
                    files += names
    return describe(x), files


def test_joblib_loky_inputs_and_outputs_with_no_memmap_file(auto):
    import joblib
    from joblib.externals.loky import get_reusable_executor

    sent = [big(10), SMALL, big(11), big(12)]
    try:
        out = joblib.Parallel(n_jobs=2)(joblib.delayed(joblib_task)(a) for a in sent)
        out += joblib.Parallel(n_jobs=2, max_nbytes=None)(
            joblib.delayed(joblib_task)(a) for a in sent[:2]
        )
        # loky used directly, without joblib's reducers.
        direct = get_reusable_executor(2).submit(describe, big(13)).result()
    finally:
        # loky keeps its workers (started in auto mode) for the next call: stop them.
        get_reusable_executor(reuse=True).shutdown(wait=True)
    for (described, files), a in zip(out, sent + sent[:2], strict=True):
        check_received(*described, a)
        assert files == []
    check_received(*direct, big(13))


# --- an unchanged program, PYARRAYPOOL_AUTO in its environment ---------------

UNCHANGED = """
import multiprocessing, os, sys, tempfile
import numpy as np

def report(x):
    return (type(x).__name__, type(x.base).__name__, "pyarraypool" in sys.modules,
            float(x.sum())), x * 2

def main():
    x = np.ones(1 << 17)
    for method in ("spawn", "forkserver"):
        with multiprocessing.get_context(method).Pool(2) as pool:
            (seen, back), = pool.map(report, [x])
        print(method, *seen, type(back).__name__, type(back.base).__name__)
    from joblib import Parallel, delayed
    (seen, back), = Parallel(n_jobs=2)(delayed(report)(x) for _ in range(1))
    print("joblib", *seen, type(back).__name__, type(back.base).__name__)
    print("parent", "pyarraypool" in sys.modules, "_pyarraypool_autostart" in sys.modules)

if __name__ == "__main__":
    main()
"""


def auto_pth_installed() -> bool:
    return os.path.exists(os.path.join(sysconfig.get_paths()["purelib"], "pyarraypool_auto.pth"))


@pytest.fixture
def unchanged_program(tmp_path):
    assert auto_pth_installed(), "pyarraypool_auto.pth is not in site-packages: run `make install`"
    path = tmp_path / "program.py"
    path.write_text(UNCHANGED)

    def run(value: str | None) -> subprocess.CompletedProcess[str]:
        env = fresh_env() if value is None else fresh_env(PYARRAYPOOL_AUTO=value)
        return subprocess.run([sys.executable, str(path)], env=env, capture_output=True,
                              text=True, timeout=180, cwd=tmp_path)

    return run


def test_unchanged_program_sends_through_the_pool(unchanged_program, shm_names):
    # This process's own pool may give an idle segment back (its decay) while
    # the program runs, on a loaded machine or when an earlier test left it
    # idle just before: names may go. The program must leave none.
    before = shm_names()
    proc = unchanged_program("64K")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.split("\n")
    for i, how in enumerate(["spawn", "forkserver", "joblib"]):
        assert lines[i] == f"{how} ndarray _Block True 131072.0 ndarray _Block"
    assert lines[3] == "parent True True"
    assert shm_names() - before == set()


def test_unchanged_program_without_the_variable_pays_nothing(unchanged_program):
    proc = unchanged_program(None)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert lines[0] == "spawn ndarray bytes False 131072.0 ndarray bytes"  # pickled by value
    assert lines[3] == "parent False False"
    # A program that does not use numpy does not load it, set or not.
    probe = "import sys; print('numpy' in sys.modules, 'pyarraypool' in sys.modules)"
    for value in (None, "64K"):
        env = fresh_env() if value is None else fresh_env(PYARRAYPOOL_AUTO=value)
        out = run_python(probe, env=env)
        assert out.stdout.strip() == "False False"
        assert out.stderr == ""


def test_joblib_imported_first_is_hooked():
    # `import joblib` imports numpy and multiprocessing from inside
    # joblib._memmapping_reducer, so auto mode turns on while the module it
    # must then hook is still executing.
    out = run_python(
        """
        import joblib
        import sys
        import numpy as np
        from joblib import _memmapping_reducer as jmr
        from joblib.externals.loky.backend import reduction
        print(sys.modules["pyarraypool"].installed(),
              type(jmr.reduce_array_memmap_backward).__name__,
              jmr.ArrayMemmapForwardReducer.__call__.__module__,
              type(reduction._dispatch_table.get(np.ndarray)).__name__)
        """,
        env=fresh_env(PYARRAYPOOL_AUTO="64K"),
    )
    assert out.stdout.split() == ["65536", "_JoblibBackward", "pyarraypool._auto", "_LokyReducer"]
    assert out.stderr == ""


@pytest.mark.parametrize("value", ["0", "off", ""])
def test_off_values_leave_auto_mode_off(value):
    out = run_python(
        "import sys, numpy, multiprocessing; print('pyarraypool' in sys.modules)",
        env=fresh_env(PYARRAYPOOL_AUTO=value),
    )
    assert out.stdout.strip() == "False" and out.stderr == ""


def test_on_values_mean_the_default_threshold():
    out = run_python(
        """
        import numpy, multiprocessing, pyarraypool
        print(pyarraypool.installed())
        """,
        env=fresh_env(PYARRAYPOOL_AUTO="yes"),
    )
    assert out.stdout.strip() == "65536" and out.stderr == ""


BAD_VALUE = """
import multiprocessing, sys
import numpy as np

def twice(x):
    return x * 2

if __name__ == "__main__":
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        y = pool.apply(twice, (np.ones(1 << 17),))
    assert (y == 2).all()
    import pyarraypool
    print(pyarraypool.installed(), type(y.base).__name__ == "_Block")
"""


def test_a_bad_value_warns_once_and_the_program_works(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(BAD_VALUE)
    proc = subprocess.run([sys.executable, str(path)], env=fresh_env(PYARRAYPOOL_AUTO="lots"),
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None False"
    assert proc.stderr.count("RuntimeWarning") == 1, proc.stderr
    assert "PYARRAYPOOL_AUTO='lots'" in proc.stderr


def test_a_full_pool_sends_by_value():
    out = run_python(
        """
        import multiprocessing, sys
        import numpy as np
        import pyarraypool
        pyarraypool.install("64K")

        def child(conn):
            while (x := conn.recv()) is not None:
                conn.send((type(x.base).__name__ == "_Block", float(x.sum())))

        if __name__ == "__main__":
            ctx = multiprocessing.get_context("fork")
            parent, other = ctx.Pipe()
            p = ctx.Process(target=child, args=(other,))
            p.start()
            for n in (1 << 15, 1 << 19, 1 << 15):  # 256 KiB, 4 MiB (over max_bytes), 256 KiB
                parent.send(np.ones(n))
                print(*parent.recv())
            parent.send(None)
            p.join()
        """,
        env=fresh_env(PYARRAYPOOL_MAX_BYTES="2M"),
    )
    assert out.stdout.split("\n")[:3] == ["True 32768.0", "False 524288.0", "True 32768.0"]
    assert out.stderr == ""
