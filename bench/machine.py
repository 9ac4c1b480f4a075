"""The machine a benchmark ran on, recorded next to its numbers.

Shared by bench_python.py, bench_e2e.py and report.py (they run as scripts
from bench/, so this directory is on sys.path).
"""

from __future__ import annotations

import datetime
import os
import platform


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _shm_bytes() -> int | None:
    try:
        st = os.statvfs("/dev/shm")
        return st.f_blocks * st.f_frsize
    except OSError:
        return None


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, object]:
    """CPU model, cores, memory, kernel, Python and numpy versions, load, time."""
    import numpy as np

    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "mem_total_bytes": _mem_total_bytes(),
        "dev_shm_bytes": _shm_bytes(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "load_avg": _load_avg(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
