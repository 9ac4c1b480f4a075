"""A two-stage joblib pipeline (loky backend) over pool arrays.

The input, 8 chunks of 250,000 int64 (2 MB each, above joblib's 1 MB
threshold for dumping arrays to memory-mapped files), lives in the pool.
Stage one squares each chunk into a new pool array made in the worker by
`pyarraypool.empty_like` and returns it; stage two receives those results
and writes their running sums into pool arrays of its own. Every argument
and every result crosses as a handle: joblib neither copies the data through
its pipes nor dumps it to a file. The parent checks both stages exactly, then
stops loky's workers, which joblib otherwise keeps alive for the next call.

    python examples/joblib_pipeline.py
"""

from __future__ import annotations

import sys

import joblib  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt
from joblib.externals.loky import get_reusable_executor  # type: ignore[import-untyped]

import pyarraypool

CHUNKS = 8
CHUNK = 250_000
WORKERS = 2


def square(chunk: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Stage one, in a worker: the result is made in the pool and returned by handle."""
    if not isinstance(chunk, pyarraypool.TransferableArray):
        raise TypeError(f"the chunk arrived as a {type(chunk).__name__}, by value")
    out = pyarraypool.empty_like(chunk)
    np.multiply(chunk, chunk, out=out)
    return out


def running_sum(squared: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Stage two, in a worker, on what stage one returned."""
    if not isinstance(squared, pyarraypool.TransferableArray):
        raise TypeError(f"stage one's result arrived as a {type(squared).__name__}, by value")
    out = pyarraypool.empty_like(squared)
    np.cumsum(squared, out=out)
    return out


def main() -> None:
    used_before = pyarraypool.stats().used_bytes
    plain = np.arange(CHUNKS * CHUNK, dtype=np.int64).reshape(CHUNKS, CHUNK) % 1000
    data = pyarraypool.make_transferable(plain)
    try:
        parallel = joblib.Parallel(n_jobs=WORKERS, backend="loky")
        squares: list[npt.NDArray[np.int64]] = parallel(
            joblib.delayed(square)(data[i]) for i in range(CHUNKS)
        )
        sums: list[npt.NDArray[np.int64]] = parallel(
            joblib.delayed(running_sum)(s) for s in squares
        )
    finally:
        # Stop the workers now: loky keeps them for the next Parallel call.
        get_reusable_executor(reuse=True).shutdown(wait=True)

    for i in range(CHUNKS):
        for stage, got, want in (
            ("square", squares[i], plain[i] * plain[i]),
            ("running_sum", sums[i], np.cumsum(plain[i] * plain[i])),
        ):
            if not isinstance(got, pyarraypool.TransferableArray):
                sys.exit(f"FAILED: {stage} of chunk {i} came back as a {type(got).__name__}")
            if not np.array_equal(got, want):
                sys.exit(f"FAILED: wrong {stage} of chunk {i}")

    del data, squares, sums, got
    used = pyarraypool.stats().used_bytes
    if used != used_before:
        sys.exit(f"FAILED: {used - used_before} bytes still in use after the run")
    print(
        f"joblib_pipeline: {CHUNKS} chunks of {CHUNK} int64 through 2 loky stages "
        f"on {WORKERS} workers; every result checked"
    )


if __name__ == "__main__":
    main()
