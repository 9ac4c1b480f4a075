"""Pool settings: defaults, size strings and the ``PYARRAYPOOL_*`` variables."""

from __future__ import annotations

import os
import re

__all__ = ["parse_size", "parse_timeout", "parse_decay", "default_max_bytes", "env_settings",
           "DEFAULT_SEGMENT_BYTES", "DEFAULT_TRANSFER_TIMEOUT", "DEFAULT_DECAY"]

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


#: The setting each ``PYARRAYPOOL_*`` variable gives, and how it is read.
ENV_SETTINGS = {
    "max_bytes": "PYARRAYPOOL_MAX_BYTES",
    "segment_bytes": "PYARRAYPOOL_SEGMENT_BYTES",
    "transfer_timeout": "PYARRAYPOOL_TRANSFER_TIMEOUT",
    "decay": "PYARRAYPOOL_DECAY",
}


def parse_timeout(value: object) -> float:
    """Seconds, a positive number (``transfer_timeout``)."""
    timeout = float(value)  # type: ignore[arg-type]
    if not timeout > 0:
        raise ValueError(f"transfer_timeout must be a positive number of seconds, got {value!r}")
    return timeout


def parse_decay(value: object) -> float:
    """Seconds, 0 or more (``decay``: how long free memory stays reserved)."""
    decay = float(value)  # type: ignore[arg-type]
    if not (decay >= 0 and decay < 1e9):
        raise ValueError(f"decay must be a number of seconds, 0 or more, got {value!r}")
    return decay


_PARSERS = {"transfer_timeout": parse_timeout, "decay": parse_decay}


def env_settings() -> tuple[dict[str, int | float], dict[str, str]]:
    """The settings the ``PYARRAYPOOL_*`` variables give, and the ones they get
    wrong: ``(values, problems)``, each keyed by setting name; a problem is a
    message that names the variable and its value."""
    values: dict[str, int | float] = {}
    problems: dict[str, str] = {}
    for key, var in ENV_SETTINGS.items():
        raw = os.environ.get(var)
        if not raw:
            continue
        try:
            values[key] = _PARSERS.get(key, parse_size)(raw)
        except ValueError as e:
            problems[key] = f"{var}={raw!r} is not valid: {e}; fix or unset the variable"
    return values, problems

