"""Security: what a process of another user can do to a pool.

Contract point 17 (see /work/shared/guide/contract.md). Covered elsewhere,
not repeated here:

- every segment is mode 0600 and owned by its user, whatever the umask;
  names match ``pyarraypool-<32 hex>[-n]`` and two programs' tokens differ:
  ``test_cleanup.py::test_segments_are_private_and_unguessable`` and
  ``test_cleanup.py::test_my_own_pool_segments_are_private``;
- a handle pointing past its segment, at another segment, inside another
  block, or with a wrong generation is refused before any array is built:
  ``test_handles.py`` (MALFORMED, STALE and the hypothesis damage test).

Added here, with children run as other users (``setpriv``; needs root):
another user cannot attach to the pool, load a handle of it, or open,
unlink or list-and-clean its files, and finds the token in none of the
victim's /proc files; a user's own pool works next to another user's; and
a file that another user creates under one of the pool's names (they are
visible in /dev/shm) neither crashes the program nor gets mapped by it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import pwd
import re
import secrets
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
from helpers import REPO, fresh_env, my_pool_token, pool_files, run_python

import pyarraypool
from pyarraypool import _core

SETPRIV = shutil.which("setpriv")


def _account(name: str) -> tuple[int, int] | None:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


NOBODY = _account("nobody")
# A second unprivileged account, for a victim that is not root (root may
# unlink anything in /dev/shm, so it cannot show what a sticky /dev/shm does).
OTHER = next((a for a in (_account(n) for n in ("daemon", "bin", "sys", "games", "lp"))
              if a is not None and a[0] not in (0, (NOBODY or (-1,))[0])), None)


def as_user(account: tuple[int, int]) -> list[str]:
    uid, gid = account
    return [SETPRIV, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]


class OtherUserPython:
    """A Python and a PYTHONPATH with which another user imports numpy and
    pyarraypool (this one's build)."""

    def __init__(self, python: str, path: list[str], tmpdir: str | None,
                 libdir: str | None = None):
        self.python, self.path, self.tmpdir, self.libdir = python, path, tmpdir, libdir

    def env(self, **extra: str) -> dict[str, str]:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/",
               "PYTHONPATH": os.pathsep.join(self.path), "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONNOUSERSITE": "1", "LANG": "C.UTF-8"}
        if self.libdir:  # a copied interpreter's libpython (its RUNPATH names the original)
            env["LD_LIBRARY_PATH"] = self.libdir
        env.update(extra)
        return env

    def run(self, account, code: str, *, input: str = "", timeout: float = 60,
            **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(as_user(account) + [self.python, "-c", textwrap.dedent(code)],
                              input=input, env=self.env(**env), capture_output=True, text=True,
                              timeout=timeout, cwd="/")

    def popen(self, account, code: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(as_user(account) + [self.python, "-c", textwrap.dedent(code)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=self.env(**env), text=True, cwd="/")


PROBE = """
import os, sys, numpy, pyarraypool, pyarraypool._core
# The interpreter must be one this user may run again (children run it).
ok = os.access(sys.executable, os.X_OK) and os.access(sys.prefix, os.R_OK | os.X_OK)
print(os.geteuid(), numpy.__version__, int(ok), pyarraypool.__file__)
"""


def _copy_interpreter(dest: str) -> tuple[str, str]:
    """A copy of this interpreter (its executable, libpython, the standard
    library without site-packages and tests) under `dest`, for a user who
    may not read where it is installed (pyenv's under /root, mode 0700): the
    copy finds its standard library beside it. Returns (executable, libdir)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    base = sys.base_prefix
    os.makedirs(os.path.join(dest, "bin"))
    exe = os.path.join(dest, "bin", version)
    shutil.copy2(os.path.realpath(os.path.join(base, "bin", version)), exe)
    libdir = os.path.join(dest, "lib")
    shutil.copytree(os.path.join(base, "lib", version), os.path.join(libdir, version),
                    ignore=shutil.ignore_patterns("site-packages", "test", "__pycache__",
                                                  "idlelib", "tkinter", "turtledemo", "ensurepip"))
    for name in os.listdir(os.path.join(base, "lib")):
        if name.startswith(f"lib{version}") and ".so" in name:
            shutil.copy2(os.path.join(base, "lib", name), os.path.join(libdir, name))
    return exe, libdir


def _find_python(account) -> tuple[OtherUserPython | None, str]:
    """This interpreter if the other user may run it, else a system Python of
    the same version, else a copy of this one; the repository and numpy's
    site-packages in place if the other user may read them, else copies in a
    directory it can read."""
    site = os.path.dirname(os.path.dirname(np.__file__))
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    pythons = [os.path.realpath(sys.executable)]
    for d in ("/usr/local/bin", "/usr/bin", "/bin"):
        if os.path.exists(os.path.join(d, version)):
            pythons.append(os.path.join(d, version))
    tried = []
    for layout in ("in place", "copied", "copied with the interpreter"):
        tmpdir = None
        if layout == "in place":
            path = [REPO, site]
        else:
            tmpdir = tempfile.mkdtemp(prefix="pyarraypool-sec-")
            os.chmod(tmpdir, 0o755)
            shutil.copytree(os.path.join(REPO, "pyarraypool"),
                            os.path.join(tmpdir, "pyarraypool"),
                            ignore=shutil.ignore_patterns("__pycache__"))
            # The package imports auto mode's top-level module (beside it in
            # site-packages, at the root of the source tree).
            shutil.copy2(os.path.join(REPO, "_pyarraypool_autostart.py"), tmpdir)
            for name in os.listdir(site):
                if name == "numpy" or name.startswith("numpy.libs") or name.startswith("numpy-"):
                    src = os.path.join(site, name)
                    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(
                        src, os.path.join(tmpdir, name))
            for root, dirs, files in os.walk(tmpdir):
                for d in dirs:
                    os.chmod(os.path.join(root, d), 0o755)
                for f in files:
                    p = os.path.join(root, f)
                    os.chmod(p, os.stat(p).st_mode | 0o444)
            path = [tmpdir]
        candidates = [(python, None) for python in pythons]
        if layout == "copied with the interpreter":
            candidates = [_copy_interpreter(os.path.join(tmpdir, "python"))]
        for python, libdir in candidates:
            cand = OtherUserPython(python, path, tmpdir, libdir)
            try:
                r = cand.run(account, PROBE, timeout=60)
            except (OSError, subprocess.TimeoutExpired) as e:
                tried.append(f"{python} ({layout}): {e}")
                continue
            if r.returncode == 0 and r.stdout.split()[:3] == [str(account[0]), np.__version__, "1"]:
                return cand, ""
            tried.append(f"{python} ({layout}): exit {r.returncode}: "
                         f"{(r.stderr.strip().splitlines() or [''])[-1]}")
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return None, "; ".join(tried)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run children as other users (setpriv --reuid)"
    if SETPRIV is None:
        return "needs setpriv (util-linux) to run children as other users"
    if NOBODY is None or NOBODY[0] == 0:
        return "needs an unprivileged 'nobody' account"
    return None


@pytest.fixture(scope="module")
def other_python():
    why = _why_not()
    if why:
        if os.environ.get(REQUIRE_ROOT_ENV) == "1":
            pytest.fail(f"{REQUIRE_ROOT_ENV}=1 but {why}")
        pytest.skip(why)
    py, tried = _find_python(NOBODY)
    if py is None:
        why = f"user nobody cannot run a Python that imports numpy and pyarraypool: {tried}"
        # As root (CI), some layout always works: not finding one is a failure
        # of the test's own set-up, which must not pass as a skip.
        if os.environ.get(REQUIRE_ROOT_ENV) == "1":
            pytest.fail(f"{REQUIRE_ROOT_ENV}=1 but {why}")
        pytest.skip(why)
    yield py
    if py.tmpdir:
        shutil.rmtree(py.tmpdir, ignore_errors=True)


def foreign_files() -> list[str]:
    """Entries of /dev/shm named like pyarraypool's that root does not own."""
    out = []
    for n in os.listdir("/dev/shm"):
        if n.startswith("pyarraypool-"):
            try:
                if os.lstat("/dev/shm/" + n).st_uid != 0:
                    out.append(n)
            except FileNotFoundError:
                pass
    return out


ATTACK = r"""
import errno, json, os, pickle, sys
report = {"euid": os.geteuid(), "egid": os.getegid(), "groups": os.getgroups()}
def attempt(name, fn):
    try:
        value = fn()
    except BaseException as e:
        report[name] = {"raised": type(e).__name__,
                        "mro": [c.__name__ for c in type(e).__mro__],
                        "errno": getattr(e, "errno", None), "message": str(e)}
    else:
        report[name] = {"returned": repr(value)[:200]}
job = json.loads(sys.stdin.read())
token, pid = job["token"], job["pid"]
blob, handle = bytes.fromhex(job["blob"]), bytes.fromhex(job["handle"])
import numpy as np
import pyarraypool
from pyarraypool import _core
assert os.environ["PYARRAYPOOL_POOL"] == token
attempt("pickle.loads", lambda: pickle.loads(blob))
attempt("pickle.loads (transfer_required)", lambda: pickle.loads(bytes.fromhex(job["blob_tr"])))
attempt("_rebuild", lambda: _core._rebuild(handle, np.dtype(job["dtype"])))
attempt("stats", lambda: pyarraypool.stats())
attempt("empty", lambda: pyarraypool.empty(10))
attempt("collect", lambda: pyarraypool.collect())
attempt("_inspect", lambda: _core._inspect(token))
for suffix in ("", job["data_suffix"]):
    path = f"/dev/shm/pyarraypool-{token}{suffix}"
    attempt("open r " + suffix, lambda: open(path, "rb").read(64))
    attempt("open w " + suffix, lambda: open(path, "r+b"))
    attempt("unlink " + suffix, lambda: os.unlink(path))
    attempt("chmod " + suffix, lambda: os.chmod(path, 0o666))
for what in ("environ", "maps", "mem"):
    attempt("/proc " + what, lambda: open(f"/proc/{pid}/{what}", "rb").read(1 << 16))
attempt("_clean", lambda: _core._clean(False))
print("REPORT " + json.dumps(report))
"""


def test_another_user_cannot_attach_load_or_open_the_pool(other_python):
    """A child run as nobody gets a real pickle and the handle bytes of an
    array of this process's pool, with PYARRAYPOOL_POOL set to this pool's
    token: every way in raises PermissionError (EACCES) naming the segment —
    no crash, no array, no bytes — and this pool is unharmed."""
    token = my_pool_token()
    secret = np.arange(4096, dtype="<u8") * np.uint64(0x9E3779B97F4A7C15)
    x = pyarraypool.make_transferable(secret, transfer_required=False)
    blob = pickle.dumps(x)
    fn, (handle, dtype) = x.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    assert fn is _core._rebuild
    y = pyarraypool.make_transferable(secret)      # transfer_required: a pending pickle
    blob_tr = pickle.dumps(y)
    del y
    try:
        _attack_and_check(other_python, token, secret, x, blob, blob_tr, handle, dtype)
    finally:
        # Consume the pending pickle whatever happened (the pool-balance check).
        z = pickle.loads(blob_tr)
        np.testing.assert_array_equal(z, secret)


def _attack_and_check(other_python, token, secret, x, blob, blob_tr, handle, dtype):
    files = {n: os.stat("/dev/shm/" + n).st_ino for n in pool_files(token)}
    before = pyarraypool.stats()
    # The data segment's name is visible in /dev/shm once it exists: the
    # attacker may know it, and still must not open it.
    control = f"pyarraypool-{token}"
    data_suffix = next(n for n in files if n != control)[len(control):]
    job = dict(token=token, pid=os.getpid(), blob=blob.hex(), blob_tr=blob_tr.hex(),
               handle=handle.hex(), dtype=np.dtype(dtype).str, data_suffix=data_suffix)
    proc = other_python.run(NOBODY, ATTACK, input=json.dumps(job), PYARRAYPOOL_POOL=token)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")), None)
    assert line, proc.stdout + proc.stderr
    report = json.loads(line[len("REPORT "):])
    assert report["euid"] == NOBODY[0] and report["egid"] == NOBODY[1] and report["groups"] == []
    control = f"pyarraypool-{token}"

    def refused(name, *, errnos=(errno.EACCES,), names=None, kinds=("PermissionError",)):
        r = report[name]
        assert "raised" in r, f"{name}: another user got {r}"
        assert r["raised"] in kinds, (name, r)
        assert r["errno"] in errnos, (name, r)
        if names:
            assert any(n in r["message"] for n in names), (name, r)
        return r

    # Attaching: the pool's own functions all fail on its control segment.
    for name in ("pickle.loads", "pickle.loads (transfer_required)", "_rebuild", "stats",
                 "empty", "collect"):
        r = refused(name, names=[control])
        assert "Permission denied" in r["message"], r
        assert "OSError" in r["mro"], r
    # _inspect is a look at a pool that may not exist: refused too, or None.
    r = report["_inspect"]
    assert r.get("returned") == "None" or (
        r.get("raised") == "PermissionError" and r.get("errno") == errno.EACCES), r
    # The files: no reading, writing, unlinking (sticky /dev/shm), chmod.
    for suffix in ("", data_suffix):
        for op in ("open r ", "open w "):
            refused(op + suffix)
        refused("unlink " + suffix, errnos=(errno.EACCES, errno.EPERM))
        refused("chmod " + suffix, errnos=(errno.EPERM,))
    # The token is in the victim's environment and its mappings: not readable.
    for what in ("environ", "maps", "mem"):
        refused("/proc " + what, errnos=(errno.EACCES, errno.EPERM))
    # clean as nobody removes nothing of root's.
    assert report["_clean"] == {"returned": "[]"}, report["_clean"]

    # This pool is unharmed: same files, same data, the pending pickle intact.
    assert {n: os.stat("/dev/shm/" + n).st_ino for n in pool_files(token)} == files
    after = pyarraypool.stats()
    assert (after.used_bytes, after.live_blocks, after.pending_transfers) == (
        before.used_bytes, before.live_blocks, before.pending_transfers), (before, after)
    np.testing.assert_array_equal(x, secret)
    assert foreign_files() == [], foreign_files()


def test_another_users_own_pool_works_and_refuses_our_handles(other_python):
    """nobody, in a pool of its own, loads our handle: StaleHandleError (the
    pool id differs), never our bytes. Its pool works next to ours; its
    `python -m pyarraypool clean` and `stats` do not see or touch ours; it
    leaves nothing in /dev/shm."""
    token = my_pool_token()
    x = pyarraypool.make_transferable(np.arange(100.0), transfer_required=False)
    blob = pickle.dumps(x)
    files = pool_files(token)
    proc = other_python.run(NOBODY, """
        import json, os, pickle, subprocess, sys
        import numpy as np, pyarraypool
        blob = bytes.fromhex(sys.stdin.read())
        try:
            pickle.loads(blob)
        except pyarraypool.StaleHandleError as e:
            print("STALE", e)
        a = pyarraypool.make_transferable(np.arange(10.0))
        assert (a == np.arange(10.0)).all()
        s = pyarraypool.stats()
        me = pyarraypool._core._pool_token()
        names = sorted(n for n in os.listdir("/dev/shm") if n.startswith("pyarraypool-" + me))
        for n in names:
            st = os.stat("/dev/shm/" + n)
            assert st.st_uid == os.geteuid() and st.st_mode & 0o777 == 0o600, (n, st)
        for cmd in (["clean"], ["stats", "--json"]):
            r = subprocess.run([sys.executable, "-m", "pyarraypool", *cmd],
                               capture_output=True, text=True)
            print("CLI", cmd[0], r.returncode, json.dumps(r.stdout))
        print("TOKEN", me, len(names))
    """, input=blob.hex())
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    out = proc.stdout
    assert "STALE" in out, out
    theirs = next(ln.split()[1] for ln in out.splitlines() if ln.startswith("TOKEN "))
    assert theirs != token
    assert int(next(ln.split()[2] for ln in out.splitlines() if ln.startswith("TOKEN "))) >= 2
    cli = {ln.split()[1]: (int(ln.split()[2]), json.loads(ln.split(None, 3)[3]))
           for ln in out.splitlines() if ln.startswith("CLI ")}
    assert cli["clean"][0] == 0 and token not in cli["clean"][1], cli
    assert cli["stats"][0] == 0, cli
    listed = {d["pool"] for d in json.loads(cli["stats"][1])}
    assert listed == {theirs}, listed          # its own pool only, not root's
    assert pool_files(token) == files
    assert pool_files(theirs) == [], pool_files(theirs)
    assert foreign_files() == [], foreign_files()
    np.testing.assert_array_equal(x, np.arange(100.0))


# --- names are visible in /dev/shm: another user may take one first ------------------------

VICTIM = """
import os, sys, time
import numpy as np, pyarraypool
from pyarraypool import _core
pyarraypool.configure(segment_bytes="1M", max_bytes="64M")
small = pyarraypool.zeros(1000)
big = pyarraypool.empty(900_000, dtype=np.uint8)   # too large for the local cache
big[:] = 1
token = _core._pool_token()
print("TOKEN", token, flush=True)
sys.stdin.readline()                                # the other user acts now
GROW = {grow}
if GROW:
    try:
        more = pyarraypool.zeros(700_000, dtype=np.uint8)   # needs segment 1
    except Exception as e:
        print("GROW-ERROR", type(e).__name__, e, flush=True)
        raise
    seg = _core._block_of(more).segment
    name, = [n for n in os.listdir("/dev/shm") if n.startswith(f"pyarraypool-{{token}}-{{seg}}-")]
    st = os.stat("/dev/shm/" + name)
    print("GREW", seg, st.st_uid, oct(st.st_mode & 0o777), int(more.max()), flush=True)
    assert seg >= 1 and st.st_uid == os.geteuid() and st.st_mode & 0o777 == 0o600
    assert more.max() == 0, "the pool mapped bytes it did not write"
print("EXITING", flush=True)
# small, big (and more) are alive until the interpreter ends
"""

def _squat(other_python, token: str, index: int) -> str:
    """nobody creates /dev/shm/pyarraypool-<token>-<index>, 1 MiB of 0xAB, mode 0666."""
    name = f"pyarraypool-{token}-{index}"
    proc = other_python.run(NOBODY, f"""
        import os
        fd = os.open("/dev/shm/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
        os.fchmod(fd, 0o666)
        os.write(fd, b"\\xab" * (1 << 20))
        os.close(fd)
        print("SQUATTED")
    """)
    assert "SQUATTED" in proc.stdout, proc.stdout + proc.stderr
    return name


@pytest.fixture
def victim_python(other_python):
    if OTHER is None:
        pytest.skip("needs a second unprivileged account (daemon, bin, ...) as the victim")
    py, tried = _find_python(OTHER)
    if py is None:
        pytest.skip(f"the account {OTHER} cannot run a Python with numpy and pyarraypool: {tried}")
    yield py
    if py.tmpdir:
        shutil.rmtree(py.tmpdir, ignore_errors=True)


def _run_squatted_victim(other_python, victim_python, grow: bool):
    victim = victim_python.popen(OTHER, VICTIM.format(grow=grow))
    token = None
    squatted = []
    try:
        line = victim.stdout.readline()
        assert line.startswith("TOKEN "), line + victim.stderr.read()
        token = line.split()[1]
        squatted.append(_squat(other_python, token, 1))
        out, err = victim.communicate("go\n", timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        left = pool_files(token) if token else []
        for name in left:                   # as root: leave /dev/shm as found
            try:
                os.unlink("/dev/shm/" + name)
            except FileNotFoundError:
                pass
    return victim.returncode, line + out, err, [n for n in left if n not in squatted]


def test_a_file_squatting_a_pool_name_does_not_crash_the_program_at_exit(
        other_python, victim_python):
    """Another user creates a file under the pool's next data segment name
    (the control segment's name is visible in /dev/shm) that the pool never
    uses. The program (not root, so it cannot unlink that file in the
    sticky /dev/shm) must still exit normally and remove its own files."""
    status, out, err, left = _run_squatted_victim(other_python, victim_python, grow=False)
    assert "EXITING" in out, out + err
    assert status == 0 and "Segmentation fault" not in err, (
        f"exit {status} (SIGSEGV is -11)\nstdout:\n{out}\nstderr (first 3000 chars):\n{err[:3000]}")
    assert err.count("Exception ignored") == 0, err[:3000]
    assert left == [], f"the program left its own files behind: {left}"


def test_a_file_squatting_the_next_segment_name_is_never_mapped(other_python, victim_python):
    """The same squatted name, and the pool then needs that segment: it must
    not map the other user's file (whose bytes are 0xAB) and must not fail:
    the new segment is the program's own (its uid, mode 0600), zero-filled.
    The program exits normally and removes its own files."""
    status, out, err, left = _run_squatted_victim(other_python, victim_python, grow=True)
    assert "GROW-ERROR" not in out, f"the pool could not grow:\n{out}\n{err[:3000]}"
    assert "GREW" in out and "EXITING" in out, out + err[:3000]
    assert status == 0 and "Segmentation fault" not in err, (
        f"exit {status}\nstdout:\n{out}\nstderr (first 3000 chars):\n{err[:3000]}")
    assert left == [], f"the program left its own files behind: {left}"


# --- an attacker who owns (or can write) files under the pool's names ---------------------
#
# These run the attacker in a forked child of the test that drops to nobody
# with os.setgid/os.setuid: it needs no Python of its own, only file
# operations. The victim is root (CI runs as root), so the kernel's
# permissions never stop it from opening another user's file: only the
# pool's own checks (owner, mode, kind) do.

REQUIRE_ROOT_ENV = "PYARRAYPOOL_REQUIRE_ROOT_TESTS"
_POOL_INTERNAL = open(os.path.join(REPO, "csrc", "core", "pool_internal.hpp")).read()
LAYOUT_VERSION = int(re.search(r"kLayoutVersion = (\d+)", _POOL_INTERNAL).group(1))


def _layout(what: str) -> int:
    """A ControlHeader offset or size, from the static_asserts of pool_internal.hpp."""
    return int(re.search(rf"static_assert\({what} == (\d+)\)", _POOL_INTERNAL).group(1))


# ControlHeader offsets; kControlBytes: the header's pages, then one page per
# process slot (4096 of them).
OFF_NEEDS_REPAIR = 116
OFF_SEGMENT_COUNT = _layout(r"offsetof\(ControlHeader, segment_count\)")
OFF_SEGMENT_SIZES = OFF_SEGMENT_COUNT + 8
OFF_NONCES = OFF_SEGMENT_SIZES + 8 * 4096
OFF_ALLOC = _layout(r"offsetof\(ControlHeader, alloc\)")
CONTROL_BYTES = -(-_layout(r"sizeof\(ControlHeader\)") // 4096) * 4096 + 4096 * 4096
MAGIC = 0x31304C4F4F505041


@pytest.fixture
def root():
    """Skips (with the reason) unless root; PYARRAYPOOL_REQUIRE_ROOT_TESTS=1
    (set by .ci/run) turns that skip into a failure."""
    why = None
    if os.geteuid() != 0:
        why = "needs root: the attacker is a child that drops to user nobody"
    elif NOBODY is None or NOBODY[0] == 0:
        why = "needs an unprivileged 'nobody' account"
    if why:
        if os.environ.get(REQUIRE_ROOT_ENV) == "1":
            pytest.fail(f"{REQUIRE_ROOT_ENV}=1 but {why}")
        pytest.skip(why)


def as_nobody(fn) -> None:
    """Runs `fn()` in a forked child as nobody (no groups); raises if it fails."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        status = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY[1])
            os.setuid(NOBODY[0])
            fn()
            status = 0
        except BaseException as e:  # noqa: BLE001 (reported to the parent)
            os.write(w, f"{type(e).__name__}: {e}".encode())
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        why = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"the attacker failed: {why}"


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
    try:
        os.fchmod(fd, 0o666)
        os.write(fd, data)
    finally:
        os.close(fd)


def _forged_pool(token: str, data_bytes: int, nonce: int) -> bytes:
    """A control segment as an attacker writes it: a published, running pool
    whose one data segment is the attacker's file, and a repair pending (so
    the victim's first locked operation indexes that segment's free block)."""
    b = bytearray(CONTROL_BYTES)
    struct.pack_into("<QII16s", b, 0, MAGIC, LAYOUT_VERSION, CONTROL_BYTES, bytes.fromhex(token))
    struct.pack_into("<I", b, OFF_NEEDS_REPAIR, 1)
    struct.pack_into("<I", b, OFF_SEGMENT_COUNT, 1)
    struct.pack_into("<Q", b, OFF_SEGMENT_SIZES, data_bytes)
    struct.pack_into("<Q", b, OFF_NONCES, nonce)
    struct.pack_into("<Q", b, OFF_ALLOC + 8 + 4 * 40, 2**64 - 1)  # heads: rebuilt anyway
    return bytes(b)


VICTIM_OF_SQUAT = """
import numpy as np, pyarraypool
secret = np.full(1000, 0x5EC2E7, dtype="<u8")
try:
    x = pyarraypool.make_transferable(secret)
except pyarraypool.PoolError as e:
    print("POOLERROR", e, flush=True)
else:
    print("ATTACHED", flush=True)
"""


def _cleanup(names) -> None:
    for n in names:
        try:
            os.unlink("/dev/shm/" + n)
        except FileNotFoundError:
            pass


def test_files_another_user_made_first_are_refused(root):
    """(a) nobody creates a pool's control segment before the program starts
    (the name is known: given in PYARRAYPOOL_POOL, or a computed Dask name),
    world-writable, forged so that the pool's one data segment is nobody's
    file too. The program (root) must refuse with PoolError naming the file
    and its owner, never write its arrays into nobody's file, and not remove
    nobody's files."""
    token = secrets.token_hex(16)
    nonce = secrets.randbits(64)
    data_bytes = 1 << 20
    control = f"pyarraypool-{token}"
    data = f"{control}-0-{nonce:016x}"
    header = struct.pack("<QQ", data_bytes, 0)   # one free block over the whole file
    try:
        as_nobody(lambda: (_write_file("/dev/shm/" + data, header + bytes(data_bytes - 16)),
                           _write_file("/dev/shm/" + control,
                                       _forged_pool(token, data_bytes, nonce))))
        proc = run_python(VICTIM_OF_SQUAT, env=fresh_env(PYARRAYPOOL_POOL=token), check=False)
        assert proc.returncode == 0 and "Segmentation fault" not in proc.stderr, (
            proc.returncode, proc.stdout, proc.stderr[-3000:])
        assert "POOLERROR" in proc.stdout, proc.stdout + proc.stderr[-3000:]
        msg = proc.stdout
        assert control in msg and str(NOBODY[0]) in msg, msg
        with open("/dev/shm/" + data, "rb") as f:
            assert (0x5EC2E7).to_bytes(8, "little") not in f.read(), \
                "the program wrote its array into nobody's file"
        for n in (control, data):                    # still there, still nobody's
            assert os.lstat("/dev/shm/" + n).st_uid == NOBODY[0], n
        # `clean` does not remove another user's pool either.
        subprocess.run([sys.executable, "-m", "pyarraypool", "clean"], env=fresh_env(),
                       capture_output=True, check=True)
        assert os.path.exists("/dev/shm/" + control) and os.path.exists("/dev/shm/" + data)
    finally:
        _cleanup(pool_files(token))                  # nobody's files, and any of root's


VICTIM_TAMPERED = """
import os, sys
import numpy as np, pyarraypool
from pyarraypool import _core
pyarraypool.configure(segment_bytes="1M", max_bytes="64M")
keep = pyarraypool.empty(300_000, dtype=np.uint8)
for n in (1000, 5000, 70_000):
    pyarraypool.empty(n, dtype=np.uint8)             # freed again: free-list entries
print("TOKEN", _core._pool_token(), flush=True)
sys.stdin.readline()                                # the pool is tampered with now
errors = 0
for n in (70_000, 5000, 1000, 300_000, 3_000_000):
    try:
        pyarraypool.empty(n, dtype=np.uint8)[:] = 1
    except pyarraypool.PoolError as e:
        errors += 1
        print("POOLERROR", e, flush=True)
try:
    pyarraypool.stats(detail=True)
except pyarraypool.PoolError as e:
    errors += 1
    print("POOLERROR", e, flush=True)
print("ERRORS", errors, flush=True)   # those above 64 KiB miss the local cache
"""


def _tamper(path: str) -> None:
    """Writes garbage over the allocator index of a control segment: every
    free-list head and both bitmaps."""
    with open(path, "r+b") as f:
        f.seek(OFF_ALLOC)
        f.write(b"\xff" * 8 + b"\xff" * (4 * 40))   # every class claims blocks
        heads = b"".join(struct.pack("<Q", (7 << 48) | (i * 4096 + 8)) for i in range(40 * 32))
        f.write(heads)


def _run_tampered_victim(tamper) -> tuple[int, str, str]:
    victim = subprocess.Popen([sys.executable, "-c", VICTIM_TAMPERED], env=fresh_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    token = None
    try:
        line = victim.stdout.readline()
        assert line.startswith("TOKEN "), line + victim.stderr.read()
        token = line.split()[1]
        tamper(token)
        out, err = victim.communicate("go\n", timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        if token:
            _cleanup(pool_files(token))
    return victim.returncode, line + out, err


def test_a_pool_file_another_user_can_write_raises_pool_error(root):
    """(b) A pool file that another user can write (here: given to nobody
    and made world-writable, as a same-name file of the wrong owner and mode
    would be). nobody writes garbage over the allocator's index; the program
    raises PoolError (no crash, no hang), and a new process refuses the file."""
    def tamper(token):
        path = f"/dev/shm/pyarraypool-{token}"
        os.chown(path, NOBODY[0], NOBODY[1])
        os.chmod(path, 0o666)
        as_nobody(lambda: _tamper(path))
        proc = run_python(VICTIM_OF_SQUAT, env=fresh_env(PYARRAYPOOL_POOL=token), check=False)
        assert "POOLERROR" in proc.stdout and "owned by" in proc.stdout, (
            proc.returncode, proc.stdout, proc.stderr[-2000:])
    status, out, err = _run_tampered_victim(tamper)
    assert status == 0, f"exit {status} (SIGSEGV is -11)\n{out}\n{err[-3000:]}"
    assert re.search(r"ERRORS [4-6]", out), out + err[-3000:]


def test_own_pool_corrupted_through_dev_shm_raises_pool_error():
    """The same user (trusted, but buggy) writes garbage into the control
    segment of a running program's pool: PoolError, no crash."""
    status, out, err = _run_tampered_victim(lambda token: _tamper(f"/dev/shm/pyarraypool-{token}"))
    assert status == 0, f"exit {status} (SIGSEGV is -11)\n{out}\n{err[-3000:]}"
    assert re.search(r"ERRORS [4-6]", out) and "corrupt" in out, out + err[-3000:]


DASK_WORKER = """
import os, sys
import pyarraypool, pyarraypool.dask as d
from pyarraypool import _core
d._join_cluster_pool("tcp://10.1.2.3:8786")   # as a `dask worker --preload` does
pyarraypool.stats()
print("TOKEN", _core._pool_token(), flush=True)
sys.stdin.readline()
"""


def test_another_user_cannot_compute_a_dask_cluster_pool_name(root, tmp_path):
    """(c) The cluster pool of `dask worker --preload` workers was named by
    the scheduler address and the uid alone: another user could compute it
    and create the files first. Now a secret of the user's (a mode-0600 file
    in a private directory) is in the name: the old name is not the pool,
    and nobody can read the secret."""
    pytest.importorskip("distributed")
    env = fresh_env(HOME=str(tmp_path), XDG_RUNTIME_DIR="")
    worker = subprocess.Popen([sys.executable, "-c", DASK_WORKER], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    token = None
    try:
        line = worker.stdout.readline()
        assert line.startswith("TOKEN "), line + worker.stderr.read()
        token = line.split()[1]
        secret_file = tmp_path / ".cache" / "pyarraypool" / "dask-secret"

        def guess():
            old = hashlib.sha256(f"pyarraypool-dask\0tcp://10.1.2.3:8786\0{0}".encode())
            name = old.hexdigest()[:32]
            assert name != token, "the cluster pool still has the guessable name"
            assert not os.path.exists(f"/dev/shm/pyarraypool-{name}")
        as_nobody(guess)
        st = secret_file.stat()
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(secret_file.parent.stat().st_mode) == 0o700

        def attacker():
            try:
                open(secret_file, "rb").read()
            except PermissionError:
                pass
            else:
                raise AssertionError("nobody read the user's dask secret")
        as_nobody(attacker)
        worker.communicate("go\n", timeout=60)
        assert worker.returncode == 0, worker.stderr
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        if token:
            _cleanup(pool_files(token))
