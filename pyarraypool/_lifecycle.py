"""How a process joins and leaves the program's pool.

All processes of one program share a pool named by ``PYARRAYPOOL_POOL``. The
first import in a program picks a fresh random name and puts it in
``os.environ``, so every process the program starts afterwards (fork, spawn,
forkserver, subprocess) inherits it; an unrelated program picks its own.
Importing does not touch shared memory: a process attaches on first use.

One exception to sharing: a process started by the program but not by
multiprocessing (a tool run with ``subprocess``), which has not used the pool
yet and calls ``configure()`` with settings other than those the program's
pool runs with, gets a fresh pool of its own (``take_own_pool``): it wants
its own settings, and would otherwise get a PoolError. multiprocessing and
concurrent.futures workers always share the program's pool.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.util as mp_util
import os
import secrets

from . import _core

ENV_POOL = "PYARRAYPOOL_POOL"
ENV_ROOT = "PYARRAYPOOL_ROOT"
# A pool shared by independent programs (a Dask cluster's host pool) has no
# root to keep it for: any value but "<pid>:<start time>" says so.
NO_ROOT = "none"


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def ensure_pool_name() -> str:
    name = os.environ.get(ENV_POOL, "")
    fresh = len(name) != 32 or any(c not in "0123456789abcdef" for c in name)
    if fresh:
        name = secrets.token_hex(16)
        os.environ[ENV_POOL] = name
    if fresh or ENV_ROOT not in os.environ:
        # This process started the program (or is the first to import us
        # under a name the user set): whichever process creates the pool
        # records it, so that a worker leaving last while its pickles are
        # still in flight keeps the pool for this one (pool.hpp, ProgramRoot).
        pid = os.getpid()
        # The pid namespace too: a process in another one (a container
        # sharing /dev/shm) cannot look this pid up, and must not judge it.
        try:
            pid_ns = os.stat("/proc/self/ns/pid").st_ino
        except OSError:
            pid_ns = 0
        os.environ[ENV_ROOT] = f"{pid}:{_start_time(pid)}:{pid_ns}"
    return name


def may_take_own_pool() -> bool:
    """Whether this process may leave the program's pool for one of its own:
    it inherited the name from the process that started it (the recorded
    root is another process, not "none"), is no worker of multiprocessing or
    concurrent.futures (those share the program's pool, contract point 12),
    and has not used the pool yet."""
    if multiprocessing.parent_process() is not None or _core._pool_token() is not None:
        return False
    root_pid = os.environ.get(ENV_ROOT, "").split(":", 1)[0]
    return root_pid.isdigit() and int(root_pid) != os.getpid()


def take_own_pool(why: str) -> str:
    """Moves this process (and what it starts from now on) to a fresh pool,
    of which it is the root; returns the new name."""
    old = os.environ.pop(ENV_POOL, "")
    os.environ.pop(ENV_ROOT, None)
    new = ensure_pool_name()
    logging.getLogger("pyarraypool").info(
        "pid %d leaves pool %s, inherited from the process that started it, for its own pool "
        "%s: %s. Pool arrays do not travel between the two pools by handle", os.getpid(), old,
        new, why)
    return new


def _leave_at_exit() -> None:
    # Leave the pool at exit, after multiprocessing has terminated and joined
    # its daemonic workers (finalizers with a negative priority run last):
    # a process that leaves while no other process that has not left needs
    # the pool unlinks every segment. No hold is dropped here (threads may
    # still use pool memory): the kernel ends our slot when the process is
    # gone, and the others reclaim.
    # multiprocessing's finalizers run only in the process that made them,
    # so a forked child makes its own.
    mp_util.Finalize(None, _core._shutdown, exitpriority=-100)


def _after_fork_child() -> None:
    # The child already owns its slot: the C extension's pthread_atfork
    # handler adopted it inside fork(), before any Python code ran here.
    _leave_at_exit()


def _after_multiprocessing_fork(_module: object) -> None:
    # multiprocessing clears the finalizer registry in the processes it forks,
    # after our os.register_at_fork hook ran; its after-fork hooks run later.
    _leave_at_exit()


def install_hooks() -> None:
    # fork(): the child must hold every block the parent holds at that
    # instant, before the parent can drop one (contract point 13).
    os.register_at_fork(before=_core._before_fork, after_in_child=_after_fork_child)
    mp_util.register_after_fork(_core, _after_multiprocessing_fork)
    _leave_at_exit()
