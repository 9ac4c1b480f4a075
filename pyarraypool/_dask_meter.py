"""Counts the bytes this process's Dask TCP comms write, per peer (tests, bench).

Distributed's own transfer counters report the size of the objects moved
(``sizeof``), not what went over the wire; a pool array sent by handle is
still counted at its full size there. This meter adds up what
``TCP.write`` reports it wrote.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from distributed.comm.tcp import TCP

_lock = threading.Lock()
_written: collections.Counter[str] = collections.Counter()
_original_write: Any = None


async def _metered_write(self: TCP, *args: Any, **kwargs: Any) -> int:
    n: int = await _original_write(self, *args, **kwargs)
    with _lock:
        _written[self.peer_address] += n
    return n


def start() -> None:
    """Starts counting in this process (idempotent) from zero."""
    global _original_write
    with _lock:
        if _original_write is None:
            _original_write = TCP.write
            TCP.write = _metered_write  # type: ignore[method-assign]
        _written.clear()


def written() -> dict[str, int]:
    """Bytes written to each peer address since `start()`."""
    with _lock:
        return dict(_written)
