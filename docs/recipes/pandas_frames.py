"""A pandas DataFrame on pool arrays: send the arrays, rebuild the frame."""

import multiprocessing
import pickle

import numpy as np
import pandas as pd

import pyarraypool


def frame(columns, index):
    # copy=False: each column stays a view of its pool array.
    return pd.DataFrame(columns, index=index, copy=False)


def scale_in_place(columns, index, factor):
    df = frame(columns, index)          # no copy: the worker reads the pool memory
    columns["price"] *= factor          # write through the array, not the frame
    return float(df["price"].sum())


if __name__ == "__main__":
    n = 1_000_000
    columns = {
        "price": pyarraypool.make_transferable(np.linspace(1.0, 2.0, n)),
        "qty": pyarraypool.make_transferable(np.arange(n, dtype=np.int32)),
    }
    index = pd.RangeIndex(n)  # a large explicit index: send its values as a pool array too

    # The usual pd.DataFrame(columns) copies the columns into private memory:
    # the frame no longer shares the pool's, and pickles by value.
    copied = pd.DataFrame(columns)
    assert not np.shares_memory(copied["price"].to_numpy(), columns["price"])
    assert len(pickle.dumps(copied)) > 12 * n

    # With copy=False the frame reads the pool arrays in place. Send the
    # arrays (handles) and the labels, and rebuild the frame on the other side.
    df = frame(columns, index)
    assert np.shares_memory(df["price"].to_numpy(), columns["price"])
    assert len(pickle.dumps((columns, index))) < 2000

    with multiprocessing.Pool(2) as pool:
        total = pool.apply(scale_in_place, (columns, index, 2.0))
    assert np.isclose(total, 3.0 * n, rtol=1e-3)
    assert np.isclose(df["price"].iloc[-1], 4.0)   # the worker's write is in our frame
    print("pandas: ok")
