"""Checks of the built distributions, for `make dist-check` (pytest does not collect it).

    python smoke_installed.py                      # in a venv where pyarraypool is installed
    python smoke_installed.py --check-wheel WHEEL  # what the wheel must hold, and its tags
    python smoke_installed.py --check-sdist SDIST  # what the sdist must hold (run in the repo)

The first form must run from outside the source tree (make dist-check copies this
file to a temporary directory), so that `import pyarraypool` finds the installed
package: it fails if the package came from anywhere but the running venv.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tarfile
import zipfile

import numpy as np


def _double_and_answer(x: np.ndarray) -> np.ndarray:
    """In the spawn child: write into the shared block, answer with a new pool array."""
    import pyarraypool

    x *= 2
    y = pyarraypool.empty(x.shape, x.dtype)
    y[...] = x + 1
    return y


def smoke() -> None:
    import pyarraypool

    where = os.path.realpath(pyarraypool.__file__)
    prefix = os.path.realpath(sys.prefix)
    if not where.startswith(prefix + os.sep):
        sys.exit(f"FAIL: pyarraypool imported from {where}, not from the venv {prefix}")
    print(f"pyarraypool {pyarraypool.__version__} from {where}, "
          f"python {platform.python_version()}, numpy {np.__version__}")

    before = pyarraypool.stats()
    # For make dist-check, which checks that this pool leaves nothing in /dev/shm.
    print(f"pool {pyarraypool._core._pool_token()}", flush=True)
    x = pyarraypool.make_transferable(np.arange(100_000, dtype=np.float64))
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        y = pool.apply(_double_and_answer, (x,))
        during = pyarraypool.stats()
    expected = np.arange(100_000, dtype=np.float64) * 2
    if not np.array_equal(x, expected):
        sys.exit("FAIL: the parent does not see the child's writes")
    if type(y) is not pyarraypool.TransferableArray or not np.array_equal(y, expected + 1):
        sys.exit(f"FAIL: the child's answer came back wrong: {type(y)}")
    # Both arrays in the pool, and the spawn worker attached to the same pool.
    if during.live_blocks < before.live_blocks + 2 or during.processes < 2:
        sys.exit(f"FAIL: stats during the run: {during}")

    del x, y
    pyarraypool.collect()
    after = pyarraypool.stats()
    if (after.used_bytes, after.live_blocks, after.pending_transfers) != (
        before.used_bytes,
        before.live_blocks,
        0,
    ):
        sys.exit(f"FAIL: the pool did not get its bytes back:\nbefore {before}\nafter  {after}")
    smoke_auto_mode()
    print("smoke test passed")


# A program that never imports pyarraypool: under PYARRAYPOOL_AUTO the
# installed .pth file turns auto mode on in it and in its spawn worker, whose
# answer comes back in the pool.
UNCHANGED_PROGRAM = """
import multiprocessing, sys
import numpy as np
x = np.arange(1 << 17, dtype=np.float64)
with multiprocessing.get_context("spawn").Pool(1) as pool:
    y = pool.apply(np.negative, (x,))
assert type(y) is np.ndarray and (y == -x).all()
print(type(y.base).__name__, sys.modules["pyarraypool"]._core._pool_token())
"""


def smoke_auto_mode() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYARRAYPOOL_")}
    env["PYARRAYPOOL_AUTO"] = "64K"
    proc = subprocess.run([sys.executable, "-c", UNCHANGED_PROGRAM], env=env,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or proc.stderr:
        sys.exit(f"FAIL: the unchanged program under PYARRAYPOOL_AUTO:\n{proc.stderr}")
    kind, token = proc.stdout.split()
    if kind != "_Block":
        sys.exit(f"FAIL: under PYARRAYPOOL_AUTO the worker's answer came back by value ({kind})")
    left = glob.glob(f"/dev/shm/pyarraypool-{token}*")
    if left:
        sys.exit(f"FAIL: the unchanged program left {left} in /dev/shm")
    print("auto mode: an unchanged program's spawn worker answered through the pool")


def _need(names: list[str], patterns: list[str], what: str) -> None:
    missing = [p for p in patterns if not fnmatch.filter(names, p)]
    if missing:
        sys.exit(f"FAIL: {what} lacks {missing}")


# At the root of the wheel (so of site-packages), and of the sdist.
AUTO_FILES = ["pyarraypool_auto.pth", "_pyarraypool_autostart.py"]


def check_wheel(path: str) -> None:
    """The wheel's contents, and its tags: this Python's, and a manylinux platform.

    Run with the Python the wheel was built for (make dist-check uses that venv).
    """
    cp = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    # name-version-pyTAG-abiTAG-platformTAG.whl; auditwheel may join several
    # platform tags with dots (manylinux_2_17_x86_64.manylinux2014_x86_64).
    match = re.fullmatch(r"pyarraypool-[^-]+-(\w+)-(\w+)-([\w.]+)\.whl", os.path.basename(path))
    if not match:
        sys.exit(f"FAIL: {path} is not named like a wheel")
    py_tag, abi_tag, plat_tags = match.groups()
    if (py_tag, abi_tag) != (cp, cp):
        sys.exit(f"FAIL: {path} is tagged {py_tag}-{abi_tag}, not {cp}-{cp} (this Python)")
    machine = platform.machine()
    plats = plat_tags.split(".")
    if not all(re.fullmatch(r"manylinux(_\d+_\d+|2014|2010|1)_" + machine, p) for p in plats):
        sys.exit(f"FAIL: {path}: platform tag {plat_tags} is not manylinux_*_{machine} "
                 "(was the wheel repaired with auditwheel?)")
    names = zipfile.ZipFile(path).namelist()
    _need(
        names,
        ["pyarraypool/_core.cpython-*.so", "pyarraypool/py.typed", "pyarraypool/_core.pyi",
         "pyarraypool/__init__.py", "*.dist-info/METADATA"] + AUTO_FILES,
        path,
    )
    so = [n for n in names if n.startswith("pyarraypool/_core.") and n.endswith(".so")]
    if so != [f"pyarraypool/_core.cpython-{cp[2:]}-{machine}-linux-gnu.so"]:
        sys.exit(f"FAIL: {path}: the extension is {so}, not built for {cp}")
    print(f"{path}: {cp}-{cp}-{plat_tags}, {len(names)} files, "
          "extension, py.typed, stub and auto mode's files present")


def check_sdist(path: str) -> None:
    with tarfile.open(path) as tar:
        # Drop the leading "pyarraypool-<version>/".
        names = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = []
    for root, _, files in os.walk(os.path.join(repo, "csrc")):
        sources += [
            os.path.relpath(os.path.join(root, f), repo)
            for f in files
            if f.endswith((".hpp", ".cpp"))
        ]
    _need(
        names,
        sorted(sources) + ["setup.py", "pyproject.toml", "README.md", "MANIFEST.in",
                           "pyarraypool/py.typed", "pyarraypool/_core.pyi"] + AUTO_FILES,
        path,
    )
    print(f"{path}: {len(names)} entries, all {len(sources)} C++ sources and headers present")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check-wheel", metavar="WHEEL")
    group.add_argument("--check-sdist", metavar="SDIST")
    args = parser.parse_args()
    if args.check_wheel:
        check_wheel(args.check_wheel)
    elif args.check_sdist:
        check_sdist(args.check_sdist)
    else:
        smoke()


if __name__ == "__main__":
    main()
