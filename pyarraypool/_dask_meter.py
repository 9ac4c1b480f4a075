"""Counts the bytes this process's Dask TCP comms write (tests, bench).

Distributed's own transfer counters report the size of the objects moved
(``sizeof``), not what went over the wire; a pool array sent by handle is
still counted at its full size there. This meter adds up what
``TCP.write`` reports it wrote, by the comm's local address: the comms a
worker accepted on its listening address are the ones on which it serves
``get_data`` to other workers and clients.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from distributed.comm.tcp import TCP

_lock = threading.Lock()
_written: collections.Counter[str] = collections.Counter()  # by local address
_original_write: Any = None


async def _metered_write(self: TCP, *args: Any, **kwargs: Any) -> int:
    n: int = await _original_write(self, *args, **kwargs)
    with _lock:
        _written[self.local_address] += n
    return n


def start() -> None:
    """Starts counting in this process (idempotent) from zero."""
    global _original_write
    with _lock:
        if _original_write is None:
            _original_write = TCP.write
            TCP.write = _metered_write  # type: ignore[method-assign]
        _written.clear()


def written(local_address: str | None = None) -> int:
    """Bytes written since `start()`, on all comms or on those whose local address is given."""
    with _lock:
        if local_address is None:
            return sum(_written.values())
        return _written[local_address]
