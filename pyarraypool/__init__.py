"""pyarraypool: move numpy arrays between processes through a shared-memory pool.

>>> import pyarraypool, numpy as np
>>> x = pyarraypool.make_transferable(np.arange(10))   # one copy into the pool
>>> # pickling x (e.g. as a multiprocessing argument) sends a small handle;
>>> # the receiving process sees the same memory.
"""

from __future__ import annotations

from . import _lifecycle

_lifecycle.ensure_pool_name()

from . import _api, _auto  # noqa: E402
from ._api import (  # noqa: E402
    PoolStats,
    configure,
    empty,
    empty_like,
    stats,
    zeros,
    zeros_like,
)
from ._auto import DEFAULT_AUTO_MIN_BYTES, install, installed, uninstall  # noqa: E402
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
    "install",
    "uninstall",
    "installed",
    "DEFAULT_AUTO_MIN_BYTES",
    "PoolIdentity",
    "PoolStats",
    "PoolError",
    "PoolFullError",
    "StaleHandleError",
    "InvalidHandleError",
]


def _init_settings() -> None:
    # A PYARRAYPOOL_* value that cannot be read does not break the import:
    # the first use of the pool raises ValueError naming it (_api.py).
    _api.init_from_env()


_init_settings()
_lifecycle.install_hooks()
# Last, once the package is whole: PYARRAYPOOL_AUTO turns auto mode on (never raises).
_auto.install_from_env()
