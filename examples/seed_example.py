"""The proof of concept's example, unchanged, plus a check and a timing.

Eight workers each write one plane of a shared 100x200x500 float64 array;
the parent then checks every plane. `make demo` runs it under each start
method and times it against sending the planes by plain pickling.
"""

import multiprocessing
import sys
import time

import numpy as np
import numpy.typing as npt

import pyarraypool


def task(x: npt.NDArray[np.float64], i: int, value: int) -> None:
    # Define a dummy task than read and write to shared numpy array
    x[i, :, :] = value


def main() -> npt.NDArray[np.float64]:
    arr = np.random.random((100, 200, 500))
    I, J, K = arr.shape  # noqa: E741 (the seed's names)
    with multiprocessing.Pool(processes=8) as pool:
        # Transfer the array to shared memory.
        #
        # Segment will be created automatically on first `make_transferable` call.
        shmarr = pyarraypool.make_transferable(arr)
        # Apply task to array
        pool.starmap(task, [
            (shmarr, i, i) for i in range(I)
        ])
    return shmarr


def pickled_task(plane: npt.NDArray[np.float64], i: int, value: int) -> npt.NDArray[np.float64]:
    plane[:, :] = value
    return plane


def main_with_pickle() -> npt.NDArray[np.float64]:
    """The same work when the array travels by value: each plane goes to a
    worker and back, since the worker's writes would otherwise be lost."""
    arr = np.random.random((100, 200, 500))
    with multiprocessing.Pool(processes=8) as pool:
        planes = pool.starmap(pickled_task, [(arr[i], i, i) for i in range(arr.shape[0])])
    for i, plane in enumerate(planes):
        arr[i] = plane
    return arr


def check(result: npt.NDArray[np.float64]) -> None:
    expected = np.arange(result.shape[0], dtype=float)[:, None, None]
    if not np.array_equal(result, np.broadcast_to(expected, result.shape)):
        sys.exit("FAILED: the parent does not see every plane the workers wrote")


if __name__ == "__main__":
    methods = sys.argv[1:] or ["fork", "spawn", "forkserver"]
    for method in methods:
        multiprocessing.set_start_method(method, force=True)
        t0 = time.perf_counter()
        result = main()
        t_pool = time.perf_counter() - t0
        check(result)
        del result
        t0 = time.perf_counter()
        check(main_with_pickle())
        t_pickle = time.perf_counter() - t0
        print(f"{method:>10}: pyarraypool {t_pool * 1e3:7.1f} ms"
              f"   plain pickle {t_pickle * 1e3:7.1f} ms   every plane checked")
    s = pyarraypool.stats()
    print(f"pool after the runs: {s.used_bytes} bytes used in {s.live_blocks} blocks")
