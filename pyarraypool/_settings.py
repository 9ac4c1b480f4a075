"""Pool settings: defaults, size strings and the ``PYARRAYPOOL_*`` variables."""

from __future__ import annotations

import os
import re

__all__ = [
    "parse_size",
    "default_max_bytes",
    "DEFAULT_SEGMENT_BYTES",
    "DEFAULT_TRANSFER_TIMEOUT",
    "DEFAULT_DECAY",
]

DEFAULT_SEGMENT_BYTES = 64 << 20
#: Seconds a pickle made with ``transfer_required=True`` keeps its block alive
#: if it is never loaded (a terminated pool's queued tasks, a pickle used only
#: for hashing).
DEFAULT_TRANSFER_TIMEOUT = 300.0
#: Seconds free pool memory stays reserved before it goes back to the system
#: (like jemalloc's dirty-page decay: long enough that a loop reusing the
#: same memory never gives it back, short enough that an idle program holds
#: almost nothing).
DEFAULT_DECAY = 2.0

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as ``"512M"``, ``"2G"``, ``"1.5GiB"``.

    Units are binary (K = 1024).
    """
    if isinstance(value, bool):
        raise TypeError("a size must be an int or a string like '512M'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = _SIZE.match(value)
        if not m:
            raise ValueError(f"cannot read {value!r} as a size (examples: 4096, '512M', '2G')")
        size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    else:
        kind = type(value).__name__
        raise TypeError(f"a size must be an int or a string like '512M', not {kind}")
    if size <= 0:
        raise ValueError(f"a size must be positive, got {value!r}")
    if size >= 1 << 63:
        raise ValueError(f"a size must be below 2**63 bytes, got {value!r}")
    return size


def default_max_bytes() -> int:
    """The size of /dev/shm: the pool may use all of it unless told otherwise."""
    try:
        st = os.statvfs("/dev/shm")
        return max(st.f_blocks * st.f_frsize, 1 << 20)
    except OSError:
        return 1 << 30


def settings_from_env() -> dict[str, int | float]:
    """Settings given by ``PYARRAYPOOL_MAX_BYTES``, ``_SEGMENT_BYTES``, ``_TRANSFER_TIMEOUT``,
    ``_DECAY``."""
    out: dict[str, int | float] = {}
    for key in ("max_bytes", "segment_bytes"):
        raw = os.environ.get("PYARRAYPOOL_" + key.upper())
        if raw:
            out[key] = parse_size(raw)
    raw = os.environ.get("PYARRAYPOOL_TRANSFER_TIMEOUT")
    if raw:
        timeout = float(raw)
        if not timeout > 0:
            raise ValueError("PYARRAYPOOL_TRANSFER_TIMEOUT must be a positive number of seconds")
        out["transfer_timeout"] = timeout
    raw = os.environ.get("PYARRAYPOOL_DECAY")
    if raw:
        out["decay"] = check_decay(float(raw), "PYARRAYPOOL_DECAY")
    return out


def check_decay(value: float, name: str = "decay") -> float:
    """`value` if it is a usable decay time (seconds, 0 or more)."""
    if not (value >= 0 and value < 1e9):
        raise ValueError(f"{name} must be a number of seconds, 0 or more")
    return value
