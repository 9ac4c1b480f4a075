"""Which operations give a plain numpy.ndarray, and which stay in the pool."""

import copy

import numpy as np

import pyarraypool

x = pyarraypool.make_transferable(np.arange(12.0).reshape(3, 4))

# Views stay in the pool: they share x's memory and pickle as handles.
assert type(x[1:]) is pyarraypool.TransferableArray
assert type(x.T) is pyarraypool.TransferableArray

# Copies are independent, plain numpy.ndarray objects in private memory.
for c in (copy.copy(x), copy.deepcopy(x), x.copy(), np.array(x), x * 2, x[[0, 2]]):
    assert type(c) is np.ndarray
    assert not np.shares_memory(c, x)

# np.asarray(x) is a plain ndarray *view*: same memory, and it keeps the block alive.
v = np.asarray(x)
assert type(v) is np.ndarray and np.shares_memory(v, x)
print("copies: ok")
