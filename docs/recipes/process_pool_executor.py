"""concurrent.futures.ProcessPoolExecutor under each multiprocessing start method."""

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np

import pyarraypool


def normalize(x):
    x -= x.mean()  # in place, in shared memory
    return x  # the same block comes back by handle (a view travels as a view)


if __name__ == "__main__":
    for method in ("fork", "spawn", "forkserver"):
        ctx = multiprocessing.get_context(method)
        data = pyarraypool.make_transferable(np.random.default_rng(0).random((4, 100_000)))
        with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as ex:
            rows = list(ex.map(normalize, [data[i] for i in range(4)]))
        assert np.allclose(data.mean(axis=1), 0)  # the parent sees the workers' writes
        assert all(np.shares_memory(r, data) for r in rows)
        print(f"ProcessPoolExecutor ({method}): ok")
