"""Which pool, on which host boot, this process uses.

Two processes can exchange handles only if they share a pool: the same
`boot_id` (one kernel, so one /dev/shm namespace at most) and the same pool
`instance`. The token alone is not enough: the same token can name two
different pools in two /dev/shm mounts (containers), or a pool recreated
after its program ended.
"""

from __future__ import annotations

from typing import TypedDict

from . import _core


class PoolIdentity(TypedDict):
    """Which pool a process uses, as returned by :func:`pool_identity` (a dict).

    Keys: ``token`` (32 hex digits: the pool's name, shared by a program's
    processes), ``instance`` (32 hex digits drawn when the pool was created)
    and ``boot_id`` (``/proc/sys/kernel/random/boot_id`` of this host boot).
    """

    token: str  # 32 hex digits: the pool's name, shared by a program's processes
    instance: str  # 32 hex digits drawn when the pool was created
    boot_id: str  # /proc/sys/kernel/random/boot_id of this host boot


def pool_identity() -> PoolIdentity:
    """The identity of this process's pool, attaching to it if needed.

    Equal identities mean a handle pickled in one process can be loaded in
    the other. The token alone is not enough: the same token can name two
    different pools in two /dev/shm mounts (containers), or a pool recreated
    after its program ended.

    Returns
    -------
    PoolIdentity
        A dict with the keys ``token``, ``instance`` and ``boot_id``.

    Raises
    ------
    PoolError
        The pool cannot be attached.
    """
    ident = _core._pool_identity()
    return PoolIdentity(token=ident["token"], instance=ident["instance"],
                        boot_id=ident["boot_id"])
