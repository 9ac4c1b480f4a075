"""multiprocessing.Pool: map, imap, starmap and apply_async with pool arrays."""

import multiprocessing

import numpy as np

import pyarraypool


def scale_row(args):
    x, i = args
    x[i] *= 2  # writes into the shared block: the parent sees it
    return i


def row_sum(x, i):
    return float(x[i].sum())  # reads shared memory; a float travels back


def make_tile(seed):
    out = pyarraypool.empty((256, 256))  # allocated in the pool by the worker
    out[:] = np.random.default_rng(seed).random((256, 256))
    return out  # travels back as a handle; the block waits for the parent


if __name__ == "__main__":
    x = pyarraypool.make_transferable(np.ones((8, 1000)))  # one copy into the pool
    with multiprocessing.Pool(4) as pool:
        pool.map(scale_row, [(x, i) for i in range(8)])  # map: one argument per task
        assert (x == 2).all()

        done = list(pool.imap(scale_row, [(x, i) for i in range(8)]))  # imap: lazily, in order
        assert done == list(range(8))
        assert (x == 4).all()

        sums = pool.starmap(row_sum, [(x, i) for i in range(8)])  # starmap: unpacked arguments
        assert sums == [4000.0] * 8

        pending = [pool.apply_async(make_tile, (seed,)) for seed in range(4)]  # apply_async
        tiles = [p.get() for p in pending]
    assert all(type(t) is pyarraypool.TransferableArray for t in tiles)
    print("Pool map/imap/starmap/apply_async: ok")
