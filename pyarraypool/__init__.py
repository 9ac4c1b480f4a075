"""pyarraypool: move numpy arrays between processes through a shared-memory pool.

>>> import pyarraypool, numpy as np
>>> x = pyarraypool.make_transferable(np.arange(10))   # one copy into the pool
>>> # pickling x (e.g. as a multiprocessing argument) sends a small handle;
>>> # the receiving process sees the same memory.
"""

from __future__ import annotations

from . import _lifecycle

_lifecycle.ensure_pool_name()

from . import _core  # noqa: E402
from ._api import (  # noqa: E402
    PoolStats,
    configure,
    empty,
    empty_like,
    stats,
    zeros,
    zeros_like,
)
from ._core import (  # noqa: E402
    InvalidHandleError,
    PoolError,
    PoolFullError,
    StaleHandleError,
    TransferableArray,
    collect,
    make_transferable,
)
from ._identity import PoolIdentity, pool_identity  # noqa: E402
from ._settings import (  # noqa: E402
    DEFAULT_DECAY,
    DEFAULT_SEGMENT_BYTES,
    DEFAULT_TRANSFER_TIMEOUT,
    default_max_bytes,
    settings_from_env,
)

__version__ = "0.1.0"

__all__ = [
    "make_transferable",
    "empty",
    "zeros",
    "empty_like",
    "zeros_like",
    "TransferableArray",
    "configure",
    "stats",
    "collect",
    "pool_identity",
    "PoolIdentity",
    "PoolStats",
    "PoolError",
    "PoolFullError",
    "StaleHandleError",
    "InvalidHandleError",
]


def _init_settings() -> None:
    env = settings_from_env()
    _core._configure(
        int(env.get("max_bytes", default_max_bytes())),
        int(env.get("segment_bytes", DEFAULT_SEGMENT_BYTES)),
        float(env.get("transfer_timeout", DEFAULT_TRANSFER_TIMEOUT)),
        False,  # only the settings for creating the pool; never attaches
        float(env.get("decay", DEFAULT_DECAY)),
    )


_init_settings()
_lifecycle.install_hooks()
