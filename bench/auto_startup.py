"""What auto mode's .pth file costs at interpreter start (docs/auto.md).

    python bench/auto_startup.py PYTHON [RUNS]

PYTHON is the interpreter of a venv where pyarraypool is installed with its
pyarraypool_auto.pth (a wheel install, or `make install`'s .venv). Reports:
the time `site` takes to read and run the file with PYARRAYPOOL_AUTO unset
(timed in a loop inside PYTHON); whether `-X importtime -c pass` imports
anything more than without the file; and medians of RUNS (200) alternating
runs of `PYTHON -c pass` without the file, with it and the variable unset,
and with PYARRAYPOOL_AUTO=64K. The file is renamed away during the runs
without it, and always put back.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

PTH = "pyarraypool_auto.pth"

IN_PROCESS = """
import os, site, sysconfig, timeit
os.environ.pop("PYARRAYPOOL_AUTO", None)
d = sysconfig.get_paths()["purelib"]
n = 20000
t = min(timeit.repeat(lambda: site.addpackage(d, "pyarraypool_auto.pth", set()),
                      number=n, repeat=5)) / n
print(f"{t * 1e6:.1f}")
"""


def imports(python: str, env: dict[str, str]) -> list[str]:
    err = subprocess.run([python, "-X", "importtime", "-c", "pass"], env=env,
                         capture_output=True, text=True, check=True).stderr
    return sorted(line.rsplit("|", 1)[1].strip() for line in err.splitlines() if "|" in line)


def main() -> None:
    python = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    pth = os.path.join(site, PTH)
    away = pth + ".away"
    if not os.path.exists(pth):
        sys.exit(f"{pth} is missing: install pyarraypool in that venv first")
    unset = {k: v for k, v in os.environ.items() if not k.startswith("PYARRAYPOOL_")}
    on = dict(unset, PYARRAYPOOL_AUTO="64K")

    def start(env: dict[str, str]) -> float:
        t = time.perf_counter()
        subprocess.run([python, "-c", "pass"], env=env, check=True)
        return time.perf_counter() - t

    addpackage = subprocess.run([python, "-c", IN_PROCESS], env=unset, capture_output=True,
                                text=True, check=True).stdout.strip()
    print(f"site reads and runs {PTH}, variable unset: {addpackage} us")
    with_file = imports(python, unset)
    times: dict[str, list[float]] = {"no .pth": [], ".pth, unset": [], ".pth, PYARRAYPOOL_AUTO=64K": []}
    try:
        os.rename(pth, away)
        without_file = imports(python, unset)
        os.rename(away, pth)
        for _ in range(runs):
            os.rename(pth, away)
            times["no .pth"].append(start(unset))
            os.rename(away, pth)
            times[".pth, unset"].append(start(unset))
            times[".pth, PYARRAYPOOL_AUTO=64K"].append(start(on))
    finally:
        if os.path.exists(away):
            os.rename(away, pth)
    same = "the same" if with_file == without_file else "DIFFERENT"
    print(f"-X importtime -c pass, unset: {len(with_file)} modules with the file, "
          f"{len(without_file)} without ({same})")
    for name, values in times.items():
        q1, median, q3 = statistics.quantiles(values, n=4)
        print(f"python -c pass, {name:28s} median {median * 1e3:6.2f} ms "
              f"(quartiles {q1 * 1e3:.2f}, {q3 * 1e3:.2f})")


if __name__ == "__main__":
    main()
