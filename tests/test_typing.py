"""The package is typed: py.typed, a stub for the extension, shapes and dtypes that
flow through `mypy --strict`, and examples/ that pass it.

The static cases live in tests/typing_cases.py; mypy runs as a subprocess (as a
user's CI would), with its cache under build/ so that reruns are quick.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import REPO

import pyarraypool

CASES = os.path.join(REPO, "tests", "typing_cases.py")
EXAMPLES = sorted(glob.glob(os.path.join(REPO, "examples", "*.py")))


def run_mypy(*targets: str) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("mypy", reason="mypy is not installed in this venv (make typecheck has it)")
    cmd = [sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
           "--cache-dir", os.path.join(REPO, "build", "mypy-cache-typing"), *targets]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_package_ships_its_type_information() -> None:
    package = os.path.dirname(pyarraypool.__file__)
    assert os.path.isfile(os.path.join(package, "py.typed"))
    assert os.path.isfile(os.path.join(package, "_core.pyi"))


def test_shapes_and_dtypes_flow_through_mypy_strict() -> None:
    proc = run_mypy(CASES)
    assert proc.returncode == 0, f"mypy --strict {CASES}:\n{proc.stdout}{proc.stderr}"


def test_mypy_rejects_a_wrong_dtype(tmp_path) -> None:
    # The cases above would pass trivially if the types were Any: a wrong
    # claim about a dtype and a shape must be an error.
    wrong = tmp_path / "wrong.py"
    wrong.write_text(textwrap.dedent("""
        from typing_extensions import assert_type  # typing's from 3.11 on; mypy has both
        import numpy as np
        import pyarraypool
        from pyarraypool import TransferableArray

        x = pyarraypool.make_transferable(np.zeros(3, np.float32))
        assert_type(x, TransferableArray[tuple[int], np.dtype[np.float64]])
        z = pyarraypool.zeros((2, 3), np.int8)
        assert_type(z, TransferableArray[tuple[int], np.dtype[np.int8]])
    """))
    proc = run_mypy(str(wrong))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stdout.splitlines() if "[assert-type]" in line]
    assert len(errors) == 2, proc.stdout
    # (mypy spells float32 as floating[_32Bit].)
    assert "floating[_32Bit]" in errors[0] and "tuple[int, int]" in errors[1]


def test_the_cases_hold_at_run_time() -> None:
    sys.path.insert(0, os.path.dirname(CASES))
    try:
        import typing_cases
    finally:
        sys.path.remove(os.path.dirname(CASES))
    typing_cases.check_cases()


@pytest.mark.skipif(not EXAMPLES, reason="examples/ has no scripts")
def test_examples_pass_mypy_strict() -> None:
    proc = run_mypy(*EXAMPLES)
    assert proc.returncode == 0, f"mypy --strict examples/:\n{proc.stdout}{proc.stderr}"
